"""Folder writing, ONNX export and the onnxruntime check of a tiny compressor.

Folder (``export-compressor --arch A --out DIR``)::

    DIR/config.json, model.safetensors        the transformers model (llmlingua loads it with from_pretrained)
    DIR/tokenizer.json, tokenizer_config.json the tokenizer (``[NEW0]``..``[NEW99]`` included, see tokenizer.py)
    DIR/onnx/model.onnx                       input_ids i64 [batch, sequence], attention_mask i64 [batch, sequence]
                                              -> logits f32 [batch, sequence, 2]; softmax(logits)[..., 1] = keep
    DIR/compressor.json                       the manifest (COMPRESSOR_MANIFEST, written by write_compressor_manifest)
    DIR/export_info.json                      tool / library versions, seed, opset
    DIR/fixtures/llmlingua.json, README.md    llmlingua's own outputs on the fixture cases (fixtures.py)
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import numpy as np
import onnxruntime
import tokenizers
import torch
from torch import nn
from transformers import PreTrainedTokenizerFast

from .. import __version__
from ..common import OPSET, ExportError, log
from ..folder import library_versions
from ..onnx_parts import export_onnx
from .model import HIDDEN, ID2LABEL, INIT_RANGE, INTERMEDIATE, LAYERS, LOGIT_STD, MAX_SEQ_LEN
from .tokenizer import FORCE_TOKEN_NAMES

COMPRESSOR_MANIFEST = "compressor.json"
ONNX_PATH = "onnx/model.onnx"
INPUTS = ["input_ids", "attention_mask"]
OUTPUTS = ["logits"]
ORT_TOL = 1e-4

# what llmlingua 0.2.2 needs per family (utils.py is_begin_of_new_word / get_pure_token / TokenClfDataset)
ARCHS = {
    "xlm-roberta": {
        "llmlingua_family": "xlm-roberta-large",  # the substring llmlingua looks for in model_name
        "word_rule": "sentencepiece",  # a token starting with "▁" (or punctuation / a force token) starts a word
        "continuation_strip": "▁",
        "special": dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", sep_token="</s>", cls_token="<s>",
                        pad_token="<pad>", mask_token="<mask>"),
    },
    "bert": {
        "llmlingua_family": "bert-base-multilingual-cased",
        "word_rule": "wordpiece",  # a token not starting with "##" (or a force token) starts a word
        "continuation_strip": "##",
        "special": dict(unk_token="[UNK]", sep_token="[SEP]", cls_token="[CLS]", pad_token="[PAD]",
                        mask_token="[MASK]"),
    },
}


class Logits(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def save_hf_folder(arch: str, tok: tokenizers.Tokenizer, model, out: Path) -> PreTrainedTokenizerFast:
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=MAX_SEQ_LEN,
                                   clean_up_tokenization_spaces=False, additional_special_tokens=FORCE_TOKEN_NAMES,
                                   **ARCHS[arch]["special"])
    if len(fast) != model.config.vocab_size:
        raise ExportError(f"tokenizer size {len(fast)} != model vocab_size {model.config.vocab_size}")
    fast.save_pretrained(str(out))
    model.save_pretrained(str(out))
    return fast


def sample_batch(tok: tokenizers.Tokenizer, texts: list[str], pad_id: int, seq: int | None = None):
    rows = [tok.encode(t).ids for t in texts]
    n = seq or max(len(r) for r in rows)
    ids = np.full((len(rows), n), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), n), dtype=np.int64)
    for i, r in enumerate(rows):
        r = r[:n]
        ids[i, :len(r)] = r
        mask[i, :len(r)] = 1
    return ids, mask


@torch.no_grad()
def export_and_check(model, tok: tokenizers.Tokenizer, out: Path) -> dict:
    """Trace ``onnx/model.onnx`` (batch 2, seq 9) and compare onnxruntime with torch on other shapes, padding
    included (max abs diff of logits over the unmasked positions <= ORT_TOL)."""
    (out / "onnx").mkdir(parents=True, exist_ok=True)
    path = out / ONNX_PATH
    wrapper = Logits(model).eval()
    pad = tok.token_to_id("<pad>") if tok.token_to_id("<pad>") is not None else tok.token_to_id("[PAD]")
    ids, mask = sample_batch(tok, ["The council approved item 12.", "Hello!"], pad, seq=9)
    axes = {"input_ids": {0: "batch_size", 1: "sequence_length"},
            "attention_mask": {0: "batch_size", 1: "sequence_length"},
            "logits": {0: "batch_size", 1: "sequence_length"}}
    export_onnx(wrapper, (torch.from_numpy(ids), torch.from_numpy(mask)), path, INPUTS, OUTPUTS, axes,
                fixed_out_dims={"logits": {2: 2}})
    sess = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    from .fixtures import long_text

    checks = []
    cases = [
        ["Good evening, everyone."],
        ["The motion carries 7 to 2.", "Please state your name and keep your remarks to three minutes. Thank you!",
         "Item"],
        [long_text(0, 2000)],  # truncated to MAX_SEQ_LEN below
    ]
    worst = 0.0
    for texts in cases:
        seq = MAX_SEQ_LEN if len(texts[0]) > 1000 else None
        ids, mask = sample_batch(tok, texts, pad, seq=seq)
        ref = wrapper(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
        got = sess.run(OUTPUTS, {"input_ids": ids, "attention_mask": mask})[0]
        if got.shape != ref.shape:
            raise ExportError(f"onnxruntime logits shape {got.shape} != torch {ref.shape}")
        sel = mask.astype(bool)
        d = float(np.abs(got[sel] - ref[sel]).max())
        worst = max(worst, d)
        checks.append({"shape": list(ids.shape), "max_abs_diff": d})
        if not d <= ORT_TOL:
            raise ExportError(f"onnxruntime vs torch logits: max abs diff {d:g} > {ORT_TOL:g} on {ids.shape}")
    probs = torch.from_numpy(got).softmax(-1)[..., 1][torch.from_numpy(sel)]
    log(f"  onnxruntime == torch (max abs diff {worst:.2e}); keep p on a long text: "
        f"min {probs.min():.3f} mean {probs.mean():.3f} max {probs.max():.3f}")
    return {"ort_max_abs_diff": worst, "ort_checks": checks,
            "keep_prob_long_text": {"min": float(probs.min()), "mean": float(probs.mean()),
                                    "max": float(probs.max())}}


@torch.no_grad()
def trace_logits(wrapper, tok: tokenizers.Tokenizer, pad: int, out: Path) -> dict:
    """Trace ``onnx/model.onnx`` (batch 2, seq 9, both axes dynamic) with ``export_part``: weights inside, or in
    ``model.onnx_data`` above the 2 GiB protobuf limit (the real-size shapes)."""
    from ..realsize.export import export_part

    ids, mask = sample_batch(tok, ["The council approved item 12.", "Hello!"], pad, seq=9)
    axes = {"input_ids": {0: "batch_size", 1: "sequence_length"},
            "attention_mask": {0: "batch_size", 1: "sequence_length"},
            "logits": {0: "batch_size", 1: "sequence_length"}}
    return export_part(wrapper, (torch.from_numpy(ids), torch.from_numpy(mask)), out / ONNX_PATH, INPUTS, OUTPUTS,
                       axes, fixed_out_dims={"logits": {2: 2}})


def write_compressor_manifest(out: Path, arch: str, tok: tokenizers.Tokenizer, fast, skip_tokens: list[str]) -> None:
    """``compressor.json``. Token strings and the ids they map to are both given, the Rust side can use either."""
    a = ARCHS[arch]

    def tid(t: str) -> int:
        return int(fast.convert_tokens_to_ids(t))

    doc = {
        "manifest_version": 1,
        "role": "prompt",
        "kind": "llmlingua2",
        "arch": arch,
        "onnx": ONNX_PATH,
        "inputs": {"input_ids": {"dtype": "int64", "shape": ["batch_size", "sequence_length"]},
                   "attention_mask": {"dtype": "int64", "shape": ["batch_size", "sequence_length"]}},
        "outputs": {"logits": {"dtype": "float32", "shape": ["batch_size", "sequence_length", 2]}},
        "labels": {str(k): v for k, v in ID2LABEL.items()},
        "keep_label": 1,
        "keep_probability": "softmax(logits, axis=-1)[..., 1]",
        "max_seq_len": MAX_SEQ_LEN,
        "max_batch_size": 50,
        "tokenizer": "tokenizer.json",
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "llmlingua": {
            "version": "0.2.2",
            "model_family": a["llmlingua_family"],
            "word_rule": a["word_rule"],
            "continuation_strip": a["continuation_strip"],
            # TokenClfDataset is built without model_name, so it always uses BERT's literals; an XLM-R tokenizer
            # maps them to <unk> (convert_tokens_to_ids of an unknown token)
            "dataset_tokens": {k: {"token": t, "id": tid(t)} for k, t in
                               (("cls", "[CLS]"), ("sep", "[SEP]"), ("pad", "[PAD]"))},
            # tokenizer.special_tokens_map values (without additional ones) after llmlingua's load_model: tokens
            # with these strings (convert_ids_to_tokens) are skipped when words are built
            "skip_tokens": skip_tokens,
            "force_token_names": {"format": "[NEW{i}]", "count": len(FORCE_TOKEN_NAMES),
                                  "first_id": tid(FORCE_TOKEN_NAMES[0])},
            "chunk_end_tokens": [".", "\n"],
            "token_counter": "tiktoken cl100k_base",
        },
    }
    (out / COMPRESSOR_MANIFEST).write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_export_info(out: Path, arch: str, seed: int | None, extra: dict, model: dict | None = None) -> None:
    """``export_info.json``; ``model`` describes the shape (default: the tiny one), ``seed`` None: not seeded."""
    info = {
        "tool": f"glimpse_export {__version__}",
        "command": "export-compressor",
        "arch": arch,
        "seed": seed,
        "opset": OPSET,
        "exporter": "torch.onnx.export(dynamo=False, dynamic_axes)",
        "model": model or {"hidden": HIDDEN, "layers": LAYERS, "intermediate": INTERMEDIATE,
                           "initializer_range": INIT_RANGE, "classifier_logit_std": LOGIT_STD},
        "versions": {
            **library_versions(),
            "llmlingua": importlib.metadata.version("llmlingua"),
            "tiktoken": importlib.metadata.version("tiktoken"),
        },
        **extra,
    }
    if seed is None:
        del info["seed"]
    (out / "export_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
