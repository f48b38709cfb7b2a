"""``quantize`` self-check: every variant loads in onnxruntime (all graph optimizations and none), runs on a seeded
synthetic sample and is compared with the fp32 part."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

# -------------------------------------------------------------------------------------------------------- self-check
_DIMS = {"batch_size": 1, "batch": 1, "num_images": 2, "sequence_length": 6, "seq": 6,
         "past_sequence_length": 4, "past": 4, "views": 2, "tokens": 5}  # views / tokens: vision_blocks_K


def _np_dtype(ort_type: str):
    return {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
            "tensor(int32)": np.int32, "tensor(bool)": np.bool_, "tensor(uint8)": np.uint8}[ort_type]


def _shape(inp, dims: dict) -> list[int]:
    out = []
    for d in inp.shape:
        if isinstance(d, int) and d >= 0:
            out.append(d)
        else:
            out.append(dims.get(str(d), 1))
    return out


def _session(path: Path, opt: str):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if opt == "all"
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def sample_inputs(sess, part: str, onnx_dir: Path, vocab: int, seed: int = 0) -> dict:
    """Seeded synthetic inputs from the session's input metadata (dims: batch 1, 2 tiles, seq 6, past 4; stage files:
    2 views, 5 tokens where the axis is symbolic)."""
    rng = np.random.default_rng(seed)
    dims = dict(_DIMS)
    dims["total_sequence_length"] = dims["sequence_length"] + dims["past_sequence_length"]
    feeds = {}
    for inp in sess.get_inputs():
        shape, dt, name = _shape(inp, dims), _np_dtype(inp.type), inp.name
        if name == "pixel_values":
            feeds[name] = rng.uniform(-1, 1, shape).astype(dt)
        elif name == "pixel_attention_mask" or name == "attention_mask":
            feeds[name] = np.ones(shape, dt)
        elif name == "input_ids":
            feeds[name] = rng.integers(0, vocab, shape).astype(dt)
        elif name == "position_ids":
            p, s = dims["past_sequence_length"], dims["sequence_length"]
            feeds[name] = np.broadcast_to(np.arange(p, p + s), shape).astype(dt).copy()
        elif name == "attention_bias":  # vision_blocks_K: log of ToMe-like token sizes 1..4
            feeds[name] = np.log(rng.integers(1, 5, shape)).astype(dt)
        elif name == "use_cache_branch":
            feeds[name] = np.ones(shape, dt)
        elif name == "inputs_embeds":
            embed = onnx_dir / "embed_tokens.onnx"
            if embed.exists():
                es = _session(embed, "all")
                ids = rng.integers(0, vocab, shape[:2]).astype(np.int64)
                feeds[name] = es.run(None, {es.get_inputs()[0].name: ids})[0].astype(dt)
            else:
                feeds[name] = rng.normal(0, 1, shape).astype(dt)
        elif dt in (np.float32, np.float16):
            feeds[name] = rng.normal(0, 1, shape).astype(dt)
        elif dt == np.bool_:
            feeds[name] = np.ones(shape, dt)
        else:
            feeds[name] = np.zeros(shape, dt)
    return feeds


def compare(ref: dict, got: dict) -> dict:
    res = {}
    for k, r in ref.items():
        g = got[k]
        if r.shape != g.shape:
            res[k] = {"error": f"shape {g.shape} != {r.shape}"}
            continue
        r64, g64 = r.astype(np.float64), g.astype(np.float64)
        d = float(np.max(np.abs(r64 - g64))) if r.size else 0.0
        scale = float(np.max(np.abs(r64))) if r.size else 0.0
        e = {"max_abs": d, "rel": d / scale if scale else d, "finite": bool(np.isfinite(g64).all())}
        if k == "logits" and r.ndim >= 2 and r.size:
            e["argmax_agree"] = float(np.mean(np.argmax(r, -1) == np.argmax(g, -1)))
        res[k] = e
    return res


def vocab_size(model_dir: Path) -> int:
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
        return int((cfg.get("text_config") or {}).get("vocab_size") or cfg.get("vocab_size"))
    except Exception:  # noqa: BLE001
        return 100


def self_check(ref_path: Path, var_path: Path, part: str, vocab: int) -> dict:
    ref_sess = _session(ref_path, "all")
    feeds = sample_inputs(ref_sess, part, ref_path.parent, vocab)
    names = [o.name for o in ref_sess.get_outputs()]
    ref = dict(zip(names, ref_sess.run(None, feeds)))
    out = {}
    for opt in ("all", "none"):
        try:
            s = _session(var_path, opt)
            out[f"ort_opt_{opt}"] = compare(ref, dict(zip(names, s.run(names, feeds))))
        except Exception as e:  # noqa: BLE001  (report what onnxruntime refused)
            out[f"ort_opt_{opt}"] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
    return out


def summarize(check: dict) -> str:
    parts = []
    for opt, c in check.items():
        if "error" in c:
            parts.append(f"{opt}: ERROR {c['error'][:120]}")
            continue
        worst = max(c.items(), key=lambda kv: kv[1].get("rel", float("inf")))
        s = f"{opt}: worst {worst[0]} max_abs {worst[1].get('max_abs', float('nan')):.3g} rel {worst[1].get('rel', float('nan')):.3g}"
        if "logits" in c and "argmax_agree" in c["logits"]:
            s += f", logits max_abs {c['logits']['max_abs']:.3g} argmax {c['logits']['argmax_agree']:.2f}"
        parts.append(s)
    return "; ".join(parts)
