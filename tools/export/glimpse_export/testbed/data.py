"""Testbed data: processor-equivalent fast preprocessing, prompt token ids, labelled scene batches, the packed
stage-2 sequence layout, and pools of pre-encoded scenes."""

from __future__ import annotations

import time

import numpy as np
import torch
from PIL import Image

from ..common import ExportError, log
from ..families import Bundle
from ..parity import messages
from ..scenes import make_scene, patch_labels, presence_vector, render, shape_count_labels, token_objects
from .config import TESTBEDS, TRAIN_SEED_BASE


class Prep:
    """Processor-equivalent pixels for square scene pictures (checked against the real processor at start-up)."""

    def __init__(self, bundle: Bundle):
        self.b = bundle
        self.testbed = TESTBEDS[bundle.extra["testbed"]]
        ip = bundle.processor.image_processor
        self.mean = np.asarray(ip.image_mean, np.float32)
        self.std = np.asarray(ip.image_std, np.float32)

    def views(self, rgb: Image.Image) -> np.ndarray:
        """[n_views, 3, H, W] normalised; idefics3: 4 tiles (raster) then the global view; llava: 1 view."""
        return self.testbed.views(rgb, self.mean, self.std)

    def view_regions(self) -> list[tuple[int, int, int, int]]:
        """(x0, y0, side, grid) of each view in scene pixels."""
        return self.testbed.view_regions()

    def check(self, seeds=(1, 2, 3)) -> float:
        worst = 0.0
        for s in seeds:
            img, _ = render(make_scene(self.testbed.scene, s))
            rgb = img.convert("RGB")
            ref = self.b.processor(images=[rgb], text=[self.b.processor.apply_chat_template(
                messages("x"), add_generation_prompt=True)], return_tensors="np")["pixel_values"][0]
            got = self.views(rgb)
            if ref.ndim == 3:  # a single view without a views axis (llava)
                got = got[0]
            if ref.shape != got.shape:
                raise ExportError(f"fast preprocessing shape {got.shape} != processor {ref.shape}")
            worst = max(worst, float(np.abs(ref - got).max()))
        if worst > 1e-5:
            raise ExportError(f"fast preprocessing differs from the processor by {worst}")
        return worst


class Prompts:
    """Token ids of the prompt split as prefix (up to the last image token structure) + question suffix."""

    def __init__(self, bundle: Bundle):
        self.b = bundle
        proc, tok = bundle.processor, bundle.tokenizer
        img, _ = render(make_scene(TESTBEDS[bundle.extra["testbed"]].scene, 1))
        rgb = img.convert("RGB")
        self.prefix = None
        for q in ("What colour is the circle?", "Is the red circle left or right of the blue cross?", "x"):
            full = proc(images=[rgb], text=[proc.apply_chat_template(messages(q), add_generation_prompt=True)],
                        return_tensors="np")["input_ids"][0].tolist()
            suf = self.suffix(q)
            if full[-len(suf):] != suf:
                raise ExportError("suffix tokenization differs from the processor's")
            pre = full[:-len(suf)]
            if self.prefix is not None and pre != self.prefix:
                raise ExportError("prompt prefix depends on the question")
            self.prefix = pre
        self.eos = bundle.eos_token_ids[0]
        self.pad = tok.pad_token_id

    def suffix(self, q: str) -> list[int]:
        text = self.b.processor.apply_chat_template(messages(q), add_generation_prompt=True)
        after = text.split("<image>", 1)[1]
        return self.b.tokenizer(after, add_special_tokens=False)["input_ids"]

    def answer(self, a: str) -> list[int]:
        return self.b.tokenizer(" " + a, add_special_tokens=False)["input_ids"] + [self.eos]


def scene_batch(bundle: Bundle, prep: Prep, seeds: list[int], shape_global: bool = False):
    """Pixels [n_img * n_views, 3, H, W] + stacked patch labels for the given scene seeds.

    ``shape_global``: the shape target is kept only on views of the whole picture (SmolVLM's global view). In a
    full-resolution tile most object patches lie inside an object several patches wide, where one patch cannot tell a
    square from a circle; in the global view an object spans one or two patches, as in the LLaVA testbed."""
    spec = prep.testbed.scene
    pvs, labs, scenes = [], {k: [] for k in ("colour", "shape", "digit", "centre", "xy", "presence", "count")}, []
    for s in seeds:
        sc = make_scene(spec, s)
        img, ids = render(sc)
        sc.extras["idmap"] = ids
        pvs.append(prep.views(img.convert("RGB")))
        centre_map = np.zeros_like(ids)
        for o in sc.objects:
            centre_map[o.cy, o.cx] = 1
        for (x0, y0, side, grid) in prep.view_regions():
            lab = patch_labels(sc, ids, x0, y0, side, grid)
            for k in ("colour", "shape", "digit", "xy"):
                labs[k].append(lab[k])
            cell = side // grid
            cm = centre_map[y0:y0 + side, x0:x0 + side].reshape(grid, cell, grid, cell).sum((1, 3)) > 0
            labs["centre"].append(cm.reshape(-1).astype(np.int64))
            labs["presence"].append(presence_vector(sc))
            whole = side == spec.size
            labs["count"].append(shape_count_labels(sc, lab["shape"], whole))
            if shape_global and not whole:
                labs["shape"][-1] = np.where(lab["shape"] > 0, -100, lab["shape"])
        scenes.append(sc)
    pv = torch.from_numpy(np.concatenate(pvs))
    lab = {k: torch.from_numpy(np.stack(v)) for k, v in labs.items()}
    return pv, lab, scenes


def packed_mask(P: int, Q: int, L: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids and additive 4-D mask of a packed stage-2 sequence: a P-token prefix (the image prompt) then Q
    segments of L tokens; each segment sees the prefix and itself (causally) and restarts its positions after the
    prefix, which is the same as Q separate prompts."""
    T = P + Q * L
    pos = torch.cat([torch.arange(P), P + torch.arange(L).repeat(Q)])
    seg = torch.cat([torch.full((P,), -1), torch.arange(Q).repeat_interleave(L)])
    qi, ki = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = ((seg[None, :] == -1) & (ki <= qi)) | ((seg[:, None] == seg[None, :]) & (ki <= qi))
    return pos, torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[None, None].expand(batch, 1, T, T)


@torch.no_grad()
def encode_pool(bundle: Bundle, n: int, chunk: int = 32) -> tuple[torch.Tensor, list]:
    """Frozen-encoder outputs for n training scenes (seeds from stage 2's base): [n, views, tokens, dim] + scenes."""
    prep = Prep(bundle)
    spec = prep.testbed.scene
    merge = bundle.spec.token_merge(bundle.model.config)
    bundle.model.eval()
    hids, scenes = [], []
    t0 = time.perf_counter()
    for start in range(0, n, chunk):
        scs = [make_scene(spec, TRAIN_SEED_BASE[2] + start + i) for i in range(min(chunk, n - start))]
        pvs = []
        for sc in scs:
            img, ids = render(sc)
            pvs.append(prep.views(img.convert("RGB")))
            sc.extras["tok_obj"] = token_objects(sc, ids, prep.view_regions(), merge)
        pv = torch.from_numpy(np.concatenate(pvs))
        hid, _ = bundle.spec.vision_hidden(bundle.model, pv)
        hids.append(hid.reshape(len(scs), -1, *hid.shape[1:]).clone())
        scenes += scs
        if start % (chunk * 50) == 0:
            log(f"[pool {bundle.extra['testbed']}] {start + len(scs)}/{n} ({time.perf_counter() - t0:.0f}s)")
    bundle.model.train()
    return torch.cat(hids), scenes


def centre_tokens(masks: np.ndarray) -> np.ndarray:
    """One token per object: of the tokens showing it (rows of ``masks``, one square view in raster order), the one
    nearest their mean position."""
    g = int(round(np.sqrt(masks.shape[1])))
    out = np.zeros_like(masks)
    for i, m in enumerate(masks):
        idx = np.nonzero(m)[0]
        if len(idx):
            r, c = idx // g, idx % g
            out[i, idx[np.argmin((r - r.mean()) ** 2 + (c - c.mean()) ** 2)]] = True
    return out
