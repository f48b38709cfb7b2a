"""Accuracy testbeds: small Idefics3 (SmolVLM-style) and LLaVA models trained on synthetic scenes.

Build (real transformers classes, small configs) -> stage 1: vision encoder alone with dense per-patch supervision
(colour / shape / digit / object-centre / own coordinates of every patch, plus image-level presence on CLIP's CLS)
-> stage 2: connector + decoder (encoder frozen at first, then fine-tuned with the auxiliary loss kept on) on
questions rendered exactly as at inference (chat template, one image, answer + EOS) -> save weights + export with the
same exporter as the tiny models. Auxiliary heads live outside the HF model and are never exported.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .common import ExportError, log, seed_everything
from .families import LLAVA_CHAT_TEMPLATE, SMOLVLM_CHAT_TEMPLATE, Bundle
from .scenes import (
    token_objects,
    LLAVA_SCENE, N_COLOUR_CLS, N_DIGIT_CLS, N_SHAPE_CLS, QTYPES, SMOL_SCENE, make_scene, patch_labels,
    presence_vector, question, render, shape_count_labels, vocabulary_corpus,
)
from .tokenizer import train_tokenizer, wrap_tokenizer

TESTBEDS = ("smolvlm", "llava")
TRAIN_SEED_BASE = {1: 10_000_000, 2: 20_000_000, 3: 30_000_000}  # scene seeds: stage -> base (eval sets use 0 .. 999_999)
EVAL_SEED_BASE = {"smolvlm": 0, "llava": 500_000}
TOKENIZER_VOCAB = 640
TRAIN_DEFAULTS = {
    "smolvlm": dict(steps1=500, steps2=1300, batch1=6, batch2=6, unfreeze_at=1.0),
    "llava": dict(steps1=800, steps2=1400, batch1=32, batch2=16, unfreeze_at=0.7),
}

TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=1024, rms_norm_eps=1e-5,
            initializer_range=0.02, tie_word_embeddings=False)
SMOL_TILE = 128
SMOL_LONGEST = 256
SMOL_VISION = dict(hidden_size=96, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                   image_size=SMOL_TILE, patch_size=8, initializer_range=0.02)
SMOL_SCALE = 2
LLAVA_PX = 96
CLIP_VISION = dict(hidden_size=96, intermediate_size=256, num_hidden_layers=5, num_attention_heads=4,
                   image_size=LLAVA_PX, patch_size=8, projection_dim=96, initializer_range=0.02)


def scene_spec(testbed: str):
    return SMOL_SCENE if testbed == "smolvlm" else LLAVA_SCENE


# ------------------------------------------------------------------------------------------------------- build
def build_testbed(testbed: str, seed: int) -> Bundle:
    from transformers import GenerationConfig, LlamaConfig

    family = "idefics3" if testbed == "smolvlm" else "llava"
    template = SMOLVLM_CHAT_TEMPLATE if family == "idefics3" else LLAVA_CHAT_TEMPLATE
    tok = wrap_tokenizer(family, train_tokenizer(family, vocabulary_corpus(), TOKENIZER_VOCAB), template)
    image_token_id = tok.convert_tokens_to_ids("<image>")
    bos, eos, pad = (("<|im_start|>", "<end_of_utterance>", "<|endoftext|>") if family == "idefics3"
                     else ("<s>", "</s>", "<pad>"))
    eos_id = tok.convert_tokens_to_ids(eos)
    text_cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.convert_tokens_to_ids(bos), eos_token_id=eos_id,
                           pad_token_id=tok.convert_tokens_to_ids(pad), **TEXT)
    seed_everything(seed)
    if family == "idefics3":
        from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor,
                                  Idefics3VisionConfig)
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

        ip = Idefics3ImageProcessorPil(
            do_resize=True, size={"longest_edge": SMOL_LONGEST}, max_image_size={"longest_edge": SMOL_TILE},
            do_image_splitting=True, resample=1, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
            image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_pad=True, do_convert_rgb=True)
        seq = (SMOL_TILE // SMOL_VISION["patch_size"]) ** 2 // SMOL_SCALE**2
        proc = Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=seq, chat_template=template)
        cfg = Idefics3Config(vision_config=Idefics3VisionConfig(**SMOL_VISION), text_config=text_cfg,
                             scale_factor=SMOL_SCALE, image_token_id=image_token_id, tie_word_embeddings=False,
                             pad_token_id=text_cfg.pad_token_id)
        model = Idefics3ForConditionalGeneration(cfg)
    else:
        from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        ip = CLIPImageProcessorPil(do_resize=True, size={"shortest_edge": LLAVA_PX}, resample=3, do_center_crop=True,
                                   crop_size={"height": LLAVA_PX, "width": LLAVA_PX}, do_rescale=True,
                                   rescale_factor=1 / 255, do_normalize=True, do_convert_rgb=True)
        proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=CLIP_VISION["patch_size"],
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=template)
        seq = (LLAVA_PX // CLIP_VISION["patch_size"]) ** 2
        cfg = LlavaConfig(vision_config=CLIPVisionConfig(**CLIP_VISION), text_config=text_cfg,
                          image_token_index=image_token_id, image_seq_length=seq, projector_hidden_act="gelu",
                          vision_feature_select_strategy="default", vision_feature_layer=-2, tie_word_embeddings=False)
        model = LlavaForConditionalGeneration(cfg)
    model.set_attn_implementation("eager")
    model.generation_config = GenerationConfig(bos_token_id=text_cfg.bos_token_id, eos_token_id=[eos_id],
                                               pad_token_id=text_cfg.pad_token_id)
    return Bundle(family, seed, model, proc, tok, template, image_token_id, [eos_id],
                  extra=dict(image_seq_len=seq, testbed=testbed))


def load_testbed(model_dir: Path) -> Bundle:
    """A trained testbed folder (weights in model.safetensors) as a Bundle."""
    from transformers import AutoProcessor, Idefics3ForConditionalGeneration, LlavaForConditionalGeneration

    cfg = json.loads((model_dir / "config.json").read_text())
    family = cfg["model_type"]
    cls = Idefics3ForConditionalGeneration if family == "idefics3" else LlavaForConditionalGeneration
    model = cls.from_pretrained(str(model_dir), attn_implementation="eager", dtype=torch.float32).eval()
    proc = AutoProcessor.from_pretrained(str(model_dir))
    tok = proc.tokenizer
    eos = model.generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    img = cfg.get("image_token_id", cfg.get("image_token_index"))
    seq = proc.image_seq_len if family == "idefics3" else cfg["image_seq_length"]
    info = json.loads((model_dir / "export_info.json").read_text()) if (model_dir / "export_info.json").exists() else {}
    template = SMOLVLM_CHAT_TEMPLATE if family == "idefics3" else LLAVA_CHAT_TEMPLATE
    return Bundle(family, info.get("seed", 0), model, proc, tok, template, img, eos,
                  extra=dict(image_seq_len=seq, testbed="smolvlm" if family == "idefics3" else "llava"))


def messages(q: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]


# ------------------------------------------------------------------------------------------- fast preprocessing
class Prep:
    """Processor-equivalent pixels for square scene pictures (checked against the real processor at start-up)."""

    def __init__(self, bundle: Bundle):
        self.b = bundle
        self.family = bundle.family
        ip = bundle.processor.image_processor
        self.mean = np.asarray(ip.image_mean, np.float32)
        self.std = np.asarray(ip.image_std, np.float32)

    def views(self, rgb: "Image.Image") -> np.ndarray:  # noqa: F821
        """[n_views, 3, H, W] normalised; idefics3: 4 tiles (raster) then the global view; llava: 1 view."""
        from PIL import Image

        if self.family == "idefics3":
            a = np.asarray(rgb)
            t = SMOL_TILE
            views = [a[r * t:(r + 1) * t, c * t:(c + 1) * t] for r in range(2) for c in range(2)]
            views.append(np.asarray(rgb.resize((t, t), Image.Resampling.LANCZOS)))
        else:
            views = [np.asarray(rgb)]
        v = np.stack(views).astype(np.float32) / 255.0
        v = (v - self.mean) / self.std
        return v.transpose(0, 3, 1, 2).copy()

    def view_regions(self) -> list[tuple[int, int, int, int]]:
        """(x0, y0, side, grid) of each view in scene pixels."""
        if self.family == "idefics3":
            t, g = SMOL_TILE, SMOL_TILE // SMOL_VISION["patch_size"]
            return [(c * t, r * t, t, g) for r in range(2) for c in range(2)] + [(0, 0, 2 * t, g)]
        return [(0, 0, LLAVA_PX, LLAVA_PX // CLIP_VISION["patch_size"])]

    def check(self, seeds=(1, 2, 3)) -> float:
        spec = scene_spec(self.b.extra["testbed"])
        worst = 0.0
        for s in seeds:
            img, _ = render(make_scene(spec, s))
            rgb = img.convert("RGB")
            ref = self.b.processor(images=[rgb], text=[self.b.processor.apply_chat_template(
                messages("x"), add_generation_prompt=True)], return_tensors="np")["pixel_values"][0]
            got = self.views(rgb)
            if self.family == "llava":
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
        spec = scene_spec(bundle.extra["testbed"])
        img, _ = render(make_scene(spec, 1))
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


# ---------------------------------------------------------------------------------------------- vision pieces
def vision_hidden(bundle: Bundle, pv: torch.Tensor, need_cls_states: bool = False):
    """Encoder outputs the features come from: idefics3 post_layernorm [N, P, D]; llava hidden_states[-2] incl. CLS
    plus the last layer's pooled CLS."""
    m = bundle.model.model
    if bundle.family == "idefics3":
        out = m.vision_model(pixel_values=pv, patch_attention_mask=None, return_dict=True)
        return out.last_hidden_state, None
    out = m.vision_tower(pv, output_hidden_states=True, return_dict=True)
    return out.hidden_states[bundle.model.config.vision_feature_layer], out.pooler_output


def project(bundle: Bundle, hid: torch.Tensor) -> torch.Tensor:
    m = bundle.model.model
    if bundle.family == "idefics3":
        return m.connector(hid)  # [N, 64, text_hidden]
    return m.multi_modal_projector(hid[:, 1:])


class AuxHeads(nn.Module):
    def __init__(self, dim: int, cls: bool):
        super().__init__()
        self.colour = nn.Linear(dim, N_COLOUR_CLS)
        self.shape = nn.Linear(dim, N_SHAPE_CLS)
        self.digit = nn.Linear(dim, N_DIGIT_CLS)
        self.centre = nn.Linear(dim, 2)
        self.xy = nn.Linear(dim, 2)
        self.presence = nn.Linear(dim, 34) if cls else None
        self.presence_last = nn.Linear(dim, 34) if cls else None
        # patches of an object in a view of the whole picture: how many objects share its shape (1..3)
        self.count = nn.Linear(dim, 3)

    def load(self, state: dict) -> list[str]:
        """Load heads saved by an earlier run; heads added since then (missing keys) start fresh and are returned."""
        missing, unexpected = self.load_state_dict(state, strict=False)
        if unexpected:
            raise ExportError(f"unexpected auxiliary-head keys {unexpected[:3]}")
        return missing


def _ce(logits, target, bg_weight=0.15):
    w = torch.ones(logits.shape[-1])
    w[0] = bg_weight
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), weight=w)


def aux_loss(heads: AuxHeads, hid, pooled, labels, family, shape_weight: float = 1.0, count_weight: float = 0.0):
    patches = hid if family == "idefics3" else hid[:, 1:]
    loss = (_ce(heads.colour(patches), labels["colour"]) + shape_weight * _ce(heads.shape(patches), labels["shape"])
            + _ce(heads.digit(patches), labels["digit"]) + _ce(heads.centre(patches), labels["centre"], 0.05)
            + 4.0 * F.mse_loss(torch.sigmoid(heads.xy(patches)), labels["xy"]))
    cfg = labels["count"] >= 0
    count_logits = heads.count(patches)
    if count_weight and cfg.any():
        loss = loss + count_weight * F.cross_entropy(count_logits[cfg], labels["count"][cfg])
    if heads.presence is not None:
        loss = loss + F.binary_cross_entropy_with_logits(heads.presence(hid[:, 0]), labels["presence"])
        loss = loss + F.binary_cross_entropy_with_logits(heads.presence_last(pooled), labels["presence"])
    with torch.no_grad():
        fg = labels["colour"] > 0
        acc = ((heads.colour(patches).argmax(-1) == labels["colour"]) & fg).sum() / fg.sum().clamp(min=1)
        dfg = labels["digit"] > 0
        dacc = ((heads.digit(patches).argmax(-1) == labels["digit"]) & dfg).sum() / dfg.sum().clamp(min=1)
        sfg = fg & (labels["shape"] >= 0)
        sacc = ((heads.shape(patches).argmax(-1) == labels["shape"]) & sfg).sum() / sfg.sum().clamp(min=1)
        cacc = ((count_logits.argmax(-1) == labels["count"]) & cfg).sum() / cfg.sum().clamp(min=1)
    return loss, {"fg_colour_acc": float(acc), "digit_acc": float(dacc), "fg_shape_acc": float(sacc),
                  "fg_count_acc": float(cacc)}


def scene_batch(bundle: Bundle, prep: Prep, seeds: list[int], shape_global: bool = False):
    """Pixels [n_img * n_views, 3, H, W] + stacked patch labels for the given scene seeds.

    ``shape_global``: the shape target is kept only on views of the whole picture (SmolVLM's global view). In a
    full-resolution tile most object patches lie inside an object several patches wide, where one patch cannot tell a
    square from a circle; in the global view an object spans one or two patches, as in the LLaVA testbed."""
    spec = scene_spec(bundle.extra["testbed"])
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


# --------------------------------------------------------------------------------------------------- training
def _lr(step, total, base, warm=60):
    if step < warm:
        return base * (step + 1) / warm
    p = (step - warm) / max(1, total - warm)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))


def _vision_params(bundle):
    m = bundle.model.model
    return list((m.vision_model if bundle.family == "idefics3" else m.vision_tower).parameters())


def train_stage1(bundle: Bundle, heads: AuxHeads, steps: int, batch: int, lr: float, log_every=50) -> dict:
    prep = Prep(bundle)
    params = _vision_params(bundle) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    t0 = time.perf_counter()
    hist = []
    for step in range(steps):
        seeds = [TRAIN_SEED_BASE[1] + step * batch + i for i in range(batch)]
        pv, lab, _ = scene_batch(bundle, prep, seeds)
        hid, pooled = vision_hidden(bundle, pv)
        loss, m = aux_loss(heads, hid, pooled, lab, bundle.family)
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        hist.append((float(loss.detach()), m["fg_colour_acc"], m["digit_acc"]))
        if step % log_every == 0 or step == steps - 1:
            h = np.asarray(hist[-log_every:])
            log(f"[stage1 {bundle.extra['testbed']}] step {step}/{steps} loss {h[:, 0].mean():.4f} fg-colour "
                f"{h[:, 1].mean():.3f} digit {h[:, 2].mean():.3f} ({time.perf_counter() - t0:.0f}s)")
    return {"steps": steps, "batch_images": batch, "seconds": time.perf_counter() - t0,
            "final_loss": float(np.mean([h[0] for h in hist[-50:]]))}


def _packed_mask(P: int, Q: int, L: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids and additive 4-D mask of a packed stage-2 sequence: a P-token prefix (the image prompt) then Q
    segments of L tokens; each segment sees the prefix and itself (causally) and restarts its positions after the
    prefix, which is the same as Q separate prompts."""
    T = P + Q * L
    pos = torch.cat([torch.arange(P), P + torch.arange(L).repeat(Q)])
    seg = torch.cat([torch.full((P,), -1), torch.arange(Q).repeat_interleave(L)])
    qi, ki = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = ((seg[None, :] == -1) & (ki <= qi)) | ((seg[:, None] == seg[None, :]) & (ki <= qi))
    return pos, torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[None, None].expand(batch, 1, T, T)


def _update_type_weights(err: np.ndarray, ok_t: np.ndarray, n_t: np.ndarray) -> np.ndarray:
    """Adaptive curriculum: update the running error per question type (in place) from this step's counts and return
    the sampling weights (0.15 + running error)."""
    seen = n_t > 0
    err[seen] = 0.95 * err[seen] + 0.05 * (1 - ok_t[seen] / n_t[seen])
    return 0.15 + err


def _text_model(bundle):
    m = bundle.model.model
    return m.text_model if bundle.family == "idefics3" else m.language_model


def train_stage2(bundle: Bundle, heads: AuxHeads, steps: int, batch: int, q_per_image: int, lr: float,
                 vision_lr: float, unfreeze_at: float, log_every=50, budget_s: float | None = None,
                 ckpt: Path | None = None, aux_number_views: int = 0, attn_sup: float = 0.0) -> dict:
    prep, prompts = Prep(bundle), Prompts(bundle)
    model = bundle.model
    vparams = _vision_params(bundle)
    vset = {id(p) for p in vparams}
    other = [p for p in model.parameters() if id(p) not in vset]
    opt = torch.optim.AdamW([{"params": other, "lr": lr, "base": lr},
                             {"params": vparams + list(heads.parameters()), "lr": 0.0, "base": vision_lr}],
                            weight_decay=0.01)
    P = len(prompts.prefix)
    prefix = torch.tensor(prompts.prefix)
    img_pos = prefix == bundle.image_token_id
    # longest segment over all question templates / answers
    L = max(len(prompts.suffix(q)) for q in vocabulary_corpus() if q.endswith("?")) + 2
    rng = np.random.default_rng([bundle.seed, 2])
    weights = np.ones(len(QTYPES))
    err = np.full(len(QTYPES), 0.5)
    t0 = time.perf_counter()
    hist = []
    unfreeze_step = int(unfreeze_at * steps)
    emb_layer = model.get_input_embeddings()
    tm = _text_model(bundle)
    digit_hist: list[float] = []
    budget_note = None
    step = 0
    while step < steps:
        if budget_s and step == 20:
            # size the run to the wall-clock budget once the step time is known (recorded in train_info.json;
            # reproduce with --steps2 N and no budget)
            per = (time.perf_counter() - t0) / 20
            # unfrozen-encoder steps cost about 1.8x (measured)
            fit = int(budget_s / (per * (unfreeze_at + (1 - unfreeze_at) * (1.8 + 0.15 * aux_number_views / batch))))
            if fit < steps:
                budget_note = f"steps2 {steps} -> {fit} to fit {budget_s:.0f}s at {per:.2f}s/step"
                log(f"[stage2] {budget_note}")
                steps = fit
                unfreeze_step = int(unfreeze_at * steps)
        seeds = [TRAIN_SEED_BASE[2] + step * batch + i for i in range(batch)]
        pv, lab, scenes = scene_batch(bundle, prep, seeds)
        train_vision = step >= unfreeze_step
        if train_vision:
            hid, pooled = vision_hidden(bundle, pv)
        else:
            with torch.no_grad():
                hid, pooled = vision_hidden(bundle, pv)
        feats = project(bundle, hid).reshape(batch, -1, model.config.text_config.hidden_size)
        # packed sequences: prefix + q_per_image segments (each sees the prefix and itself only)
        p = weights / weights.sum()
        seg_ids, seg_tgt, seg_types, seg_rel = [], [], [], []
        merge = SMOL_SCALE if bundle.family == "idefics3" else 1
        for sc in scenes:
            tok_obj = token_objects(sc, sc.extras["idmap"], prep.view_regions(), merge) if attn_sup else None
            ids_i, tgt_i, ty_i, rel_i = [], [], [], []
            tries = 0
            while len(ids_i) < q_per_image and tries < 50:
                tries += 1
                ti = int(rng.choice(len(QTYPES), p=p))
                q = question(sc, QTYPES[ti], rng)
                if q is None:
                    continue
                s, a = prompts.suffix(q["question"]), prompts.answer(q["answer"])
                seq = s + a
                if len(seq) > L:
                    raise ExportError(f"segment too long ({len(seq)}): {q}")
                tgt = [-100] * L
                for j in range(len(a)):
                    tgt[len(s) - 1 + j] = seq[len(s) + j]
                ids_i.append(seq + [prompts.pad] * (L - len(seq)))
                tgt_i.append(tgt)
                ty_i.append((ti, len(s) - 1))
                if attn_sup:
                    rel_i.append(tok_obj[q["objs"]].any(0) if q["objs"] else np.zeros(tok_obj.shape[1], bool))
            seg_rel.append(rel_i)
            seg_ids.append(ids_i)
            seg_tgt.append(tgt_i)
            seg_types.append(ty_i)
        Q = q_per_image
        T = P + Q * L
        ids = torch.cat([prefix[None].repeat(batch, 1), torch.tensor(seg_ids).reshape(batch, Q * L)], 1)
        tgt = torch.cat([torch.full((batch, P), -100), torch.tensor(seg_tgt).reshape(batch, Q * L)], 1)
        emb = emb_layer(ids)
        mask_img = torch.zeros(batch, T, dtype=torch.bool)
        mask_img[:, :P] = img_pos
        emb = emb.masked_scatter(mask_img[..., None], feats.reshape(-1, feats.shape[-1]).to(emb.dtype))
        # 4-D additive mask
        pos, bias = _packed_mask(P, Q, L, batch)
        out = tm(inputs_embeds=emb, attention_mask=bias, position_ids=pos[None].repeat(batch, 1), use_cache=False,
                 output_attentions=bool(attn_sup))
        logits = model.lm_head(out.last_hidden_state)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100)
        if attn_sup:
            # training-only guidance: the last layer's attention (mean over heads) from the position that predicts
            # the answer should land on the image tokens showing the objects the question is about
            A = out.attentions[-1]  # [B, heads, T, T]
            img_idx = torch.nonzero(img_pos)[:, 0]
            bi, qi_, masks = [], [], []
            for b in range(batch):
                for j, (ti, at) in enumerate(seg_types[b]):
                    if seg_rel[b][j].any():
                        bi.append(b)
                        qi_.append(P + j * L + at)
                        masks.append(seg_rel[b][j])
            if bi:
                rows = A[torch.tensor(bi), :, torch.tensor(qi_)]  # [N, heads, T]
                rows = rows[:, :, img_idx].mean(1)  # [N, n_img]
                mass = (rows * torch.from_numpy(np.stack(masks)).float()).sum(-1)
                loss = loss + attn_sup * (-torch.log(mass + 1e-6)).mean()
        if train_vision:
            aloss, _ = aux_loss(heads, hid, pooled, lab, bundle.family)
            loss = loss + 0.3 * aloss
            if aux_number_views:
                # extra dense supervision on the view holding the number (digits are rare: one per picture)
                aseeds = [TRAIN_SEED_BASE[3] + step * aux_number_views + i for i in range(aux_number_views)]
                pva, laba, sca = scene_batch(bundle, prep, aseeds)
                nv = len(prep.view_regions())
                sel = torch.tensor([i * nv + (sc.number_quadrant if nv > 1 else 0) for i, sc in enumerate(sca)])
                hida, pooleda = vision_hidden(bundle, pva[sel])
                aloss2, am = aux_loss(heads, hida, pooleda, {k: v[sel] for k, v in laba.items()}, bundle.family)
                loss = loss + 0.3 * aloss2
                digit_hist.append(am["digit_acc"])
        for g in opt.param_groups:
            if g["base"] == lr:
                g["lr"] = _lr(step, steps, lr)
            else:
                g["lr"] = _lr(step - unfreeze_step, steps - unfreeze_step, vision_lr, warm=30) if train_vision else 0.0
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(heads.parameters()), 1.0)
        opt.step()
        # per-type first-answer-token accuracy -> adaptive type weights
        with torch.no_grad():
            pred = logits.argmax(-1)
            ok_t = np.zeros(len(QTYPES))
            n_t = np.zeros(len(QTYPES))
            for b in range(batch):
                for j, (ti, at) in enumerate(seg_types[b]):
                    base = P + j * L
                    a_pos = [k for k in range(L) if seg_tgt[b][j][k] != -100]
                    good = all(int(pred[b, base + k]) == seg_tgt[b][j][k] for k in a_pos)
                    ok_t[ti] += good
                    n_t[ti] += 1
            weights = _update_type_weights(err, ok_t, n_t)
        hist.append((float(loss.detach()), ok_t.sum() / max(1, n_t.sum())))
        if step % log_every == 0 or step == steps - 1:
            h = np.asarray(hist[-log_every:])
            acc = " ".join(f"{t}:{1 - e:.2f}" for t, e in zip(QTYPES, err))
            log(f"[stage2 {bundle.extra['testbed']}] step {step}/{steps} loss {h[:, 0].mean():.4f} acc "
                f"{h[:, 1].mean():.3f} | {acc} | vision {'on' if train_vision else 'frozen'} "
                f"{'aux-digit %.3f ' % np.mean(digit_hist[-log_every:]) if digit_hist else ''}"
                f"({time.perf_counter() - t0:.0f}s)")
        if ckpt is not None and step % 50 == 49:
            torch.save(model.state_dict(), ckpt)
        step += 1
    return {"steps": steps, "batch_images": batch, "questions_per_image": q_per_image,
            "seconds": time.perf_counter() - t0, "unfreeze_step": unfreeze_step, "budget_note": budget_note,
            "final_running_acc": {t: round(1 - e, 4) for t, e in zip(QTYPES, err)}}


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
    vdim = model.config.vision_config.hidden_size
    heads = AuxHeads(vdim, cls=bundle.family == "llava")
    t0 = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    if init_from is not None:
        # resume after stage 1 (a {testbed}-stage1.pt written by an earlier run with the same seed), or start from a
        # trained model folder (its model.safetensors) with the auxiliary heads of a checkpoint (--heads-from)
        ck = _folder_checkpoint(bundle, init_from, heads_from) if init_from.is_dir() else torch.load(init_from)
        if text_init is not None:
            # keep only the stage-1 vision encoder; decoder, embeddings, lm_head and connector start fresh
            sd = {k: v for k, v in ck["model"].items() if ".vision_model." in k or ".vision_tower." in k}
            missing, unexpected = model.load_state_dict(sd, strict=False)
            if unexpected:
                raise ExportError(f"unexpected keys {unexpected[:3]}")
            _reinit_text(bundle, text_init, seed)
        else:
            model.load_state_dict(ck["model"])
        fresh = heads.load(ck["heads"])
        if fresh:
            log(f"[train {testbed}] auxiliary heads not in the checkpoint, starting fresh: {sorted(fresh)}")
        s1 = {"resumed_from": str(init_from), **ck.get("stage1", {})}
    else:
        s1 = train_stage1(bundle, heads, steps1, batch1, lr=2e-3)
    if vision_from is not None:
        s1 = {**s1, "vision_from": _vision_from_llava(bundle, vision_from)}
        heads = AuxHeads(vdim, cls=False)  # the old heads read features of the replaced encoder
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


@torch.no_grad()
def _vision_from_llava(bundle: Bundle, folder: Path) -> dict:
    """Initialise the SmolVLM testbed's vision encoder from a trained LLaVA testbed's CLIP tower (transfer learning).

    The two encoders share width, heads, MLP size and patch size; LLaVA's features come from hidden_states[-2], i.e.
    after its first 4 layers, which are copied onto the 4 Idefics3 layers. CLIP's pixel normalisation is folded into
    the patch embedding (SmolVLM normalises with mean = std = 0.5), its 12 x 12 position embeddings are resized
    (bicubic) to 16 x 16, and what has no counterpart starts neutral: no CLS token, no pre-layernorm, post-layernorm
    = identity affine. Object shapes are learned slowly from scratch by both encoders (per-patch probe flat at ~0.3
    for the first few thousand pictures); LLaVA's tower already separates them at the global view's scale."""
    from transformers import AutoImageProcessor, LlavaForConditionalGeneration

    if bundle.family != "idefics3":
        raise ExportError("--vision-from initialises the SmolVLM testbed (idefics3) from a LLaVA testbed")
    src = _trained_model(LlavaForConditionalGeneration, folder, "--vision-from needs a trained LLaVA testbed")
    vc, tc = src.config.vision_config, bundle.model.config.vision_config
    n_copy = vc.num_hidden_layers + 1 + src.config.vision_feature_layer  # layers before the feature layer's output
    for field in ("hidden_size", "intermediate_size", "num_attention_heads", "patch_size"):
        if getattr(vc, field) != getattr(tc, field):
            raise ExportError(f"{folder}/config.json: vision_config.{field} {getattr(vc, field)} != "
                              f"{getattr(tc, field)} of the SmolVLM testbed")
    if n_copy != tc.num_hidden_layers:
        raise ExportError(f"{folder}: its features come after {n_copy} layers, the SmolVLM testbed has "
                          f"{tc.num_hidden_layers}")
    ip = AutoImageProcessor.from_pretrained(folder)
    mean, std = torch.tensor(ip.image_mean), torch.tensor(ip.image_std)
    tower = getattr(src.model.vision_tower, "vision_model", src.model.vision_tower)
    vm = bundle.model.model.vision_model
    w = tower.embeddings.patch_embedding.weight
    # CLIP sees (p - mean) / std; SmolVLM's input is x = (p - 0.5) / 0.5, so p = 0.5 x + 0.5
    vm.embeddings.patch_embedding.weight.copy_(w * (0.5 / std)[None, :, None, None])
    vm.embeddings.patch_embedding.bias.copy_((w.sum((2, 3)) * ((0.5 - mean) / std)[None]).sum(1))
    g_src = vc.image_size // vc.patch_size
    g_dst = tc.image_size // tc.patch_size
    pos = tower.embeddings.position_embedding.weight[1:].reshape(g_src, g_src, -1).permute(2, 0, 1)[None]
    pos = F.interpolate(pos, size=(g_dst, g_dst), mode="bicubic", align_corners=False)[0]
    vm.embeddings.position_embedding.weight.copy_(pos.permute(1, 2, 0).reshape(g_dst * g_dst, -1))
    for i in range(n_copy):
        vm.encoder.layers[i].load_state_dict(tower.encoder.layers[i].state_dict())
    vm.post_layernorm.weight.fill_(1.0)
    vm.post_layernorm.bias.zero_()
    log(f"[train {bundle.extra['testbed']}] vision encoder initialised from {folder} ({n_copy} CLIP layers)")
    return {"folder": str(folder), "layers": n_copy, "position_grid": f"{g_src}x{g_src} -> {g_dst}x{g_dst}"}


def _trained_model(cls, folder: Path, why: str):
    """A model class loaded in f32 from a trained testbed folder, with an error naming the missing weights file."""
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise ExportError(f"{weights}: missing ({why})")
    return cls.from_pretrained(folder, torch_dtype=torch.float32)


def _folder_checkpoint(bundle: Bundle, folder: Path, heads_from: Path | None) -> dict:
    """A checkpoint dict from a trained model folder (weights as `save_trained` wrote them) plus the auxiliary heads
    of a `{testbed}-stage1.pt` checkpoint (without one the heads start fresh)."""
    sd = _trained_model(type(bundle.model), folder, "--init-from DIR needs a trained model folder").state_dict()
    heads = torch.load(heads_from)["heads"] if heads_from is not None else {}
    return {"model": sd, "heads": heads, "stage1": {"from_folder": str(folder), "heads_from": str(heads_from)}}


def save_trained(bundle: Bundle, out: Path) -> None:
    """Round weights to fp16-representable values (so fp16 safetensors reload exactly), save the folder + weights."""
    from .pipeline import save_folder

    model = bundle.model
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.requires_grad_(False)
            p.copy_(p.half().float())
    out.mkdir(parents=True, exist_ok=True)
    save_folder(bundle, out)
    model.to(torch.float16).save_pretrained(str(out))
    model.to(torch.float32)
    bundle.model.config.save_pretrained(str(out))  # keep config.json's dtype float32 (the ONNX files are f32)


@torch.no_grad()
def _center_projector(bundle: Bundle, prep: Prep, n: int = 16) -> None:
    """Re-initialise the connector so that its output has zero mean over image tokens.

    The stage-1 encoder's features share a large common vector (its norm is about 3x the per-token deviation), which
    drowns the per-object part once the decoder normalises each token. LLaVA: subtract the mean output from the
    projector's last bias. Idefics3 (connector without bias): remove the mean input direction from the weight."""
    pv, _, _ = scene_batch(bundle, prep, [TRAIN_SEED_BASE[3] + 10_000_000 + i for i in range(n)])
    hid, _ = vision_hidden(bundle, pv)
    m = bundle.model.model
    if bundle.family == "idefics3":
        x = m.connector.pixel_shuffle(hid, m.connector.scale_factor).reshape(-1, hid.shape[-1] * SMOL_SCALE**2)
        mu = x.mean(0)
        w = m.connector.modality_projection.proj.weight  # [out, in]
        w -= torch.outer(w @ mu, mu) / mu.dot(mu)
    else:
        out = m.multi_modal_projector(hid[:, 1:]).reshape(-1, m.multi_modal_projector.linear_2.out_features)
        m.multi_modal_projector.linear_2.bias -= out.mean(0)
    f = project(bundle, hid).reshape(-1, bundle.model.config.text_config.hidden_size)
    log(f"[train] centred connector: mean norm {f.mean(0).norm():.3f}, deviation {(f - f.mean(0)).norm(dim=1).mean():.3f}")


@torch.no_grad()
def _reinit_text(bundle: Bundle, std: float, seed: int) -> None:
    """Re-initialise every non-vision Linear / Embedding with N(0, std) (biases 0); norms stay at 1."""
    g = torch.Generator().manual_seed(seed + 17)
    m = bundle.model
    vis = {id(p) for p in _vision_params(bundle)}
    for mod in m.modules():
        if isinstance(mod, (nn.Linear, nn.Embedding)) and id(mod.weight) not in vis:
            mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * std)
            if getattr(mod, "bias", None) is not None:
                mod.bias.zero_()
    log(f"[train] decoder / connector / lm_head re-initialised with std {std}")


# ------------------------------------------------------------------------- stage 1b + fast stage 2 (frozen encoder)
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
    params = _vision_params(bundle) + list(heads.parameters())
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
        hid, pooled = vision_hidden(bundle, pv[sel])
        loss, m = aux_loss(heads, hid, pooled, {k: v[sel] for k, v in lab.items()}, bundle.family, shape_weight,
                           count_weight)
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr, warm=20)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
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


@torch.no_grad()
def encode_pool(bundle: Bundle, n: int, chunk: int = 32) -> tuple[torch.Tensor, list]:
    """Frozen-encoder outputs for n training scenes (seeds from stage 2's base): [n, views, tokens, dim] + scenes."""
    prep = Prep(bundle)
    spec = scene_spec(bundle.extra["testbed"])
    merge = SMOL_SCALE if bundle.family == "idefics3" else 1
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
        hid, _ = vision_hidden(bundle, pv)
        hids.append(hid.reshape(len(scs), -1, *hid.shape[1:]).clone())
        scenes += scs
        if start % (chunk * 50) == 0:
            log(f"[pool {bundle.extra['testbed']}] {start + len(scs)}/{n} ({time.perf_counter() - t0:.0f}s)")
    bundle.model.train()
    return torch.cat(hids), scenes


def _answer_attention(tm, h_in: torch.Tensor, pos: torch.Tensor, img_idx: torch.Tensor, bi: torch.Tensor,
                      ti: torch.Tensor) -> torch.Tensor:
    """Attention of the last decoder layer from rows (bi, ti) over the image tokens alone, per head [N, heads, n_img].

    Recomputed from the layer's input for those rows only (SDPA never materialises attention weights)."""
    from transformers.models.llama.modeling_llama import rotate_half

    layer = tm.layers[-1]
    att = layer.self_attn
    x = layer.input_layernorm(h_in)
    hd = att.head_dim
    cos, sin = tm.rotary_emb(x, pos[None].expand(x.shape[0], -1))
    q = att.q_proj(x[bi, ti]).view(len(bi), -1, hd)
    c, s_ = cos[bi, ti][:, None], sin[bi, ti][:, None]
    q = q * c + rotate_half(q) * s_
    xi = x[:, img_idx]
    k = att.k_proj(xi).view(x.shape[0], len(img_idx), -1, hd)
    c, s_ = cos[:, img_idx][:, :, None], sin[:, img_idx][:, :, None]
    k = k * c + rotate_half(k) * s_
    k = k[bi].repeat_interleave(q.shape[1] // k.shape[2], dim=2)  # GQA: [N, n_img, heads, hd]
    scores = torch.einsum("nhd,nihd->nhi", q, k) * att.scaling
    return scores.softmax(-1)


def _centre_tokens(masks: np.ndarray) -> np.ndarray:
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


def train_stage2_pool(bundle: Bundle, pool: tuple[torch.Tensor, list], steps: int, batch: int, q_per_image: int,
                      lr: float, log_every=100, budget_s: float | None = None, ckpt: Path | None = None,
                      attn_sup: float = 0.0, count_centres: bool = False) -> dict:
    """Connector + decoder on a pool of pre-encoded scenes (encoder frozen), fresh questions every step.

    Same packed layout as `train_stage2` (prefix with the image once, then q_per_image question + answer segments
    that each see the prefix and themselves), SDPA attention, the LM head only on answer positions. ``attn_sup``:
    weight of a training-only loss that pulls each head of the last layer's attention from the answer position (over
    the image tokens) onto the tokens showing the objects the question is about (for relations: half the heads on
    each of the two objects). ``count_centres``: for count questions the target is one token per counted object (its
    centre) instead of every token showing them, so the attended mass grows with the number of objects rather than
    with their area (LLaVA testbed: one square view)."""
    if count_centres and bundle.family != "llava":
        raise ExportError("--count-centres needs a single-view testbed (llava)")
    hids, scenes = pool
    prompts = Prompts(bundle)
    model = bundle.model
    model.set_attn_implementation("sdpa")
    vset = {id(p) for p in _vision_params(bundle)}
    for p in _vision_params(bundle):
        p.requires_grad_(False)
    other = [p for p in model.parameters() if id(p) not in vset]
    opt = torch.optim.AdamW(other, lr=lr, weight_decay=0.01)
    P = len(prompts.prefix)
    prefix = torch.tensor(prompts.prefix)
    img_pos = prefix == bundle.image_token_id
    suffix_cache: dict[str, list[int]] = {}
    answer_cache: dict[str, list[int]] = {}
    L = max(len(prompts.suffix(q)) for q in vocabulary_corpus() if q.endswith("?")) + 2
    Q = q_per_image
    T = P + Q * L
    pos, bias = _packed_mask(P, Q, L, batch)
    rng = np.random.default_rng([bundle.seed, 5])
    weights = np.ones(len(QTYPES))
    err = np.full(len(QTYPES), 0.5)
    emb_layer = model.get_input_embeddings()
    tm = _text_model(bundle)
    hsz = model.config.text_config.hidden_size
    img_idx = torch.nonzero(img_pos)[:, 0]
    n_heads = model.config.text_config.num_attention_heads
    captured: dict = {}
    hook = tm.layers[-1].register_forward_pre_hook(lambda mod, args: captured.__setitem__("h", args[0])) \
        if attn_sup else None
    t0 = time.perf_counter()
    hist, budget_note, step = [], None, 0
    while step < steps:
        if budget_s and step == 20:
            per = (time.perf_counter() - t0) / 20
            fit = int(budget_s / per)
            if fit < steps:
                budget_note = f"steps2 {steps} -> {fit} to fit {budget_s:.0f}s at {per:.2f}s/step"
                log(f"[stage2 {bundle.extra['testbed']}] {budget_note}")
                steps = fit
        idx = rng.choice(len(scenes), batch, replace=False)
        hid = hids[torch.from_numpy(idx)]
        feats = project(bundle, hid.reshape(-1, *hid.shape[2:])).reshape(batch, -1, hsz)
        p = weights / weights.sum()
        ids = np.full((batch, Q, L), prompts.pad, np.int64)
        tgt = np.full((batch, Q, L), -100, np.int64)
        types = np.full((batch, Q), -1, np.int64)
        sup_b, sup_t, sup_m = [], [], []
        for b, i in enumerate(idx):
            sc, j, tries = scenes[i], 0, 0
            while j < Q and tries < 50:
                tries += 1
                ti = int(rng.choice(len(QTYPES), p=p))
                q = question(sc, QTYPES[ti], rng)
                if q is None:
                    continue
                s = suffix_cache.get(q["question"])
                if s is None:
                    s = suffix_cache[q["question"]] = prompts.suffix(q["question"])
                a = answer_cache.get(q["answer"])
                if a is None:
                    a = answer_cache[q["answer"]] = prompts.answer(q["answer"])
                sq = s + a
                ids[b, j, :len(sq)] = sq
                tgt[b, j, len(s) - 1:len(s) - 1 + len(a)] = a
                types[b, j] = ti
                if attn_sup and q["objs"]:
                    tok_obj = sc.extras["tok_obj"]
                    if QTYPES[ti] in ("leftright", "abovebelow"):
                        # relations: the first half of the heads looks at the first object, the rest at the second,
                        # so the layer's output keeps the two positions apart instead of averaging them
                        first, second = tok_obj[q["objs"][0]], tok_obj[q["objs"][1]]
                        rel = np.stack([first] * (n_heads // 2) + [second] * (n_heads - n_heads // 2))
                    elif count_centres and QTYPES[ti] == "count":
                        rel = np.repeat(_centre_tokens(tok_obj[q["objs"]]).any(0)[None], n_heads, 0)
                    else:
                        rel = np.repeat(tok_obj[q["objs"]].any(0)[None], n_heads, 0)
                    if rel.any(-1).all():
                        sup_b.append(b)
                        sup_t.append(P + j * L + len(s) - 1)
                        sup_m.append(rel)
                j += 1
        ids_t = torch.cat([prefix[None].repeat(batch, 1), torch.from_numpy(ids).reshape(batch, Q * L)], 1)
        tgt_t = torch.cat([torch.full((batch, P), -100), torch.from_numpy(tgt).reshape(batch, Q * L)], 1)
        emb = emb_layer(ids_t)
        mask_img = torch.zeros(batch, T, dtype=torch.bool)
        mask_img[:, :P] = img_pos
        emb = emb.masked_scatter(mask_img[..., None], feats.reshape(-1, hsz).to(emb.dtype))
        out = tm(inputs_embeds=emb, attention_mask=bias, position_ids=pos[None].expand(batch, T), use_cache=False)
        on = tgt_t != -100
        logits = model.lm_head(out.last_hidden_state[on])
        target = tgt_t[on]
        loss = F.cross_entropy(logits, target)
        if attn_sup and sup_b:
            rows = _answer_attention(tm, captured.pop("h"), pos, img_idx, torch.tensor(sup_b), torch.tensor(sup_t))
            mass = (rows * torch.from_numpy(np.stack(sup_m)).float()).sum(-1)  # [N, heads]
            loss = loss + attn_sup * (-torch.log(mass + 1e-6)).mean()
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(other, 1.0)
        opt.step()
        with torch.no_grad():
            # a question is right when every answer token (word + EOS) is
            seg_of = (torch.arange(batch)[:, None] * Q + (torch.arange(T)[None, :] - P).clamp(min=0) // L)[on]
            wrong = torch.zeros(batch * Q).index_add_(0, seg_of, (logits.argmax(-1) != target).float())
            ok = (wrong == 0).numpy().reshape(batch, Q)
            asked = types >= 0
            ok_t = np.bincount(types[asked], weights=ok[asked], minlength=len(QTYPES))
            n_t = np.bincount(types[asked], minlength=len(QTYPES))
            weights = _update_type_weights(err, ok_t, n_t)
        hist.append((float(loss.detach()), ok_t.sum() / max(1, n_t.sum())))
        if step % log_every == 0 or step == steps - 1:
            h = np.asarray(hist[-log_every:])
            acc = " ".join(f"{t}:{1 - e:.2f}" for t, e in zip(QTYPES, err))
            log(f"[stage2 {bundle.extra['testbed']}] step {step}/{steps} loss {h[:, 0].mean():.4f} acc "
                f"{h[:, 1].mean():.3f} | {acc} ({time.perf_counter() - t0:.0f}s)")
        if ckpt is not None and step % 200 == 199:
            torch.save(model.state_dict(), ckpt)
        step += 1
    model.set_attn_implementation("eager")
    if hook is not None:
        hook.remove()
    for p in _vision_params(bundle):
        p.requires_grad_(True)
    return {"steps": steps, "batch_images": batch, "questions_per_image": q_per_image, "lr": lr, "attn_sup": attn_sup,
            "count_centres": count_centres,
            "pool_scenes": len(scenes), "seconds": time.perf_counter() - t0, "budget_note": budget_note,
            "encoder": "frozen (stage-1 weights)",
            "final_running_acc": {t: round(1 - e, 4) for t, e in zip(QTYPES, err)}}


def snapshot(testbed: str, ckpt: Path, out: Path, seed: int) -> dict:
    """A model folder from a stage-2 checkpoint of a running `train` (weights saved every 200 steps), to evaluate
    progress on the held-out set before training ends. The tokenizer and config are rebuilt exactly as `train` does."""
    bundle = build_testbed(testbed, seed)
    sd = torch.load(ckpt)
    bundle.model.load_state_dict(sd.get("model", sd))
    save_trained(bundle, out)
    return {"testbed": testbed, "checkpoint": str(ckpt), "out": str(out)}
