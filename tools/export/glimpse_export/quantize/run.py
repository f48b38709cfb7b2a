"""``quantize`` command: convert each part to each mode, save, check, report."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import onnx

from ..common import ExportError, log
from ..manifest import read_manifest
from .check import self_check, summarize, vocab_size
from .convert import DEFAULT_PARTS, convert, file_bytes, op_types, save_model


def stage_stems(model_dir: Path) -> list[str]:
    """The staged vision encoder's files named by ``glimpse.json`` (``stages``; none without one)."""
    st = read_manifest(model_dir).get("stages") or {}
    if not st:
        return []
    return [st["embed"], *(b["stem"] for b in st["blocks"]), st["head"]]

# --------------------------------------------------------------------------------------------------------------- run
def _quiet_ort_logging() -> None:
    """onnxruntime.quantization sets the root logger to INFO and logs every node; keep warnings only."""
    import onnxruntime.quantization  # noqa: F401  (its import configures logging)
    from onnxruntime.quantization import matmul_nbits_quantizer  # noqa: F401

    logging.getLogger().setLevel(logging.WARNING)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("onnxruntime"):
            logging.getLogger(name).setLevel(logging.WARNING)


def run_quantize(model_dir: Path, modes: list[str], parts: list[str] | None, external: str = "auto",
                 check: bool = True) -> dict:
    _quiet_ort_logging()

    onnx_dir = model_dir / "onnx"
    if not onnx_dir.is_dir():
        raise ExportError(f"{onnx_dir} does not exist")
    # default: the three parts and the stage files (the same conversion for each: vision_blocks_0_fp16, ...)
    parts = list(parts or [p for p in (*DEFAULT_PARTS, *stage_stems(model_dir)) if (onnx_dir / f"{p}.onnx").exists()])
    stages = set(stage_stems(model_dir))
    encoder = onnx_dir / "vision_encoder.onnx"
    vocab = vocab_size(model_dir)
    report = {"model": str(model_dir), "modes": modes, "parts": parts, "results": []}
    failures = []
    with tempfile.TemporaryDirectory(prefix="glimpse-quant-") as td:
        for part in parts:
            src = onnx_dir / f"{part}.onnx"
            if not src.exists():
                raise ExportError(f"{src} does not exist")
            src_files = [src, *sorted(onnx_dir.glob(src.name + "_data*"))]
            src_ops = op_types(onnx.load(str(src), load_external_data=False))
            for mode in modes:
                t0 = time.perf_counter()
                dst = onnx_dir / f"{part}_{mode}.onnx"
                log(f"quantize: {src.name} -> {dst.name}")
                like = encoder if part in stages and encoder.exists() else None  # quantized: the encoder's type
                model, notes = convert(src, mode, Path(td), like)
                ops = op_types(model)
                files = save_model(model, dst, external)
                del model
                convert_s = time.perf_counter() - t0
                entry = {"part": part, "mode": mode, "file": dst.name, "files": [f.name for f in files],
                         "bytes": file_bytes(files), "fp32_bytes": file_bytes(src_files), **notes,
                         "convert_s": round(convert_s, 2),
                         "ops_added": sorted(set(ops) - set(src_ops)), "ops_removed": sorted(set(src_ops) - set(ops)),
                         "ops": ops}
                try:
                    onnx.checker.check_model(str(dst))
                    entry["onnx_checker"] = "ok"
                except Exception as e:  # noqa: BLE001
                    entry["onnx_checker"] = f"{type(e).__name__}: {str(e)[:300]}"
                    failures.append(f"{dst.name} (onnx.checker)")
                if check:
                    t1 = time.perf_counter()
                    entry["check"] = self_check(src, dst, part, vocab)
                    entry["check_s"] = round(time.perf_counter() - t1, 2)
                    log(f"  {entry['bytes']} bytes, +ops {entry['ops_added']}; {summarize(entry['check'])}")
                    for opt, c in entry["check"].items():
                        if "error" in c or not all(v.get("finite", False) for v in c.values()):
                            failures.append(f"{dst.name} ({opt})")
                # ORT's quantizers leave scratch files around; keep the temp dir small.
                for p in Path(td).iterdir():
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
                report["results"].append(entry)
    report["failures"] = failures
    return report


def print_table(report: dict) -> None:
    log(f"{'file':44s} {'bytes':>12s} {'fp32':>12s}  self-check")
    for e in report["results"]:
        chk = summarize(e["check"]) if "check" in e else "-"
        log(f"{e['file']:44s} {e['bytes']:12d} {e['fp32_bytes']:12d}  {chk}")
    if report["failures"]:
        log(f"FAILED: {', '.join(report['failures'])}")


def main(model: Path, to: list[str], parts: list[str] | None, external: str, check: bool, json_out: Path | None) -> int:
    t0 = time.perf_counter()
    report = run_quantize(model, to, parts, external, check)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    print_table(report)
    text = json.dumps(report, indent=1)
    if json_out:
        json_out.write_text(text)
    else:
        print(text)
    return 2 if report["failures"] else 0
