"""Real-size self-check: torch references on real-size inputs (before export), then one onnxruntime run per part."""

from __future__ import annotations

import gc
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from ..common import ExportError, Timer
from ..families import Bundle

TOL = 1e-3
PREFILL = 24  # tokens of the decoder check prefill


@torch.no_grad()
def torch_references(bundle: Bundle, seed: int, shape: tuple[int, ...]) -> dict:
    """Real-size inputs and the torch model's outputs for every part (computed before export); ``shape``: the
    reference pixel_values."""
    model = bundle.model
    g = torch.Generator().manual_seed(seed + 1)
    ref: dict = {}
    spec = bundle.spec
    vision_in = spec.random_vision_inputs(g, shape)  # SmolVLM: one image of 2 tiles; LLaVA-OneVision: 3 crops
    ref["vision_in"] = {k: v.numpy() for k, v in vision_in.items()}
    ref["vision_out"] = spec.view_features(model, vision_in).numpy()
    n_tok = len(bundle.tokenizer)
    ids = torch.randint(0, n_tok, (1, PREFILL), generator=g)
    ref["ids"] = ids.numpy()
    ref["embeds"] = model.get_input_embeddings()(ids).numpy()
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    out2 = model(input_ids=nxt, attention_mask=torch.ones(1, PREFILL + 1, dtype=torch.int64), cache=out.cache,
                 use_cache=True)
    ref["prefill_logits"] = out.logits.numpy()
    ref["next_id"] = nxt.numpy()
    ref["next_embeds"] = model.get_input_embeddings()(nxt).numpy()
    ref["step_logits"] = out2.logits.numpy()
    ref["present0_key"] = out2.cache.layers[0].keys.numpy()
    return ref


def _maxdiff(a, b) -> float:
    if a.shape != b.shape:
        raise ExportError(f"shape {a.shape} != {b.shape}")
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def _session(path: Path, threads: int):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _io(sess) -> dict:
    def fmt(xs):
        return [f"{x.name} {x.type.replace('tensor(', '').rstrip(')')} {list(x.shape)}" for x in xs]

    return {"inputs": fmt(sess.get_inputs()), "outputs": fmt(sess.get_outputs())}


def ort_check(onnx_dir: Path, ref: dict, threads: int) -> dict:
    res: dict = {}
    t = Timer()
    s = _session(onnx_dir / "vision_encoder.onnx", threads)
    res["io_vision_encoder"] = _io(s)
    t0 = time.perf_counter()
    (feats,) = s.run(["image_features"], ref["vision_in"])
    res["vision_run_s"] = round(time.perf_counter() - t0, 2)
    res["vision_features_diff"] = _maxdiff(feats, ref["vision_out"])
    res["vision_shape"] = list(feats.shape)
    del s
    gc.collect()

    s = _session(onnx_dir / "embed_tokens.onnx", threads)
    res["io_embed_tokens"] = _io(s)
    (emb,) = s.run(["inputs_embeds"], {"input_ids": ref["ids"].astype(np.int64)})
    res["embed_diff"] = _maxdiff(emb, ref["embeds"])
    del s
    gc.collect()

    s = _session(onnx_dir / "decoder_model_merged.onnx", threads)
    res["io_decoder_model_merged"] = _io(s)
    names = [o.name for o in s.get_outputs()]
    past = {}
    for i in s.get_inputs():
        if i.name.startswith("past_key_values."):
            past[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), dtype=np.float32)
    feeds = {"inputs_embeds": ref["embeds"], "attention_mask": np.ones((1, PREFILL), np.int64),
             "position_ids": np.arange(PREFILL, dtype=np.int64)[None], **past}
    t0 = time.perf_counter()
    outs = dict(zip(names, s.run(names, feeds)))
    res["prefill_run_s"] = round(time.perf_counter() - t0, 3)
    res["prefill_logits_diff"] = _maxdiff(outs["logits"], ref["prefill_logits"])
    past = {n.replace("present.", "past_key_values."): v for n, v in outs.items() if n.startswith("present.")}
    feeds = {"inputs_embeds": ref["next_embeds"], "attention_mask": np.ones((1, PREFILL + 1), np.int64),
             "position_ids": np.asarray([[PREFILL]], np.int64), **past}
    t0 = time.perf_counter()
    outs2 = dict(zip(names, s.run(names, feeds)))
    res["step_run_s"] = round(time.perf_counter() - t0, 3)
    res["step_logits_diff"] = _maxdiff(outs2["logits"], ref["step_logits"])
    res["step_present0_key_diff"] = _maxdiff(outs2["present.0.key"], ref["present0_key"])
    del s
    gc.collect()
    res["seconds"] = round(t(), 1)
    return res
