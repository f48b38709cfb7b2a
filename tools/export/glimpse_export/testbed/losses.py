"""Testbed losses: the dense auxiliary loss on the vision encoder's patch states, and the training-only attention
guidance of the last decoder layer."""

from __future__ import annotations

import torch
from torch.nn import functional as F
from transformers.models.llama.modeling_llama import rotate_half

from ..families import FamilySpec
from .model import AuxHeads


def _ce(logits, target, bg_weight=0.15):
    w = torch.ones(logits.shape[-1])
    w[0] = bg_weight
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), weight=w)


def aux_loss(heads: AuxHeads, hid, pooled, labels, spec: FamilySpec, shape_weight: float = 1.0,
             count_weight: float = 0.0):
    patches = spec.patch_states(hid)
    loss = (_ce(heads.colour(patches), labels["colour"]) + shape_weight * _ce(heads.shape(patches), labels["shape"])
            + _ce(heads.digit(patches), labels["digit"]) + _ce(heads.centre(patches), labels["centre"], 0.05)
            + 4.0 * F.mse_loss(torch.sigmoid(heads.xy(patches)), labels["xy"]))
    cfg = labels["count"] >= 0
    count_logits = heads.count(patches)
    if count_weight and cfg.any():
        loss = loss + count_weight * F.cross_entropy(count_logits[cfg], labels["count"][cfg])
    if heads.presence is not None:
        loss = loss + F.binary_cross_entropy_with_logits(heads.presence(hid[:, 0]), labels["presence"])
        loss = loss + F.binary_cross_entropy_with_logits(heads.presence_last(pooled), labels["presence"])
    with torch.no_grad():
        fg = labels["colour"] > 0
        acc = ((heads.colour(patches).argmax(-1) == labels["colour"]) & fg).sum() / fg.sum().clamp(min=1)
        dfg = labels["digit"] > 0
        dacc = ((heads.digit(patches).argmax(-1) == labels["digit"]) & dfg).sum() / dfg.sum().clamp(min=1)
        sfg = fg & (labels["shape"] >= 0)
        sacc = ((heads.shape(patches).argmax(-1) == labels["shape"]) & sfg).sum() / sfg.sum().clamp(min=1)
        cacc = ((count_logits.argmax(-1) == labels["count"]) & cfg).sum() / cfg.sum().clamp(min=1)
    return loss, {"fg_colour_acc": float(acc), "digit_acc": float(dacc), "fg_shape_acc": float(sacc),
                  "fg_count_acc": float(cacc)}


def attention_mass_loss(rows: torch.Tensor, masks) -> torch.Tensor:
    """-log of the attention mass ``rows`` [..., n_img] puts on the image tokens in ``masks`` (bool numpy), mean."""
    mass = (rows * torch.from_numpy(masks).float()).sum(-1)
    return (-torch.log(mass + 1e-6)).mean()


def answer_attention(tm, h_in: torch.Tensor, pos: torch.Tensor, img_idx: torch.Tensor, bi: torch.Tensor,
                     ti: torch.Tensor) -> torch.Tensor:
    """Attention of the last decoder layer from rows (bi, ti) over the image tokens alone, per head [N, heads, n_img].

    Recomputed from the layer's input for those rows only (SDPA never materialises attention weights)."""
    layer = tm.layers[-1]
    att = layer.self_attn
    x = layer.input_layernorm(h_in)
    hd = att.head_dim
    cos, sin = tm.rotary_emb(x, pos[None].expand(x.shape[0], -1))
    q = att.q_proj(x[bi, ti]).view(len(bi), -1, hd)
    c, s_ = cos[bi, ti][:, None], sin[bi, ti][:, None]
    q = q * c + rotate_half(q) * s_
    xi = x[:, img_idx]
    k = att.k_proj(xi).view(x.shape[0], len(img_idx), -1, hd)
    c, s_ = cos[:, img_idx][:, :, None], sin[:, img_idx][:, :, None]
    k = k * c + rotate_half(k) * s_
    k = k[bi].repeat_interleave(q.shape[1] // k.shape[2], dim=2)  # GQA: [N, n_img, heads, hd]
    scores = torch.einsum("nhd,nihd->nhi", q, k) * att.scaling
    return scores.softmax(-1)
