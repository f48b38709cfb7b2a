"""The ``train`` and ``snapshot`` commands: build, stage 1 (vision encoder alone, dense heads), stage 1b (views
holding the number), stage 2 (``stage2``), save."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from ..common import ExportError, log, seed_everything
from ..families import Bundle
from .config import TRAIN_SEED_BASE
from .data import Prep, Prompts, encode_pool, scene_batch
from .losses import aux_loss
from .model import AuxHeads, build_testbed, folder_checkpoint, new_heads, reinit_text, save_trained, vision_from_llava
from .model import center_projector as _center_projector
from .model import vision_params
from .optim import lr_at, optimizer_step
from .stage2 import train_stage2, train_stage2_pool


def train_stage1(bundle: Bundle, heads: AuxHeads, steps: int, batch: int, lr: float, log_every=50) -> dict:
    prep = Prep(bundle)
    params = vision_params(bundle) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    t0 = time.perf_counter()
    hist = []
    for step in range(steps):
        seeds = [TRAIN_SEED_BASE[1] + step * batch + i for i in range(batch)]
        pv, lab, _ = scene_batch(bundle, prep, seeds)
        hid, pooled = bundle.spec.vision_hidden(bundle.model, pv)
        loss, m = aux_loss(heads, hid, pooled, lab, bundle.spec)
        optimizer_step(opt, loss, params, lr_at(step, steps, lr))
        hist.append((float(loss.detach()), m["fg_colour_acc"], m["digit_acc"]))
        if step % log_every == 0 or step == steps - 1:
            h = np.asarray(hist[-log_every:])
            log(f"[stage1 {bundle.extra['testbed']}] step {step}/{steps} loss {h[:, 0].mean():.4f} fg-colour "
                f"{h[:, 1].mean():.3f} digit {h[:, 2].mean():.3f} ({time.perf_counter() - t0:.0f}s)")
    return {"steps": steps, "batch_images": batch, "seconds": time.perf_counter() - t0,
            "final_loss": float(np.mean([h[0] for h in hist[-50:]]))}


def train_digits(bundle: Bundle, heads: AuxHeads, steps: int, batch: int, lr: float = 1e-3, log_every=50,
                 shape_weight: float = 1.0, count_weight: float = 0.0, shape_global: bool = False) -> dict:
    """Stage 1b: dense supervision on the view holding the number plus one random other view per picture.

    The number is one small object per picture (one view in five for SmolVLM), so plain stage 1 sees few digits.
    LLaVA has one view: these are plain stage-1 steps (``shape_weight`` > 1 stresses the shape head).
    ``count_weight``: weight of the per-patch counting head (views of the whole picture only: LLaVA's view,
    SmolVLM's global view), so that the tokens of an object also say how many objects share its shape.
    ``shape_global``: shape targets on the global view only (see `scene_batch`), which is then always the second
    view of each picture."""
    prep = Prep(bundle)
    params = vision_params(bundle) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    nv = len(prep.view_regions())
    rng = np.random.default_rng([bundle.seed, 3])
    t0 = time.perf_counter()
    hist = []
    for step in range(steps):
        seeds = [TRAIN_SEED_BASE[3] + step * batch + i for i in range(batch)]
        pv, lab, scs = scene_batch(bundle, prep, seeds, shape_global)
        sel = []
        for i, sc in enumerate(scs):
            q = sc.number_quadrant if nv > 1 else 0
            sel.append(i * nv + q)
            if nv > 1:
                sel.append(i * nv + (nv - 1 if shape_global else int((q + 1 + rng.integers(nv - 1)) % nv)))
        sel = torch.tensor(sel)
        hid, pooled = bundle.spec.vision_hidden(bundle.model, pv[sel])
        loss, m = aux_loss(heads, hid, pooled, {k: v[sel] for k, v in lab.items()}, bundle.spec, shape_weight,
                           count_weight)
        optimizer_step(opt, loss, params, lr_at(step, steps, lr, warm=20))
        hist.append((float(loss.detach()), m["fg_colour_acc"], m["digit_acc"], m["fg_shape_acc"], m["fg_count_acc"]))
        if step % log_every == 0 or step == steps - 1:
            h = np.asarray(hist[-log_every:])
            log(f"[stage1b {bundle.extra['testbed']}] step {step}/{steps} loss {h[:, 0].mean():.4f} fg-colour "
                f"{h[:, 1].mean():.3f} fg-shape {h[:, 3].mean():.3f} digit {h[:, 2].mean():.3f} "
                f"count {h[:, 4].mean():.3f} ({time.perf_counter() - t0:.0f}s)")
    h = np.asarray(hist[-50:])
    probe = {"fg_colour_acc": round(float(h[:, 1].mean()), 3), "digit_acc": round(float(h[:, 2].mean()), 3),
             "fg_shape_acc": round(float(h[:, 3].mean()), 3)}
    if count_weight:
        probe["fg_count_acc"] = round(float(h[:, 4].mean()), 3)
    return {"steps": steps, "batch_images": batch, "lr": lr, "shape_weight": shape_weight,
            "count_weight": count_weight, "shape_global": shape_global, "seconds": time.perf_counter() - t0,
            "end_probe": probe}


def run_train(testbed: str, out: Path, seed: int, steps1: int, steps2: int, batch1: int, batch2: int,
              qpi: int, threads: int, unfreeze_at: float, budget2: float | None, workdir: Path,
              init_from: Path | None = None, aux_number_views: int = 0, attn_sup: float = 0.0,
              center_projector: bool = False, lr2: float = 1.5e-3, text_init: float | None = None,
              digit_steps: int = 0, pool: int = 0, shape_weight: float = 1.0, lr1b: float = 2e-3,
              count_centres: bool = False, count_weight: float = 0.0, heads_from: Path | None = None,
              shape_global: bool = False, vision_from: Path | None = None) -> dict:
    seed_everything(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(False)  # the CPU kernels used here are deterministic anyway
    bundle = build_testbed(testbed, seed)
    prep = Prep(bundle)
    log(f"[train {testbed}] fast preprocessing == processor (max diff {prep.check():.2e})")
    Prompts(bundle)
    model = bundle.model
    n_params = sum(p.numel() for p in model.parameters())
    log(f"[train {testbed}] {n_params} parameters; prefix {len(Prompts(bundle).prefix)} tokens")
    model.train()
    heads = new_heads(bundle)
    t0 = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    if init_from is not None:
        # resume after stage 1 (a {testbed}-stage1.pt written by an earlier run with the same seed), or start from a
        # trained model folder (its model.safetensors) with the auxiliary heads of a checkpoint (--heads-from)
        ck = folder_checkpoint(bundle, init_from, heads_from) if init_from.is_dir() else torch.load(init_from)
        if text_init is not None:
            # keep only the stage-1 vision encoder; decoder, embeddings, lm_head and connector start fresh
            sd = {k: v for k, v in ck["model"].items() if ".vision_model." in k or ".vision_tower." in k}
            missing, unexpected = model.load_state_dict(sd, strict=False)
            if unexpected:
                raise ExportError(f"unexpected keys {unexpected[:3]}")
            reinit_text(bundle, text_init, seed)
        else:
            model.load_state_dict(ck["model"])
        fresh = heads.load(ck["heads"])
        if fresh:
            log(f"[train {testbed}] auxiliary heads not in the checkpoint, starting fresh: {sorted(fresh)}")
        s1 = {"resumed_from": str(init_from), **ck.get("stage1", {})}
    else:
        s1 = train_stage1(bundle, heads, steps1, batch1, lr=2e-3)
    if vision_from is not None:
        s1 = {**s1, "vision_from": vision_from_llava(bundle, vision_from)}
        heads = new_heads(bundle, cls=False)  # the old heads read features of the replaced encoder
    if digit_steps:
        s1 = {**s1, "stage1b": train_digits(bundle, heads, digit_steps, 16, lr=lr1b, shape_weight=shape_weight,
                                            count_weight=count_weight, shape_global=shape_global)}
    if center_projector:
        _center_projector(bundle, prep)
    torch.save({"model": model.state_dict(), "heads": heads.state_dict(), "stage1": s1}, workdir / f"{testbed}-stage1.pt")
    if pool:
        s2 = train_stage2_pool(bundle, encode_pool(bundle, pool), steps2, batch2, qpi, lr=lr2, budget_s=budget2,
                               ckpt=workdir / f"{testbed}-stage2.pt", attn_sup=attn_sup, count_centres=count_centres)
    else:
        s2 = train_stage2(bundle, heads, steps2, batch2, qpi, lr=lr2, vision_lr=3e-4, unfreeze_at=unfreeze_at,
                          budget_s=budget2, ckpt=workdir / f"{testbed}-stage2.pt", aux_number_views=aux_number_views,
                          attn_sup=attn_sup)
    total = time.perf_counter() - t0
    save_trained(bundle, out)
    info = {"testbed": testbed, "seed": seed, "parameters": n_params, "threads": threads,
            "stage1": s1, "stage2": s2, "train_seconds": total}
    (out / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")
    log(f"[train {testbed}] done in {total:.0f}s -> {out}")
    return info


def snapshot(testbed: str, ckpt: Path, out: Path, seed: int) -> dict:
    """A model folder from a stage-2 checkpoint of a running `train` (weights saved every 200 steps), to evaluate
    progress on the held-out set before training ends. The tokenizer and config are rebuilt exactly as `train` does."""
    bundle = build_testbed(testbed, seed)
    sd = torch.load(ckpt)
    bundle.model.load_state_dict(sd.get("model", sd))
    save_trained(bundle, out)
    return {"testbed": testbed, "checkpoint": str(ckpt), "out": str(out)}
