"""The tiny token classifiers: ``XLMRobertaForTokenClassification`` / ``BertForTokenClassification``, num_labels 2.

Hidden 32, 2 layers, 4 heads, intermediate 64, eager attention, seeded random weights (initializer_range 0.2 so
the encoder mixes context into each token). The classifier is then calibrated on the tokenizer corpus: a random
direction (seed + 1) for the keep-minus-drop logit, scaled so that this logit difference has std LOGIT_STD over the
corpus tokens, and biases that centre it at 0. softmax(logits)[..., 1] (llmlingua's keep probability) then spreads
over roughly 0.05..0.95 instead of sitting at 0.5 (plain init) or at 0 / 1 (a larger random classifier, whose
logits follow the hidden states' common offset): the percentile thresholds of the fixtures separate words clearly.

Positions: llmlingua always feeds 512 tokens ([CLS] + 510 + [SEP], padded), so BERT gets
max_position_embeddings 512 and XLM-R 514 (its position ids start at padding_idx + 1 = 2).
"""

from __future__ import annotations

import torch
from transformers import BertConfig, BertForTokenClassification, XLMRobertaConfig, XLMRobertaForTokenClassification

HIDDEN = 32
LAYERS = 2
HEADS = 4
INTERMEDIATE = 64
INIT_RANGE = 0.2
LOGIT_STD = 1.5
MAX_SEQ_LEN = 512  # llmlingua's init_llmlingua2: self.max_seq_len = 512
ID2LABEL = {0: "drop", 1: "keep"}


def calibrate_classifier(model, tok, seed: int) -> None:
    from .tokenizer import CORPUS

    base = model.roberta if hasattr(model, "roberta") else model.bert
    hs = []
    with torch.no_grad():
        for line in (ln for ln in CORPUS.splitlines() if ln):
            ids = torch.tensor([tok.encode(line).ids])
            hs.append(base(input_ids=ids).last_hidden_state[0])
        h = torch.cat(hs)  # [tokens, hidden]
        g = torch.Generator().manual_seed(seed)
        d = torch.randn(h.shape[1], generator=g)
        diff = h @ d
        d = d * (LOGIT_STD / diff.std())
        b = -float((h @ d).mean())
        w = model.classifier.weight
        w.zero_()
        w[1] = d / 2
        w[0] = -d / 2
        model.classifier.bias.copy_(torch.tensor([-b / 2, b / 2]))


# microsoft/llmlingua-2-xlm-roberta-large-meetingbank config.json (xlm-roberta-large; vocab_size 250102 = the
# 250002 XLM-R pieces + llmlingua's 100 [NEWi] tokens): the real-size shape, random weights, for timing only
LARGE = {"hidden": 1024, "layers": 24, "heads": 16, "intermediate": 4096, "init_range": 0.02, "vocab_size": 250102}
TINY = {"hidden": HIDDEN, "layers": LAYERS, "heads": HEADS, "intermediate": INTERMEDIATE, "init_range": INIT_RANGE}


def build_model(arch: str, tok, seed: int, size: dict | None = None):
    """``tok``: the ``tokenizers.Tokenizer`` (its full size, [NEWi] included, is the model's vocab_size);
    ``size``: TINY (default) or LARGE."""
    size = size or TINY
    torch.manual_seed(seed)
    common = dict(
        vocab_size=tok.get_vocab_size(with_added_tokens=True), hidden_size=size["hidden"],
        num_hidden_layers=size["layers"], num_attention_heads=size["heads"], intermediate_size=size["intermediate"],
        hidden_act="gelu", hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, type_vocab_size=1 if arch == "xlm-roberta" else 2,
        initializer_range=size["init_range"], layer_norm_eps=1e-5 if arch == "xlm-roberta" else 1e-12,
        num_labels=2, id2label=dict(ID2LABEL), label2id={v: k for k, v in ID2LABEL.items()},
        classifier_dropout=None,
    )
    if arch == "xlm-roberta":
        cfg = XLMRobertaConfig(**common, max_position_embeddings=MAX_SEQ_LEN + 2,
                               pad_token_id=tok.token_to_id("<pad>"), bos_token_id=tok.token_to_id("<s>"),
                               eos_token_id=tok.token_to_id("</s>"))
        cls = XLMRobertaForTokenClassification
    elif arch == "bert":
        cfg = BertConfig(**common, max_position_embeddings=MAX_SEQ_LEN, pad_token_id=tok.token_to_id("[PAD]"))
        cls = BertForTokenClassification
    else:
        raise ValueError(arch)
    cfg._attn_implementation = "eager"
    model = cls(cfg).eval()
    calibrate_classifier(model, tok, seed + 1)
    model.config.architectures = [cls.__name__]
    return model
