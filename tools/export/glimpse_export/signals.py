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
The ``image_features`` computation is the plain wrapper's, unchanged: the signals are side branches.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .common import ExportError, log
from .onnx_parts import Idefics3VisionEncoder, LlavaVisionEncoder, _export

SIGNAL_NAMES = {"cls_attention": "glimpse_cls_attention", "attention_received": "glimpse_attention_received",
                "keys": "glimpse_keys"}
CLS_LAYERS = 3


def _heads(x: torch.Tensor, attn) -> torch.Tensor:
    b, s, _ = x.shape
    return x.reshape(b, s, attn.num_heads, attn.head_dim).transpose(1, 2)  # [b, h, s, d]


def _probs(layer, h_in: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention probabilities [b, heads, s, s] and keys [b, heads, s, d] of ``layer`` for input ``h_in``."""
    attn = layer.self_attn
    x = layer.layer_norm1(h_in)
    q = _heads(attn.q_proj(x), attn)
    k = _heads(attn.k_proj(x), attn)
    scores = torch.matmul(q, k.transpose(-1, -2)) * attn.scale
    if bias is not None:
        scores = scores + bias
    return torch.softmax(scores, dim=-1), k


def shuffle_tokens(x: torch.Tensor, n: int, s: int) -> torch.Tensor:
    """Idefics3Connector.pixel_shuffle on [b, n*n, d] -> [b, n*n/s^2, d*s^2] (same op order as the model)."""
    d = x.shape[-1]
    x = x.reshape(-1, n, n, d)
    x = x.reshape(-1, n, n // s, d * s)
    x = x.permute(0, 2, 1, 3)
    x = x.reshape(-1, n // s, n // s, d * s * s)
    x = x.permute(0, 2, 1, 3)
    return x.reshape(-1, (n * n) // (s * s), d * s * s)


class Idefics3VisionSignals(Idefics3VisionEncoder):
    def forward(self, pixel_values, pixel_attention_mask):
        c, h, w = pixel_values.shape[2], pixel_values.shape[3], pixel_values.shape[4]
        pv = pixel_values.reshape(-1, c, h, w)
        p = self.patch
        hp, wp = h // p, w // p
        pm = pixel_attention_mask.reshape(-1, h, w)[:, : hp * p, : wp * p].to(torch.int32)
        patch_mask = pm.reshape(-1, hp, p, wp, p).sum(dim=(2, 4)) > 0
        x = self.embeddings.patch_embedding(pv).flatten(2).transpose(1, 2)
        x = x + self.embeddings.position_embedding(self._positions(patch_mask))
        keep = patch_mask.reshape(patch_mask.shape[0], 1, 1, -1)
        bias = torch.where(keep, torch.tensor(0.0), torch.tensor(torch.finfo(torch.float32).min))
        layers = self.encoder.layers
        for layer in layers[:-1]:
            x = layer(x, bias)
        last_in = x
        x = layers[-1](x, bias)
        x = self.post_layernorm(x)
        s, d, n = self.scale, self.dim, self.nps
        feats = self.projection(shuffle_tokens(x, n, s))
        probs, k = _probs(layers[-1], last_in, bias)
        received = probs.mean(dim=1).mean(dim=1)  # [v, patches]: over heads, then over queries
        received = shuffle_tokens(received[..., None], n, s).sum(-1)  # [v, tokens]
        keys = shuffle_tokens(k.mean(dim=1), n, s)  # [v, tokens, s*s*head_dim]
        return feats, received, keys


class LlavaVisionSignals(LlavaVisionEncoder):
    def forward(self, pixel_values):
        out = self.tower(pixel_values, output_hidden_states=True, return_dict=True)
        hs = out.hidden_states
        feats = hs[self.layer]
        n_layers = len(hs) - 1
        feat_layer = self.layer % (n_layers + 1)  # hidden_states index = output of layer feat_layer - 1
        last = feat_layer - 1  # 0-based index of the layer that produces the features
        layers = self.tower.encoder.layers
        cls_rows = []
        for li in range(last - CLS_LAYERS + 1, last + 1):
            probs, k = _probs(layers[li], hs[li], None)
            cls_rows.append(probs[:, :, 0, 1:].mean(dim=1))
            if li == last:
                received = probs.mean(dim=1).mean(dim=1)[:, 1:]
                keys = k.mean(dim=1)[:, 1:]
        if self.strategy == "default":
            feats = feats[:, 1:]
        return self.projector(feats), torch.stack(cls_rows, dim=1), received, keys


# ---------------------------------------------------------------------------------------------- torch reference
@torch.no_grad()
def reference_signals(bundle, sample) -> dict[str, np.ndarray]:
    """Signals from the HF vision model called with output_attentions=True (independent of the wrappers)."""
    model = bundle.model
    if bundle.family == "idefics3":
        pv = sample["pixel_values"]
        b, n_img = pv.shape[:2]
        vm = model.model.vision_model
        out = vm(pixel_values=pv.reshape(b * n_img, *pv.shape[2:]), output_attentions=True, output_hidden_states=True,
                 return_dict=True)
        att = out.attentions[-1]  # [v, h, P, P]
        vc = model.config.vision_config
        n, s = vc.image_size // vc.patch_size, model.config.scale_factor
        rec = att.mean(1).mean(1)
        rec = rec.reshape(-1, n // s, s, n // s, s).sum((2, 4)).reshape(rec.shape[0], -1)  # 2x2 blocks, raster
        layer = vm.encoder.layers[-1]
        k = layer.self_attn.k_proj(layer.layer_norm1(out.hidden_states[-2]))
        k = k.reshape(k.shape[0], k.shape[1], layer.self_attn.num_heads, -1).mean(2)
        keys = shuffle_tokens(k, n, s)
        return {"glimpse_attention_received": rec.numpy(), "glimpse_keys": keys.numpy()}
    pv = sample["pixel_values"]
    tower = model.model.vision_tower
    out = tower(pv, output_attentions=True, output_hidden_states=True, return_dict=True)
    L = len(out.attentions)
    feat_idx = model.config.vision_feature_layer % (L + 1)
    last = feat_idx - 1
    cls = torch.stack([out.attentions[li][:, :, 0, 1:].mean(1) for li in range(last - CLS_LAYERS + 1, last + 1)], 1)
    rec = out.attentions[last].mean(1).mean(1)[:, 1:]
    layer = tower.encoder.layers[last]
    k = layer.self_attn.k_proj(layer.layer_norm1(out.hidden_states[last]))
    keys = k.reshape(k.shape[0], k.shape[1], layer.self_attn.num_heads, -1).mean(2)[:, 1:]
    return {"glimpse_cls_attention": cls.numpy(), "glimpse_attention_received": rec.numpy(),
            "glimpse_keys": keys.numpy()}


@torch.no_grad()
def export_signals(bundle, model_dir: Path, sample, tol: float = 1e-4) -> dict:
    """Re-export onnx/vision_encoder.onnx with the signal outputs; check features == plain export, signals ==
    torch reference; write glimpse.json."""
    import onnxruntime as ort

    onnx_dir = model_dir / "onnx"
    plain = onnx_dir / "vision_encoder.onnx"
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    model = bundle.model
    tokens = bundle.extra["image_seq_len"]
    if bundle.family == "idefics3":
        wrapper = Idefics3VisionSignals(model).eval()
        pv = sample["pixel_values"]
        pam = sample["pixel_attention_mask"].to(torch.bool)
        feeds = {"pixel_values": pv.numpy(), "pixel_attention_mask": pam.numpy()}
        args = (torch.cat([pv[:, :3], pv[:, 1:4]], 0), torch.cat([pam[:, :3], pam[:, 1:4]], 0))
        names = ["pixel_values", "pixel_attention_mask"]
        outs = ["image_features", SIGNAL_NAMES["attention_received"], SIGNAL_NAMES["keys"]]
        axes = {"pixel_values": {0: "batch_size", 1: "num_images"},
                "pixel_attention_mask": {0: "batch_size", 1: "num_images"}}
        for o in outs:
            axes[o] = {0: "batch_num_images"}
    else:
        wrapper = LlavaVisionSignals(model).eval()
        pv = sample["pixel_values"]
        feeds = {"pixel_values": pv.numpy()}
        args = (torch.cat([pv, pv.flip(-1)], 0),)
        names = ["pixel_values"]
        outs = ["image_features", SIGNAL_NAMES["cls_attention"], SIGNAL_NAMES["attention_received"],
                SIGNAL_NAMES["keys"]]
        axes = {"pixel_values": {0: "batch_size"}}
        for o in outs:
            axes[o] = {0: "batch_size"}
    plain_feats = ort.InferenceSession(str(plain), so, providers=["CPUExecutionProvider"]).run(
        ["image_features"], feeds)[0]
    fixed = {"image_features": {1: tokens}}
    for o in outs[1:]:
        fixed[o] = {1: CLS_LAYERS, 2: tokens} if o == SIGNAL_NAMES["cls_attention"] else {1: tokens}
    tmp = onnx_dir / "vision_encoder.signals.tmp.onnx"
    _export(wrapper, args, tmp, names, outs, axes, fixed_out_dims=fixed)
    sess = ort.InferenceSession(str(tmp), so, providers=["CPUExecutionProvider"])
    got = dict(zip(outs, sess.run(outs, feeds)))
    d_feat = float(np.abs(got["image_features"] - plain_feats).max())
    if d_feat != 0.0:
        log(f"  signals export: image_features differ from the plain export by {d_feat:g}")
        if d_feat > 1e-6:
            tmp.unlink()
            raise ExportError(f"image_features changed by the signal outputs ({d_feat:g})")
    ref = reference_signals(bundle, {k: v for k, v in sample.items()})
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
    present = {k: v for k, v in SIGNAL_NAMES.items() if v in outs}
    (model_dir / "glimpse.json").write_text(json.dumps({"signals": present}, indent=2) + "\n")
    log(f"  signals: {json.dumps(report)}")
    return report
