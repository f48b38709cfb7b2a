"""``export-compressor --size large``: the real-size LLMLingua-2 XLM-RoBERTa-large shape, random weights, for timing.

The shape of microsoft/llmlingua-2-xlm-roberta-large-meetingbank (24 layers, hidden 1024, 16 heads, intermediate 4096,
vocab 250102, 560M parameters; ``model.LARGE``) with seeded random weights and the tiny folders' calibrated classifier;
the tokenizer is the offline tiny XLM-R one padded with filler pieces no text matches to the real vocabulary size
(token counts per word differ from the real SentencePiece model; the work per token does not). The folder is a
compressor folder like the tiny ones (``compressor.json``, ``tokenizer.json``, ``onnx/model.onnx`` +
``model.onnx_data`` above the 2 GiB protobuf limit, ``export_info.json``) without fixtures: its answers are
meaningless, its time is real. onnxruntime must match torch within 1e-3 on one full 512-token row.
"""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from ..common import REPO_ROOT, ExportError, Timer, log, seed_everything

TOL = 1e-3
DEFAULT_OUT = REPO_ROOT / "models" / "real" / "llmlingua2-xlm-roberta-large"
# what llmlingua's load_model leaves in special_tokens_map for XLM-R (the tiny folder's recorded list)
SKIP_TOKENS = ["</s>", "<mask>", "<pad>", "<s>", "<unk>"]


@torch.no_grad()
def run_realsize_compressor(out: Path | None, seed: int, threads: int = 2) -> dict:
    from .export import (ONNX_PATH, OUTPUTS, Logits, sample_batch, trace_logits, write_compressor_manifest,
                         write_export_info)
    from .fixtures import long_text
    from .model import LARGE, MAX_SEQ_LEN, build_model
    from .tokenizer import build_xlmr_tokenizer

    t = Timer()
    torch.set_num_threads(threads)
    out = Path(out) if out else DEFAULT_OUT
    (out / "onnx").mkdir(parents=True, exist_ok=True)
    seed_everything(seed)
    tok = build_xlmr_tokenizer(pad_to=LARGE["vocab_size"])
    model = build_model("xlm-roberta", tok, seed, size=LARGE)
    params = sum(p.numel() for p in model.parameters())
    log(f"  xlm-roberta-large shape: {params / 1e6:.0f}M parameters, vocab {model.config.vocab_size}")
    from transformers import PreTrainedTokenizerFast

    from .export import ARCHS
    from .tokenizer import FORCE_TOKEN_NAMES

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=MAX_SEQ_LEN,
                                   clean_up_tokenization_spaces=False, additional_special_tokens=FORCE_TOKEN_NAMES,
                                   **ARCHS["xlm-roberta"]["special"])
    if len(fast) != model.config.vocab_size:
        raise ExportError(f"tokenizer size {len(fast)} != model vocab_size {model.config.vocab_size}")
    fast.save_pretrained(str(out))
    model.config.save_pretrained(str(out))
    wrapper = Logits(model).eval()
    pad = tok.token_to_id("<pad>")
    part = trace_logits(wrapper, tok, pad, out)
    ids, mask = sample_batch(tok, [long_text(0, 4000)], pad, seq=MAX_SEQ_LEN)
    ref = wrapper(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    del model, wrapper
    gc.collect()
    so = onnxruntime.SessionOptions()
    so.intra_op_num_threads = threads
    sess = onnxruntime.InferenceSession(str(out / ONNX_PATH), so, providers=["CPUExecutionProvider"])
    got = sess.run(OUTPUTS, {"input_ids": ids, "attention_mask": mask})[0]
    d = float(np.abs(got - ref).max())
    if not d <= TOL:
        raise ExportError(f"onnxruntime vs torch logits on a 512-token row: max abs diff {d:g} > {TOL:g}")
    log(f"  onnxruntime == torch on [1, {MAX_SEQ_LEN}] (max abs diff {d:.2e})")
    write_compressor_manifest(out, "xlm-roberta", tok, fast, SKIP_TOKENS)
    info = {"size": "large", "note": "random weights: for timing only, compressed prompts are meaningless",
            "shape": LARGE, "parameters": params, "onnx": part, "ort_max_abs_diff_512": d}
    write_export_info(out, "xlm-roberta", seed, info,
                      model={"hidden": LARGE["hidden"], "layers": LARGE["layers"],
                             "intermediate": LARGE["intermediate"], "initializer_range": LARGE["init_range"]})
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"out": str(out), "seconds": t(), "bytes": size, **info}
