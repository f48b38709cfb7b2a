"""Check a written compat folder with onnxruntime, reading only what the folder holds (config.json, processor files,
``onnx/*``): the greedy loop over the ONNX parts against transformers' ``generate``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..common import MAX_NEW_TOKENS, ExportError
from ..images import load_rgb
from ..ort_loop import OrtModel
from ..parity import FEATURE_TOL, LOGIT_TOL, maxdiff, messages, processor_inputs
from .styles import Style


def _features(m: OrtModel, bundle, case, newline) -> np.ndarray:
    pv = case.tensors["pixel_values"]
    if newline is None:
        return m.image_features(pv, case.tensors.get("pixel_attention_mask"))
    # LLaVA-OneVision without an image_newline output: crop features from the graph, packed with the config's vector
    (crops,) = m.sessions["vision_encoder"].run(["image_features"], {"pixel_values": pv.astype(np.float32)})
    return bundle.spec.packer(bundle.model, case.torch_inputs["image_sizes"])(crops, newline)


def _dynamic_hw(m: OrtModel, bundle) -> str:
    """The symbolic H, W are real: a 24 px tile (6x6 patches -> 2x2 tokens) against transformers."""
    g = torch.Generator().manual_seed(1)
    pv = torch.rand(1, 2, 3, 24, 24, generator=g) * 2 - 1
    pam = torch.ones(1, 2, 24, 24, dtype=torch.bool)
    with torch.no_grad():
        ref = torch.cat(list(bundle.model.model.get_image_features(pv, pam).pooler_output)).numpy()
    got = m.image_features(pv.numpy(), pam.numpy())
    d = maxdiff(got, ref)
    if not d < FEATURE_TOL:
        raise ExportError(f"vision_encoder on 24 px tiles differs from transformers by {d:g}")
    return f"24 px tiles (shape {list(got.shape)}) == transformers, diff {d:.1e}"


PAD = 3  # left-padding positions of the padded-batch check


def _padded_batch(m: OrtModel, bundle, ids: list[int], feats: np.ndarray) -> float:
    """Batch 2, the second row left-padded by PAD masked positions (HF position ids: cumsum - 1, 1 where masked):
    onnxruntime's last logits of both rows against the transformers text model on the same embeddings."""
    pad = bundle.model.config.text_config.pad_token_id or 0
    ids2 = np.asarray([ids, [pad] * PAD + ids[PAD:]], dtype=np.int64)
    mask = np.ones_like(ids2)
    mask[1, :PAD] = 0
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    pos[1, :PAD] = 1
    emb = m.splice(ids2, bundle.image_token_id, np.concatenate([feats, feats]))
    logits, _ = m.decode(emb, mask, pos, m.empty_past(2))
    with torch.no_grad():
        hid = bundle.spec.text_model(bundle.model)(inputs_embeds=torch.from_numpy(emb),
                                                   attention_mask=torch.from_numpy(mask),
                                                   position_ids=torch.from_numpy(pos), use_cache=False)
        ref = bundle.model.lm_head(hid.last_hidden_state).numpy()
    return maxdiff(logits[:, -1], ref[:, -1])


def verify(bundle, style: Style, out: Path, cases, decoders=None) -> dict:
    """Returns {"decoders": {stem: {"key", "ids": {case: ids}, "equal": bool}}, "lines": [...]}; raises ExportError
    where onnxruntime must reproduce transformers and does not."""
    cfg = json.loads((out / "config.json").read_text(encoding="utf-8"))
    newline = np.asarray(cfg["image_newline"], dtype=np.float32) if "image_newline" in cfg else None
    res = {"decoders": {}, "lines": []}
    for stem, key in decoders or style.decoders:
        m = OrtModel(out / "onnx", {"decoder_model_merged": stem})
        entry = {"key": key, "ids": {}, "equal": True}
        for c in cases:
            feats = _features(m, bundle, c, newline)
            r = m.greedy(c.input_ids, None, None, bundle.image_token_id, bundle.eos_token_ids, MAX_NEW_TOKENS,
                         features=feats)
            d_feat = maxdiff(feats, c.tensors["image_features"])
            d_log = maxdiff(r.first_logits, c.tensors["logits"])
            same = r.generated_ids == c.generated_ids
            entry["ids"][c.name] = r.generated_ids
            entry["equal"] &= same
            line = (f"{stem} {c.name}: ort {'==' if same else '!='} transformers ({len(r.generated_ids)} tokens), "
                    f"features diff {d_feat:.1e}, first logits diff {d_log:.1e}, min margin {min(r.margins):.3g}")
            if key is None:  # fp32 graph: must be exact
                if not same:
                    raise ExportError(f"{style.name} {line}: {r.generated_ids} != {c.generated_ids}")
                if not (d_feat < FEATURE_TOL and d_log < LOGIT_TOL):
                    raise ExportError(f"{style.name} {line}")
                ids2 = np.asarray([c.input_ids] * 2, dtype=np.int64)
                emb2 = m.splice(ids2, bundle.image_token_id, np.concatenate([feats] * 2))
                lg2, _ = m.decode(emb2, np.ones_like(ids2), np.tile(np.arange(ids2.shape[1]), (2, 1)),
                                  m.empty_past(2))
                d_b2 = max(maxdiff(lg2[i, -1], r.first_logits) for i in range(2))
                if not d_b2 < LOGIT_TOL:
                    raise ExportError(f"{style.name} {stem} {c.name}: batch-2 logits differ by {d_b2:g}")
                d_pad = _padded_batch(m, bundle, c.input_ids, feats)
                if not d_pad < LOGIT_TOL:
                    raise ExportError(f"{style.name} {stem} {c.name}: left-padded batch logits differ from "
                                      f"transformers by {d_pad:g}")
                line += f", batch-2 diff {d_b2:.1e}, left-padded batch vs transformers {d_pad:.1e}"
            res["lines"].append(line)
        res["decoders"][stem] = entry
        if style.exporter == "dynamic_hw":
            res["lines"].append(_dynamic_hw(m, bundle))
    # the folder's own processor files reproduce the fixtures' inputs
    reloaded = bundle.spec.load_processor(out)
    for c in cases:
        again = processor_inputs(reloaded, load_rgb(c.image_path),
                                 reloaded.apply_chat_template(messages(), add_generation_prompt=True))
        if again["input_ids"][0].tolist() != c.input_ids:
            raise ExportError(f"{style.name} {c.name}: processor reloaded from {out} gives different input_ids")
        if maxdiff(bundle.spec.encoder_pixels(again["pixel_values"]).numpy(), c.tensors["pixel_values"]) != 0.0:
            raise ExportError(f"{style.name} {c.name}: processor reloaded from {out} gives different pixel_values")
    res["lines"].append("processor reloaded from the folder: input_ids and pixel_values identical")
    return res
