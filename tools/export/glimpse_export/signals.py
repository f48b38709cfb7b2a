"""Pruning-signal outputs for ``vision_encoder.onnx`` (``export-testbed --signals``) and ``glimpse.json``.

Extra outputs, aligned row for row with ``image_features`` (same views, same token order):
  glimpse_cls_attention       f32 [n_views, 3, tokens]  (CLIP/LLaVA only) head-averaged attention of the CLS query to
                              each patch in the 3 encoder layers that end at the feature layer (with
                              vision_feature_layer -2 and 5 layers: layers 1, 2, 3, 0-based); the CLS column is dropped
                              so columns line up with the feature rows (strategy "default").
  glimpse_attention_received  f32 [n_views, tokens]  attention received per patch in the layer the features come from
                              (Idefics3: the last encoder layer; LLaVA: the feature layer, -2), averaged over heads and
                              over all queries; Idefics3: summed over the scale_factor^2 patches that the pixel shuffle
                              merges into each token; LLaVA: CLS column dropped (CLS is still a query).
  glimpse_keys                f32 [n_views, tokens, d]  keys (k_proj of layer_norm1 of the layer input) of that same
                              layer, averaged over heads (d = head_dim); Idefics3: the pixel shuffle's grouping
                              applied to the per-patch keys (d = scale_factor^2 * head_dim, the 4 patch keys of a token
                              concatenated in the model's order).
The ``image_features`` computation is the plain wrapper's, unchanged: the signals are side branches. The signal
wrappers and the torch references are the families' (``FamilySpec.signals_wrapper`` / ``reference_signals``);
this module has the shared attention helper and the family-independent export.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from .common import ExportError, log
from .manifest import write_manifest
from .onnx_parts import export_onnx

SIGNAL_NAMES = {"cls_attention": "glimpse_cls_attention", "attention_received": "glimpse_attention_received",
                "keys": "glimpse_keys"}
CLS_LAYERS = 3


def _heads(x: torch.Tensor, attn) -> torch.Tensor:
    b, s, _ = x.shape
    return x.reshape(b, s, attn.num_heads, attn.head_dim).transpose(1, 2)  # [b, h, s, d]


def attention_probs(layer, h_in: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention probabilities [b, heads, s, s] and keys [b, heads, s, d] of ``layer`` for input ``h_in``."""
    attn = layer.self_attn
    x = layer.layer_norm1(h_in)
    q = _heads(attn.q_proj(x), attn)
    k = _heads(attn.k_proj(x), attn)
    scores = torch.matmul(q, k.transpose(-1, -2)) * attn.scale
    if bias is not None:
        scores = scores + bias
    return torch.softmax(scores, dim=-1), k


@torch.no_grad()
def export_signals(bundle, model_dir: Path, sample, tol: float = 1e-4) -> dict:
    """Re-export onnx/vision_encoder.onnx with the signal outputs; check features == plain export, signals ==
    torch reference; add the signals to glimpse.json."""
    onnx_dir = model_dir / "onnx"
    plain = onnx_dir / "vision_encoder.onnx"
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    model, spec = bundle.model, bundle.spec
    tokens = bundle.extra["image_seq_len"]
    wrapper = spec.signals_wrapper(model).eval()
    feeds = spec.vision_feeds(sample)
    outs = ["image_features", *(SIGNAL_NAMES[k] for k in spec.signals)]
    axes = spec.vision_axes(outs)
    plain_feats = ort.InferenceSession(str(plain), so, providers=["CPUExecutionProvider"]).run(
        ["image_features"], feeds)[0]
    fixed = {"image_features": {1: tokens}}
    for o in outs[1:]:
        fixed[o] = {1: CLS_LAYERS, 2: tokens} if o == SIGNAL_NAMES["cls_attention"] else {1: tokens}
    tmp = onnx_dir / "vision_encoder.signals.tmp.onnx"
    export_onnx(wrapper, spec.vision_trace_args(sample), tmp, spec.vision_inputs, outs, axes, fixed_out_dims=fixed)
    sess = ort.InferenceSession(str(tmp), so, providers=["CPUExecutionProvider"])
    got = dict(zip(outs, sess.run(outs, feeds)))
    d_feat = float(np.abs(got["image_features"] - plain_feats).max())
    if d_feat != 0.0:
        log(f"  signals export: image_features differ from the plain export by {d_feat:g}")
        if d_feat > 1e-6:
            tmp.unlink()
            raise ExportError(f"image_features changed by the signal outputs ({d_feat:g})")
    ref = spec.reference_signals(model, {k: v for k, v in sample.items()})
    report = {"image_features_vs_plain": d_feat}
    for name, r in ref.items():
        g = got[name]
        if g.shape != r.shape:
            tmp.unlink()
            raise ExportError(f"{name}: ONNX shape {g.shape} != torch reference {r.shape}")
        d = float(np.abs(g - r).max())
        report[name] = {"shape": list(g.shape), "max_abs_diff_vs_torch_output_attentions": d}
        if not d < tol:
            tmp.unlink()
            raise ExportError(f"{name}: ONNX differs from the torch reference by {d:g}")
    tmp.replace(plain)
    write_manifest(model_dir, signals={k: v for k, v in SIGNAL_NAMES.items() if v in outs})
    log(f"  signals: {json.dumps(report)}")
    return report
