"""The ORT-vs-transformers self-check shared by ``tiny`` and ``export-testbed``: one case = one picture with the
default prompt, computed with transformers (features, first logits, greedy ids), then replayed over the ONNX parts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .common import MAX_NEW_TOKENS, PROMPT, ExportError, seed_everything
from .families import Bundle
from .images import load_rgb
from .ort_loop import OrtModel

FEATURE_TOL = 1e-4
LOGIT_TOL = 1e-4
MARGIN_WARN = 1e-3


@dataclass
class CaseData:
    name: str
    image_path: Path
    prompt_text: str
    input_ids: list[int]
    generated_ids: list[int]
    layout: dict | None
    tensors: dict[str, np.ndarray]  # pixel_values, [pixel_attention_mask], image_features, logits
    torch_inputs: dict = field(default_factory=dict, repr=False)


def messages(prompt: str = PROMPT) -> list[dict]:
    """One user turn: the image, then the text."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]


def processor_inputs(processor, image, prompt_text: str) -> dict:
    return processor(images=[image], text=[prompt_text], return_tensors="pt")


def maxdiff(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()) if a.size else 0.0


@torch.no_grad()
def compute_case(bundle: Bundle, name: str, image_path: Path) -> CaseData:
    model, proc, spec = bundle.model, bundle.processor, bundle.spec
    image = load_rgb(image_path)
    prompt_text = proc.apply_chat_template(messages(), add_generation_prompt=True)
    inputs = processor_inputs(proc, image, prompt_text)
    input_ids = inputs["input_ids"]
    layout = spec.layout(proc, image)
    feats = spec.image_features(model, inputs)  # [n_image_tokens, hidden]: exactly what inputs_merger scatters
    n_img = int((input_ids == bundle.image_token_id).sum())
    if feats.shape[0] != n_img:
        raise ExportError(f"{name}: {feats.shape[0]} feature rows for {n_img} image tokens")
    logits = model(**inputs).logits[0, -1]
    seed_everything(bundle.seed)  # generate is greedy; reseed anyway so nothing depends on call order
    out = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    generated = out[0, input_ids.shape[1]:].tolist()
    tensors = {"pixel_values": spec.encoder_pixels(inputs["pixel_values"]).numpy()}
    if "pixel_attention_mask" in inputs:
        tensors["pixel_attention_mask"] = inputs["pixel_attention_mask"].numpy()
    tensors["image_features"] = feats.numpy()
    tensors["logits"] = logits.numpy()
    return CaseData(name, image_path, prompt_text, input_ids[0].tolist(), generated, layout, tensors, dict(inputs))


def self_check(bundle: Bundle, out: Path, cases: list[CaseData]) -> list[str]:
    """ORT greedy loop over the exported parts == torch generate; reloaded processor == processor."""
    report = []
    spec = bundle.spec
    ort_model = OrtModel(out / "onnx")
    reloaded = spec.load_processor(out)
    for c in cases:
        pam = c.tensors.get("pixel_attention_mask")
        pack = spec.packer(bundle.model, c.torch_inputs.get("image_sizes"))
        res = ort_model.greedy(c.input_ids, c.tensors["pixel_values"], pam, bundle.image_token_id,
                               bundle.eos_token_ids, MAX_NEW_TOKENS, pack=pack)
        d_feat = maxdiff(res.image_features, c.tensors["image_features"])
        d_log = maxdiff(res.first_logits, c.tensors["logits"])
        if res.generated_ids != c.generated_ids:
            raise ExportError(f"{c.name}: ORT greedy ids {res.generated_ids} != generate {c.generated_ids}")
        if not d_feat < FEATURE_TOL:
            raise ExportError(f"{c.name}: image_features max abs diff {d_feat:g} >= {FEATURE_TOL}")
        if not d_log < LOGIT_TOL:
            raise ExportError(f"{c.name}: first-step logits max abs diff {d_log:g} >= {LOGIT_TOL}")
        # batch 2 through embed + decoder (the prompt twice) must match batch 1
        ids2 = np.asarray([c.input_ids] * 2, dtype=np.int64)
        feats2 = np.concatenate([res.image_features] * 2)
        emb2 = ort_model.splice(ids2, bundle.image_token_id, feats2)
        lg2, _ = ort_model.decode(emb2, np.ones_like(ids2), np.tile(np.arange(ids2.shape[1]), (2, 1)),
                                  ort_model.empty_past(2))
        d_b2 = max(maxdiff(lg2[0, -1], res.first_logits), maxdiff(lg2[1, -1], res.first_logits))
        if not d_b2 < LOGIT_TOL:
            raise ExportError(f"{c.name}: batch-2 decoder logits differ from batch 1 by {d_b2:g}")
        # the saved folder reproduces the processor output
        again = processor_inputs(reloaded, load_rgb(c.image_path),
                                 reloaded.apply_chat_template(messages(), add_generation_prompt=True))
        if again["input_ids"][0].tolist() != c.input_ids:
            raise ExportError(f"{c.name}: processor reloaded from {out} gives different input_ids")
        if maxdiff(spec.encoder_pixels(again["pixel_values"]).numpy(), c.tensors["pixel_values"]) != 0.0:
            raise ExportError(f"{c.name}: processor reloaded from {out} gives different pixel_values")
        eos_hit = any(t in bundle.eos_token_ids for t in c.generated_ids)
        min_margin = min(res.margins)
        line = (f"{c.name}: ORT greedy == generate ({len(res.generated_ids)} tokens{', EOS hit' if eos_hit else ''}),"
                f" features diff {d_feat:.2e}, logits diff {d_log:.2e}, batch-2 diff {d_b2:.2e},"
                f" min top1-top2 margin {min_margin:.3g}")
        if min_margin < MARGIN_WARN:
            line += "  WARNING: small greedy margin"
        report.append(line)
    return report
