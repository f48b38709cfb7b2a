"""Real-size export: the three parts (one ``.onnx`` each, or ``.onnx`` + ``.onnx_data`` above the protobuf limit),
the staged vision encoder (``stages.py``), the folder files, ``glimpse.json`` and ``realsize_report.json``."""

from __future__ import annotations

import gc
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch

from ..common import REPO_ROOT, ExportError, Timer, log, seed_everything
from ..folder import save_folder, write_export_info
from ..manifest import default_parts, write_manifest
from ..onnx_parts import (
    EMBED_AXES,
    Decoder,
    EmbedTokens,
    decoder_io,
    decoder_trace_inputs,
    kv_shape,
    name_outputs,
    pin_output_dims,
    trace,
)
from ..stages import DEFAULT_GROUPS, export_stages
from .archs import ARCHS
from .build import build, param_counts
from .check import TOL, ort_check, torch_references

PROTOBUF_LIMIT = 2**31  # bytes: one serialized ONNX protobuf cannot exceed 2 GiB
GLIMPSE_NOTE = "random weights: for timing only, accuracy cannot be judged"


def _tensor_bytes(m) -> int:
    return sum(len(t.raw_data) for t in m.graph.initializer)


def export_part(module, args: tuple, path: Path, input_names, output_names, dynamic_axes,
                fixed_out_dims: dict | None = None) -> dict:
    """torch.onnx.export (legacy, opset 18) into a scratch folder, then one ``.onnx`` with its weights inside, or,
    above the protobuf limit, ``.onnx`` + ``.onnx_data`` (all tensors in one external file)."""
    t = Timer()
    scratch = Path(tempfile.mkdtemp(prefix=f".{path.stem}-", dir=path.parent))
    try:
        trace(module, args, scratch / path.name, input_names, output_names, dynamic_axes)
        trace_s = t()
        m = onnx.load(str(scratch / path.name), load_external_data=True)
        name_outputs(m, output_names)
        pin_output_dims(m, fixed_out_dims)
        got_in, got_out = [i.name for i in m.graph.input], [o.name for o in m.graph.output]
        if got_in != list(input_names) or got_out != list(output_names):
            raise ExportError(f"{path.name}: I/O {got_in} -> {got_out} != {list(input_names)} -> {list(output_names)}")
        data = path.with_name(path.name + "_data")
        for p in (path, data):
            if p.exists():
                p.unlink()
        weights = _tensor_bytes(m)
        external = weights + 64 * 2**20 >= PROTOBUF_LIMIT  # margin for the graph itself
        n_init = sum(int(np.prod(i.dims)) for i in m.graph.initializer)
        if external:
            onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data.name, size_threshold=1024)
        else:
            onnx.save_model(m, str(path))
        n_nodes = len(m.graph.node)
        del m
        gc.collect()
        onnx.checker.check_model(str(path))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    files = {p.name: p.stat().st_size for p in (path, data) if p.exists()}
    log(f"  wrote {files} ({n_nodes} nodes, {n_init} initializer values) in {t():.1f}s (trace {trace_s:.1f}s)")
    return {"files": files, "external_data": external, "initializer_values": n_init, "nodes": n_nodes,
            "seconds": round(t(), 1)}


def _default_out(arch: str) -> Path:
    return REPO_ROOT / "models" / "real" / arch


def run_realsize(arch: str, out: Path | None, seed: int = 0, threads: int = 2,
                 stage_groups: int = DEFAULT_GROUPS) -> dict:
    if arch not in ARCHS:
        raise SystemExit(f"unknown arch {arch!r} (expected one of {', '.join(ARCHS)})")
    a = ARCHS[arch]
    timer = Timer()
    out = (out or _default_out(arch)).resolve()
    log(f"[realsize] arch={arch} ({a['source']}) out={out} seed={seed}")
    out.mkdir(parents=True, exist_ok=True)
    if (out / "onnx").is_dir():
        shutil.rmtree(out / "onnx")
    onnx_dir = out / "onnx"
    onnx_dir.mkdir()
    seed_everything(seed)
    torch.set_num_threads(threads)

    bundle = build(arch, seed)
    model, spec = bundle.model, bundle.spec
    params = param_counts(bundle)
    log(f"[realsize] built in {timer():.1f}s; parameters {params}")
    save_folder(bundle, out)
    write_export_info(out, bundle)

    t = Timer()
    ref = torch_references(bundle, seed, a["ref_pixels"])
    torch_ref_s = round(t(), 1)
    log(f"[realsize] torch references in {torch_ref_s}s")

    parts = {}
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        vision = spec.vision_wrapper(model).eval()  # LLaVA-OneVision: crop features unpacked + image_newline
        inputs = spec.random_vision_inputs(g, a["trace_pixels"])
        args = tuple(inputs[n] for n in spec.vision_inputs)
        parts["vision_encoder"] = export_part(vision, args, onnx_dir / "vision_encoder.onnx", spec.vision_inputs,
                                              spec.vision_outputs, spec.vision_axes(("image_features",)),
                                              fixed_out_dims={"image_features": {1: bundle.extra["image_seq_len"]}})
        del vision
        gc.collect()

        # the staged vision encoder, checked against vision_encoder.onnx on the reference pixels (and the traced)
        stage_files: dict = {}

        def export_stage(module, stage_args, path, *rest, **kw):
            stage_files[path.stem] = export_part(module, stage_args, path, *rest, **kw)

        ref_args = tuple(torch.from_numpy(ref["vision_in"][n]) for n in spec.vision_inputs)
        stages, stage_check = export_stages(spec, model, onnx_dir, args, [ref_args, args],
                                            bundle.extra["image_seq_len"], stage_groups, exporter=export_stage,
                                            tol=TOL, threads=threads, seed=seed)
        parts.update(stage_files)
        del args, inputs, ref_args
        gc.collect()

        ids = torch.randint(0, len(bundle.tokenizer), (2, 7), generator=g)
        parts["embed_tokens"] = export_part(EmbedTokens(model).eval(), (ids,), onnx_dir / "embed_tokens.onnx",
                                            ["input_ids"], ["inputs_embeds"], EMBED_AXES)
        gc.collect()

        dec_args = decoder_trace_inputs(model, g, embed_scale=0.02)
        in_names, out_names, axes = decoder_io(kv_shape(model)[0])
        parts["decoder_model_merged"] = export_part(Decoder(model).eval(), dec_args,
                                                    onnx_dir / "decoder_model_merged.onnx", in_names, out_names, axes)
    export_s = round(timer(), 1)
    del model, bundle.model, dec_args
    bundle.model = None
    gc.collect()

    log(f"[realsize] exported in {export_s}s; onnxruntime self-check")
    check = ort_check(onnx_dir, ref, threads)
    diffs = {k: v for k, v in check.items() if k.endswith("_diff")}
    ok = all(v < TOL for v in diffs.values())

    export = {
        "realsize": True,
        "note": GLIMPSE_NOTE,
        "arch": arch,
        "architecture_of": a["source"],
        "model_type": bundle.family,
        "seed": seed,
    }
    write_manifest(out, parts=default_parts(), stages=stages, export=export)
    report = {
        "arch": arch,
        "out": str(out),
        "parameters": params,
        "parts": parts,
        "files": {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()},
        "self_check": check,
        "self_check_ok": ok,
        "stages_check": stage_check,
        "seconds": {"total": round(timer(), 1), "build_to_export_done": export_s, "torch_references": torch_ref_s,
                    "ort_check": check["seconds"]},
    }
    (out / "realsize_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if not ok:
        raise ExportError(f"{arch}: onnxruntime vs torch max abs diffs {diffs} (tolerance {TOL})")
    log(f"[realsize] done in {timer():.1f}s")
    return report
