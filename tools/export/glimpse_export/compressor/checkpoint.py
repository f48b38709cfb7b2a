"""``export-compressor --from CHECKPOINT --out DIR``: a compressor folder from an LLMLingua-2 checkpoint on disk.

CHECKPOINT is a transformers token-classification folder (``config.json``, weights, tokenizer files) as
``microsoft/llmlingua-2-xlm-roberta-large-meetingbank`` or ``microsoft/llmlingua-2-bert-base-multilingual-cased-
meetingbank`` download them. It is loaded exactly as llmlingua loads it (``PromptCompressor(use_llmlingua2=True)``:
the tokenizer gains the ``[NEW{i}]`` force tokens, the special tokens llmlingua skips are read from it), the model is
exported to ``onnx/model.onnx`` (``+ model.onnx_data`` above the 2 GiB protobuf limit) and onnxruntime is checked
against torch on a full 512-token row before the manifest is written. Nothing is downloaded: the checkpoint must be
a local folder.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from ..common import ExportError, Timer, log

TOL = 1e-3
MODEL_TYPES = {"xlm-roberta": "xlm-roberta", "bert": "bert"}


@torch.no_grad()
def run_from_checkpoint(src: Path, out: Path, threads: int = 2) -> dict:
    from .export import (ARCHS, ONNX_PATH, OUTPUTS, Logits, sample_batch, trace_logits, write_compressor_manifest,
                         write_export_info)
    from .fixtures import load_compressor, long_text
    from .model import MAX_SEQ_LEN

    t = Timer()
    src, out = Path(src), Path(out)
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise ExportError(f"{src}: no config.json (expected a local LLMLingua-2 checkpoint folder)")
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    arch = MODEL_TYPES.get(cfg.get("model_type"))
    if arch is None:
        raise ExportError(f"{cfg_path}: model_type {cfg.get('model_type')!r}; LLMLingua-2 checkpoints are "
                          f"{sorted(MODEL_TYPES)}")
    if len(cfg.get("id2label", {"0": 0, "1": 1})) != 2:
        raise ExportError(f"{cfg_path}: id2label has {len(cfg['id2label'])} labels; a compressor has 2 (drop, keep)")
    if out.resolve() == src.resolve():
        raise ExportError("--out must differ from --from")
    torch.set_num_threads(threads)
    family = ARCHS[arch]["llmlingua_family"]
    with tempfile.TemporaryDirectory() as tmp:
        comp, _ = load_compressor(src, family, Path(tmp))
        fast, model = comp.tokenizer, comp.model.eval().float()
        skip = sorted(comp.special_tokens - {None})
    if len(fast) != model.config.vocab_size:
        raise ExportError(f"{src}: tokenizer with llmlingua's force tokens has {len(fast)} entries, the model's "
                          f"vocab_size is {model.config.vocab_size}")
    params = sum(p.numel() for p in model.parameters())
    log(f"  {src}: {arch}, {params / 1e6:.0f}M parameters, vocab {model.config.vocab_size}")
    (out / "onnx").mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    model.config.save_pretrained(str(out))
    tok = fast.backend_tokenizer
    pad = next((i for i in (fast.pad_token_id, tok.token_to_id("<pad>"), tok.token_to_id("[PAD]")) if i is not None), 0)
    wrapper = Logits(model).eval()
    part = trace_logits(wrapper, tok, pad, out)
    so = onnxruntime.SessionOptions()
    so.intra_op_num_threads = threads
    sess = onnxruntime.InferenceSession(str(out / ONNX_PATH), so, providers=["CPUExecutionProvider"])
    worst = 0.0
    for texts, seq in (([long_text(0, 4000)], MAX_SEQ_LEN), (["The motion carries 7 to 2.", "Item"], None)):
        ids, mask = sample_batch(tok, texts, pad, seq=seq)
        ref = wrapper(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
        got = sess.run(OUTPUTS, {"input_ids": ids, "attention_mask": mask})[0]
        sel = mask.astype(bool)
        d = float(np.abs(got[sel] - ref[sel]).max())
        worst = max(worst, d)
        if not d <= TOL:
            raise ExportError(f"onnxruntime vs torch logits on {list(ids.shape)}: max abs diff {d:g} > {TOL:g}")
    log(f"  onnxruntime == torch (max abs diff {worst:.2e})")
    write_compressor_manifest(out, arch, tok, fast, skip)
    info = {"from_checkpoint": str(src), "parameters": params, "onnx": part, "ort_max_abs_diff": worst}
    write_export_info(out, arch, None, info,
                      model={k: cfg.get(k) for k in ("hidden_size", "num_hidden_layers", "intermediate_size",
                                                     "num_attention_heads", "vocab_size")})
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"out": str(out), "seconds": t(), "bytes": size, "arch": arch, **info}
