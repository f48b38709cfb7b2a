"""The ``tiny`` command: build, save, export, self-check and write fixtures for one tiny model."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .common import MAX_NEW_TOKENS, OPSET, PROMPT, ExportError, Timer, log, seed_everything
from .families import Bundle, build, canonical_family
from .fixtures import write_fixtures, write_tensor
from .images import IMAGE_SIZES, load_rgb, write_images
from .onnx_parts import export_all
from .ort_loop import OrtModel

MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "special_tokens_map.json",
    "model.safetensors",
    "export_info.json",
)
REPO_IMAGES = Path(__file__).resolve().parents[3] / "models" / "images"
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
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]


def processor_inputs(bundle: Bundle, processor, image, prompt_text: str) -> dict:
    return processor(images=[image], text=[prompt_text], return_tensors="pt")


@torch.no_grad()
def compute_case(bundle: Bundle, name: str, image_path: Path) -> CaseData:
    model, proc = bundle.model, bundle.processor
    image = load_rgb(image_path)
    prompt_text = proc.apply_chat_template(messages(), add_generation_prompt=True)
    inputs = processor_inputs(bundle, proc, image, prompt_text)
    input_ids = inputs["input_ids"]
    if bundle.family == "idefics3":
        info = proc.image_processor(images=[[image]], return_row_col_info=True)
        layout = {"rows": int(info["rows"][0][0]), "cols": int(info["cols"][0][0])}
        feats = model.model.get_image_features(inputs["pixel_values"], inputs["pixel_attention_mask"]).pooler_output
    elif bundle.family == "llava_onevision":
        layout = None
        feats = model.model.get_image_features(
            pixel_values=inputs["pixel_values"],
            image_sizes=inputs["image_sizes"],
            vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
            vision_aspect_ratio=model.config.vision_aspect_ratio,
            batch_num_images=inputs["batch_num_images"],
        ).pooler_output
    else:
        layout = None
        feats = model.model.get_image_features(
            pixel_values=inputs["pixel_values"],
            vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        ).pooler_output
    feats = torch.cat(list(feats), dim=0)  # [n_image_tokens, hidden]: exactly what inputs_merger scatters
    n_img = int((input_ids == bundle.image_token_id).sum())
    if feats.shape[0] != n_img:
        raise ExportError(f"{name}: {feats.shape[0]} feature rows for {n_img} image tokens")
    logits = model(**inputs).logits[0, -1]
    seed_everything(bundle.seed)  # generate is greedy; reseed anyway so nothing depends on call order
    out = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    generated = out[0, input_ids.shape[1]:].tolist()
    pixel_values = inputs["pixel_values"]
    if bundle.family == "llava_onevision":
        pixel_values = pixel_values[0]  # the encoder takes the crops as its batch: [crops, 3, H, W]
    tensors = {"pixel_values": pixel_values.numpy()}
    if "pixel_attention_mask" in inputs:
        tensors["pixel_attention_mask"] = inputs["pixel_attention_mask"].numpy()
    tensors["image_features"] = feats.numpy()
    tensors["logits"] = logits.numpy()
    return CaseData(name, image_path, prompt_text, input_ids[0].tolist(), generated, layout, tensors, dict(inputs))


def _clean_out(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("onnx", "fixtures"):
        if (out / sub).is_dir():
            shutil.rmtree(out / sub)
    for f in MODEL_FILES:
        if (out / f).exists():
            (out / f).unlink()


def save_folder(bundle: Bundle, out: Path) -> None:
    proc = bundle.processor
    proc.save_pretrained(str(out))
    # transformers 5 nests the image processor in processor_config.json; also write the classic standalone file
    proc.image_processor.save_pretrained(str(out))
    cfg = bundle.model.config
    cfg.architectures = [type(bundle.model).__name__]
    cfg.save_pretrained(str(out))
    bundle.model.generation_config.save_pretrained(str(out))
    # A Rust reader can always find the template in tokenizer_config.json
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text(encoding="utf-8"))
    tc["chat_template"] = bundle.chat_template
    tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")
    if (out / "model.safetensors").exists():
        (out / "model.safetensors").unlink()


def _maxdiff(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()) if a.size else 0.0


def reload_processor(bundle: Bundle, out: Path):
    if bundle.family == "llava_onevision":
        from .families import OnevisionProcessor

        return OnevisionProcessor.from_pretrained(str(out))
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(out))


def onevision_packer(bundle: Bundle, image_sizes):
    """transformers' ``pack_image_features`` applied to the ONNX encoder's crop features and newline vector."""
    model = bundle.model

    def pack(feats: np.ndarray, newline: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            packed, _ = model.model.pack_image_features(
                [torch.from_numpy(feats)], image_sizes, image_newline=torch.from_numpy(newline),
                vision_aspect_ratio=model.config.vision_aspect_ratio)
        return packed[0].numpy()

    return pack


def self_check(bundle: Bundle, out: Path, cases: list[CaseData]) -> list[str]:
    """ORT greedy loop over the exported parts == torch generate; reloaded processor == processor."""
    report = []
    ort_model = OrtModel(out / "onnx")
    reloaded = reload_processor(bundle, out)
    for c in cases:
        pam = c.tensors.get("pixel_attention_mask")
        pack = onevision_packer(bundle, c.torch_inputs["image_sizes"]) if bundle.family == "llava_onevision" else None
        res = ort_model.greedy(c.input_ids, c.tensors["pixel_values"], pam, bundle.image_token_id,
                               bundle.eos_token_ids, MAX_NEW_TOKENS, pack=pack)
        d_feat = _maxdiff(res.image_features, c.tensors["image_features"])
        d_log = _maxdiff(res.first_logits, c.tensors["logits"])
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
        d_b2 = max(_maxdiff(lg2[0, -1], res.first_logits), _maxdiff(lg2[1, -1], res.first_logits))
        if not d_b2 < LOGIT_TOL:
            raise ExportError(f"{c.name}: batch-2 decoder logits differ from batch 1 by {d_b2:g}")
        # the saved folder reproduces the processor output
        again = processor_inputs(bundle, reloaded, load_rgb(c.image_path),
                                 reloaded.apply_chat_template(messages(), add_generation_prompt=True))
        if again["input_ids"][0].tolist() != c.input_ids:
            raise ExportError(f"{c.name}: processor reloaded from {out} gives different input_ids")
        again_pv = again["pixel_values"][0] if bundle.family == "llava_onevision" else again["pixel_values"]
        if _maxdiff(again_pv.numpy(), c.tensors["pixel_values"]) != 0.0:
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


def run_tiny(family: str, out: Path, seed: int, images_dir: Path | None = None) -> dict:
    timer = Timer()
    family = canonical_family(family)
    out = out.resolve()
    images_dir = (images_dir or out.parent / "images").resolve()
    log(f"[tiny] family={family} out={out} images={images_dir} seed={seed}")
    _clean_out(out)
    image_paths = write_images(images_dir)
    if family == "llava_onevision":
        # a 256 px picture: 4 x 4 crops, which takes the anyres_max_9 downsampling path (the testbed scene
        # committed under models/images; copied when exporting elsewhere)
        scene = images_dir / "scene.png"
        if not scene.exists():
            shutil.copy(REPO_IMAGES / "scene.png", scene)
        image_paths = {**image_paths, "scene": scene}

    seed_everything(seed)
    bundle = build(family, seed)
    save_folder(bundle, out)

    cases = [compute_case(bundle, name, path) for name, path in image_paths.items()]
    log(f"[tiny] built model + {len(cases)} cases in {timer():.1f}s; exporting ONNX")
    export_all(bundle, out / "onnx", cases[0].torch_inputs)
    log(f"[tiny] exported in {timer():.1f}s; self-checking with onnxruntime")
    report = self_check(bundle, out, cases)

    fx = out / "fixtures"
    fx.mkdir(parents=True, exist_ok=True)
    jcases = []
    for c in cases:
        tensors = {}
        for key in ("pixel_values", "pixel_attention_mask", "image_features", "logits"):
            if key in c.tensors:
                dtype = "u8" if key == "pixel_attention_mask" else "f32"
                tensors[key] = write_tensor(fx, f"{c.name}.{key}.bin", c.tensors[key], dtype)
        jcases.append({
            "name": c.name,
            "image": os.path.relpath(c.image_path, fx).replace(os.sep, "/"),
            "prompt": PROMPT,
            "prompt_text": c.prompt_text,
            "input_ids": c.input_ids,
            "generated_ids": c.generated_ids,
            "max_new_tokens": MAX_NEW_TOKENS,
            "layout": c.layout,
            "tensors": tensors,
        })
    write_fixtures(fx, family, jcases)
    write_export_info(out, bundle)
    for line in report:
        log(f"[tiny]   {line}")
    log(f"[tiny] done in {timer():.1f}s")
    return {"bundle": bundle, "cases": cases, "report": report, "seconds": timer()}


def write_export_info(out: Path, bundle: Bundle) -> None:
    import onnx
    import onnxruntime
    import tokenizers
    import transformers

    info = {
        "tool": f"glimpse_export {__version__}",
        "family": bundle.family,
        "seed": bundle.seed,
        "opset": OPSET,
        "exporter": "torch.onnx.export(dynamo=False, dynamic_axes)",
        "max_new_tokens": MAX_NEW_TOKENS,
        "versions": {
            "torch": torch.__version__.split("+")[0],
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
    }
    (out / "export_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
