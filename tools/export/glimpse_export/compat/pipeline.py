"""The ``compat`` command: for each style build, save, export, check with onnxruntime, write fixtures and README."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import onnx

from ..common import REPO_ROOT, ExportError, Timer, log, seed_everything
from ..folder import write_export_info
from ..images import IMAGE_SIZES, pixels_equal, write_images
from ..parity import compute_case
from ..tiny.fixtures import case_json, write_fixtures
from . import styles as styles_mod
from .build import build, save_hf_files
from .export import export_style, finalize_style
from .readme import write_index, write_readme
from .verify import verify

MAX_FOLDER_BYTES = 2 * 1024 * 1024
EXPORTERS = {
    "plain": "torch.onnx.export(dynamo=False) of the plain HF modules, no post-processing",
    "legacy": "glimpse_export onnx_parts (torch.onnx.export(dynamo=False, dynamic_axes))",
    "dynamic_hw": "glimpse_export onnx_parts, vision with symbolic height / width",
    "dynamo": "torch.onnx.export(dynamo=True)",
    "external": "glimpse_export onnx_parts, then onnx.save_model(save_as_external_data=True, size_threshold=0)",
    "decoder_variants": "glimpse_export onnx_parts, then quantize.convert int8 / fp16 of the decoder only",
    "onevision_plain": "glimpse_export onnx_parts, vision = SigLIP tower + projector only",
}


def _images(root: Path) -> dict[str, Path]:
    """The shared test pictures under models/images (written only if missing; they are committed)."""
    images_dir = root.parent / "images"
    paths = {name: images_dir / f"{name}.png" for name in IMAGE_SIZES}
    if not all(p.exists() for p in paths.values()):
        write_images(images_dir)
    for name, p in paths.items():
        if not pixels_equal(p, name):
            raise ExportError(f"{p} is not the committed test image {name!r}")
    return paths


def _file_bytes(path: Path) -> int:
    """Sum of the file sizes (recorded in the READMEs: unlike du, independent of the file system)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _du(path: Path) -> int:
    """What `du -sb` reports (directories included); the 2 MB limit is checked on it."""
    try:
        return int(subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True)
                   .stdout.split()[0])
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
        return _file_bytes(path)


def _case_json(c, fx: Path, ort_ids: dict) -> dict:
    sizes = {"image_sizes": c.torch_inputs["image_sizes"].tolist()} if "image_sizes" in c.torch_inputs else {}
    return case_json(c, fx, after_ids={key: ids[c.name] for key, ids in ort_ids.items()}, after_layout=sizes)


def run_style(style, root: Path, images: dict[str, Path]) -> dict:
    timer = Timer()
    out = root / style.name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    log(f"[compat] {style.name}: building {style.family} (seed {style.seed})")
    seed_everything(style.seed)
    bundle = build(style)
    save_hf_files(bundle, style, out)
    cases = [compute_case(bundle, name, path) for name, path in images.items()]
    notes = export_style(bundle, style, out / "onnx", cases[0].torch_inputs)
    lines = []
    if style.exporter == "decoder_variants":  # the fp32 decoder must be exact before it is replaced
        lines += verify(bundle, style, out, cases, decoders=(("decoder_model_merged", None),))["lines"]
    notes.update(finalize_style(style, out / "onnx"))
    res = verify(bundle, style, out, cases)
    lines += res["lines"]
    ort_ids = {e["key"]: e["ids"] for e in res["decoders"].values() if e["key"]}
    fx = out / "fixtures"
    fx.mkdir()
    write_fixtures(fx, bundle.family, [_case_json(c, fx, ort_ids) for c in cases])
    write_export_info(out, bundle)
    equal = "yes" if all(e["equal"] for e in res["decoders"].values()) else ", ".join(
        f"{stem.rsplit('_', 1)[1]}: {'yes' if e['equal'] else 'no'}" for stem, e in res["decoders"].items())
    if style.exporter == "decoder_variants":
        equal = f"fp32: yes (checked, then removed); {equal}"
    info_path = out / "export_info.json"
    info = json.loads(info_path.read_text(encoding="utf-8"))
    info["exporter"] = EXPORTERS[style.exporter]
    info["opset"] = {p.stem: next(o.version for o in onnx.load(str(p), load_external_data=False).opset_import
                                  if o.domain in ("", "ai.onnx"))
                     for p in sorted((out / "onnx").glob("*.onnx"))}
    info["compat"] = {"style": style.name, "summary": style.summary, "ort_equals_transformers": equal,
                      "notes": notes}
    info_path.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    write_readme(out, style, notes, lines)
    size, du = _file_bytes(out), _du(out)
    for line in lines:
        log(f"[compat]   {line}")
    log(f"[compat] {style.name}: {size} bytes in files, du -sb {du}, {timer():.1f}s")
    if max(size, du) > MAX_FOLDER_BYTES:
        raise ExportError(f"{out} is {max(size, du)} bytes (> {MAX_FOLDER_BYTES})")
    return {"name": style.name, "family": bundle.family, "summary": style.summary, "bytes": size, "du": du,
            "equal": equal}


def index_rows(root: Path) -> list[dict]:
    rows = []
    for style in styles_mod.STYLES:
        info_path = root / style.name / "export_info.json"
        if info_path.exists():
            info = json.loads(info_path.read_text(encoding="utf-8"))
            rows.append({"name": style.name, "family": info["family"], "summary": style.summary,
                         "bytes": _file_bytes(root / style.name), "equal": info["compat"]["ort_equals_transformers"]})
    return rows


def run_compat(out: Path | None, only: list[str] | None) -> list[dict]:
    root = (out or REPO_ROOT / "models" / "compat").resolve()
    root.mkdir(parents=True, exist_ok=True)
    images = _images(root)
    done = [run_style(style, root, images) for style in styles_mod.get(only)]
    write_index(root, index_rows(root))
    return done
