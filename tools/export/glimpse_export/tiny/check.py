"""The ``check`` command: regenerate into a temp dir and compare with a committed model folder."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from PIL import Image

from .. import families
from ..common import DEFAULT_SEED, Timer
from ..images import IMAGE_SIZES, pixels_equal
from ..manifest import MANIFEST, read_manifest
from ..ort_loop import OrtModel
from ..parity import FEATURE_TOL, LOGIT_TOL, maxdiff
from ..stages import CHAIN_TOL, DEFAULT_GROUPS, build_stages, chain_vs_monolithic, check_fewer_tokens
from .fixtures import read_fixtures, read_tensor
from .pipeline import run_tiny

PIXEL_TOL = 1e-6
JSON_FILES = ("config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json",
              "tokenizer.json", "tokenizer_config.json", MANIFEST)
TEXT_FILES = ("chat_template.jinja",)


class Report:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.failures = 0

    def ok(self, msg: str) -> None:
        self.lines.append(f"  ok    {msg}")

    def fail(self, msg: str) -> None:
        self.failures += 1
        self.lines.append(f"  FAIL  {msg}")

    def expect(self, cond: bool, msg: str) -> None:
        (self.ok if cond else self.fail)(msg)


def _diff(rep: Report, what: str, a: np.ndarray, b: np.ndarray, tol: float) -> None:
    d = maxdiff(a, b)
    shape = "" if a.shape == b.shape else f" (shape {list(a.shape)} vs {list(b.shape)})"
    rep.expect(d < tol, f"{what}: max abs diff {d:.2e} < {tol:g}{shape}")


def run_check(model_dir: Path, seed: int | None = None) -> int:
    timer = Timer()
    model_dir = model_dir.resolve()
    fx_dir = model_dir / "fixtures"
    committed = read_fixtures(fx_dir)
    family = committed["family"]
    info_path = model_dir / "export_info.json"
    if seed is None:
        seed = json.loads(info_path.read_text())["seed"] if info_path.exists() else DEFAULT_SEED
    rep = Report()
    rep.lines.append(f"check {model_dir} (family {family}, seed {seed})")

    # ---- folder hygiene
    rep.expect(not any(model_dir.glob("*.safetensors")), "no safetensors weights in the folder")
    for part in ("vision_encoder", "embed_tokens", "decoder_model_merged"):
        p = model_dir / "onnx" / f"{part}.onnx"
        if not p.exists():
            rep.fail(f"missing onnx/{part}.onnx")
            continue
        m = onnx.load(str(p), load_external_data=False)
        ext = [i.name for i in m.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
        rep.expect(not ext, f"onnx/{part}.onnx is self-contained ({p.stat().st_size} bytes)")

    # ---- committed ONNX reproduces committed fixtures
    ort_model = OrtModel(model_dir / "onnx")
    cfg = json.loads((model_dir / "config.json").read_text())
    gen = json.loads((model_dir / "generation_config.json").read_text())
    image_token_id = cfg.get("image_token_id", cfg.get("image_token_index"))
    eos = gen["eos_token_id"]
    eos = eos if isinstance(eos, list) else [eos]
    spec = families.get(family)
    # packing the crop features (LLaVA-OneVision) needs the model's pack_image_features; the stage check its modules
    bundle = spec.build_tiny(seed)
    vision_feeds = []
    for case in committed["cases"]:
        t = case["tensors"]
        pv = read_tensor(fx_dir, t["pixel_values"])
        pam = read_tensor(fx_dir, t["pixel_attention_mask"]) if "pixel_attention_mask" in t else None
        feeds = {"pixel_values": pv.astype(np.float32)}
        if "pixel_attention_mask" in spec.vision_inputs:
            feeds["pixel_attention_mask"] = pam.astype(bool)
        vision_feeds.append(feeds)
        pack = None
        if spec.packs_features:
            with Image.open(fx_dir / case["image"]) as im:
                pack = spec.packer(bundle.model, torch.tensor([[im.height, im.width]]))
        res = ort_model.greedy(case["input_ids"], pv, pam, image_token_id, eos, case["max_new_tokens"], pack=pack)
        name = f"{case['name']} (committed onnx)"
        _diff(rep, f"{name} image_features", res.image_features, read_tensor(fx_dir, t["image_features"]), FEATURE_TOL)
        _diff(rep, f"{name} logits", res.first_logits, read_tensor(fx_dir, t["logits"]), LOGIT_TOL)
        rep.expect(res.generated_ids == case["generated_ids"], f"{name} greedy ids == fixture generated_ids")

    # ---- committed stage files: embed -> blocks (attention_bias 0) -> head == committed vision_encoder.onnx
    _check_stages(rep, model_dir, spec, bundle, committed["cases"], vision_feeds)

    # ---- regenerate and compare
    with tempfile.TemporaryDirectory(prefix="glimpse-check-") as tmp:
        tmp = Path(tmp)
        fresh_dir = tmp / model_dir.name
        try:
            groups = len((read_manifest(model_dir).get("stages") or {}).get("blocks") or []) or DEFAULT_GROUPS
            run_tiny(family, fresh_dir, seed, images_dir=tmp / "images", stage_groups=groups)
        except Exception as e:  # the self-check of the fresh export failed
            rep.fail(f"re-export failed: {type(e).__name__}: {e}")
            return _finish(rep, timer)
        rep.ok("re-export into a temp dir passed its own self-check")
        fresh = read_fixtures(fresh_dir / "fixtures")
        rep.expect(fresh["family"] == family, f"family {fresh['family']} == {family}")

        for name in IMAGE_SIZES:
            img = (fx_dir / next((c["image"] for c in committed["cases"] if c["name"] == name), f"../../images/{name}.png"))
            rep.expect(img.exists() and pixels_equal(img, name), f"committed image {img.name} == regenerated pixels")

        for f in JSON_FILES:
            a, b = model_dir / f, fresh_dir / f
            same = a.exists() and b.exists() and json.loads(a.read_text()) == json.loads(b.read_text())
            rep.expect(same, f"{f} equal to a fresh export")
        for f in TEXT_FILES:
            a, b = model_dir / f, fresh_dir / f
            rep.expect(a.exists() == b.exists() and (not a.exists() or a.read_text() == b.read_text()),
                       f"{f} equal to a fresh export")

        fresh_cases = {c["name"]: c for c in fresh["cases"]}
        ffx = fresh_dir / "fixtures"
        rep.expect([c["name"] for c in committed["cases"]] == [c["name"] for c in fresh["cases"]], "same case names")
        for case in committed["cases"]:
            new = fresh_cases.get(case["name"])
            if new is None:
                continue
            n = case["name"]
            for key in ("image", "prompt", "prompt_text", "layout", "max_new_tokens"):
                rep.expect(case[key] == new[key], f"{n} {key} equal")
            rep.expect(case["input_ids"] == new["input_ids"], f"{n} input_ids equal ({len(case['input_ids'])} ids)")
            rep.expect(case["generated_ids"] == new["generated_ids"], f"{n} generated_ids equal")
            t, u = case["tensors"], new["tensors"]
            rep.expect(sorted(t) == sorted(u), f"{n} tensor set equal")
            for key, tol in (("pixel_values", PIXEL_TOL), ("image_features", FEATURE_TOL), ("logits", LOGIT_TOL)):
                if key in t and key in u:
                    _diff(rep, f"{n} {key}", read_tensor(fx_dir, t[key]), read_tensor(ffx, u[key]), tol)
            if "pixel_attention_mask" in t and "pixel_attention_mask" in u:
                a, b = read_tensor(fx_dir, t["pixel_attention_mask"]), read_tensor(ffx, u["pixel_attention_mask"])
                rep.expect(a.shape == b.shape and np.array_equal(a, b), f"{n} pixel_attention_mask equal")
    return _finish(rep, timer)


def _check_stages(rep: Report, model_dir: Path, spec, bundle, cases: list[dict], feeds: list[dict]) -> None:
    stages = read_manifest(model_dir).get("stages")
    if not stages:
        rep.fail(f"{MANIFEST} has no stages")
        return
    if "pixel_attention_mask" in spec.vision_inputs:  # the staged form has no patch mask (docs/stages.md)
        for case, f in zip(cases, feeds):
            rep.expect(bool(f["pixel_attention_mask"].all()), f"{case['name']} every patch valid (staged form)")
    try:
        rows = chain_vs_monolithic(model_dir / "onnx", stages, feeds)
    except Exception as e:  # noqa: BLE001  (a stage file missing or refused by onnxruntime)
        rep.fail(f"staged chain: {type(e).__name__}: {e}")
        return
    for case, row in zip(cases, rows):
        for name, d in row.items():
            rep.expect(d <= CHAIN_TOL, f"{case['name']} staged chain vs vision_encoder.onnx {name}: max abs diff "
                                       f"{d:.2e} <= {CHAIN_TOL:g}")
    groups = len(stages["blocks"])
    _, blocks, _, ranges = build_stages(spec, bundle.model, groups)
    rep.expect([list(r) for r in ranges] == [b["layers"] for b in stages["blocks"]],
               f"stage layers {[b['layers'] for b in stages['blocks']]} == the model's {groups} groups")
    try:
        fewer = check_fewer_tokens(model_dir / "onnx", stages, blocks, feeds[0], torch.Generator().manual_seed(0))
        for r in fewer:
            rep.ok(f"{r['stem']} on {r['tokens'][1]} of {r['tokens'][0]} tokens (log-size bias) == torch: max abs "
                   f"diff {r['max_abs_diff']:.2e}")
    except Exception as e:  # noqa: BLE001  (reported as a mismatch)
        rep.fail(f"fewer-tokens stage check: {type(e).__name__}: {e}")


def _finish(rep: Report, timer: Timer) -> int:
    verdict = "PASS" if rep.failures == 0 else f"FAIL ({rep.failures} mismatches)"
    print("\n".join(rep.lines))
    print(f"{verdict} in {timer():.1f}s")
    return 0 if rep.failures == 0 else 1
