"""The ``tiny`` command: build, save, export, self-check and write fixtures for one tiny model."""

from __future__ import annotations

import shutil
from pathlib import Path

from .. import families
from ..common import REPO_ROOT, Timer, log, seed_everything
from ..folder import save_folder, write_export_info
from ..images import write_images
from ..manifest import MANIFEST, default_parts, write_manifest
from ..onnx_parts import export_all
from ..parity import compute_case, self_check
from ..stages import DEFAULT_GROUPS, export_stages
from .fixtures import case_json, write_fixtures

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
    MANIFEST,
)
REPO_IMAGES = REPO_ROOT / "models" / "images"


def _clean_out(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("onnx", "fixtures"):
        if (out / sub).is_dir():
            shutil.rmtree(out / sub)
    for f in MODEL_FILES:
        if (out / f).exists():
            (out / f).unlink()


def run_tiny(family: str, out: Path, seed: int, images_dir: Path | None = None,
             stage_groups: int = DEFAULT_GROUPS) -> dict:
    timer = Timer()
    spec = families.get(family)
    out = out.resolve()
    images_dir = (images_dir or out.parent / "images").resolve()
    log(f"[tiny] family={spec.family} out={out} images={images_dir} seed={seed}")
    _clean_out(out)
    image_paths = write_images(images_dir)
    for name in spec.tiny_extra_images:  # committed pictures (copied when exporting elsewhere)
        path = images_dir / f"{name}.png"
        if not path.exists():
            shutil.copy(REPO_IMAGES / f"{name}.png", path)
        image_paths = {**image_paths, name: path}

    seed_everything(seed)
    bundle = spec.build_tiny(seed)
    save_folder(bundle, out)

    cases = [compute_case(bundle, name, path) for name, path in image_paths.items()]
    log(f"[tiny] built model + {len(cases)} cases in {timer():.1f}s; exporting ONNX")
    export_all(bundle, out / "onnx", cases[0].torch_inputs)
    log(f"[tiny] exported in {timer():.1f}s; self-checking with onnxruntime")
    report = self_check(bundle, out, cases)
    stages, stage_report = export_stages(spec, bundle.model, out / "onnx", spec.vision_trace_args(cases[0].torch_inputs),
                                         [spec.vision_args(c.torch_inputs) for c in cases],
                                         bundle.extra["image_seq_len"], stage_groups)
    for c, row in zip(cases, stage_report["chain_vs_monolithic"]):
        report.append(f"{c.name}: staged vision chain vs vision_encoder.onnx max abs diff "
                      + ", ".join(f"{k} {v:.3g}" for k, v in row.items()))
    write_manifest(out, parts=default_parts(), stages=stages, export={})

    fx = out / "fixtures"
    fx.mkdir(parents=True, exist_ok=True)
    write_fixtures(fx, spec.family, [case_json(c, fx) for c in cases])
    write_export_info(out, bundle)
    for line in report:
        log(f"[tiny]   {line}")
    log(f"[tiny] done in {timer():.1f}s")
    return {"bundle": bundle, "cases": cases, "report": report, "stages": stage_report, "seconds": timer()}
