"""Stage 2 of ``train``: connector + decoder on packed questions, either with live scenes (``train_stage2``, the
encoder optionally unfrozen) or on a pool of pre-encoded scenes with the encoder frozen (``train_stage2_pool``,
the fast path the committed testbeds use)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from ..common import ExportError, log
from ..families import Bundle
from ..scenes import QTYPES, question, token_objects, vocabulary_corpus
from .config import TESTBEDS, TRAIN_SEED_BASE
from .data import Prep, Prompts, centre_tokens, packed_mask, scene_batch
from .losses import answer_attention, attention_mass_loss, aux_loss
from .model import AuxHeads, vision_params
from .optim import lr_at, optimizer_step, update_type_weights


def _progress(bundle: Bundle, step: int, steps: int, hist: list, err: np.ndarray) -> str:
    """The stage-2 log line: mean loss and accuracy over ``hist``, running accuracy per question type."""
    h = np.asarray(hist)
    acc = " ".join(f"{t}:{1 - e:.2f}" for t, e in zip(QTYPES, err))
    return (f"[stage2 {bundle.extra['testbed']}] step {step}/{steps} loss {h[:, 0].mean():.4f} acc "
            f"{h[:, 1].mean():.3f} | {acc}")


def train_stage2(bundle: Bundle, heads: AuxHeads, steps: int, batch: int, q_per_image: int, lr: float,
                 vision_lr: float, unfreeze_at: float, log_every=50, budget_s: float | None = None,
                 ckpt: Path | None = None, aux_number_views: int = 0, attn_sup: float = 0.0) -> dict:
    prep, prompts = Prep(bundle), Prompts(bundle)
    spec = bundle.spec
    model = bundle.model
    vparams = vision_params(bundle)
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
    tm = bundle.spec.text_model(model)
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
            hid, pooled = spec.vision_hidden(model, pv)
        else:
            with torch.no_grad():
                hid, pooled = spec.vision_hidden(model, pv)
        feats = spec.project(model, hid).reshape(batch, -1, model.config.text_config.hidden_size)
        # packed sequences: prefix + q_per_image segments (each sees the prefix and itself only)
        p = weights / weights.sum()
        seg_ids, seg_tgt, seg_types, seg_rel = [], [], [], []
        merge = spec.token_merge(model.config)
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
        pos, bias = packed_mask(P, Q, L, batch)
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
                loss = loss + attn_sup * attention_mass_loss(rows, np.stack(masks))
        if train_vision:
            aloss, _ = aux_loss(heads, hid, pooled, lab, spec)
            loss = loss + 0.3 * aloss
            if aux_number_views:
                # extra dense supervision on the view holding the number (digits are rare: one per picture)
                aseeds = [TRAIN_SEED_BASE[3] + step * aux_number_views + i for i in range(aux_number_views)]
                pva, laba, sca = scene_batch(bundle, prep, aseeds)
                nv = len(prep.view_regions())
                sel = torch.tensor([i * nv + (sc.number_quadrant if nv > 1 else 0) for i, sc in enumerate(sca)])
                hida, pooleda = spec.vision_hidden(model, pva[sel])
                aloss2, am = aux_loss(heads, hida, pooleda, {k: v[sel] for k, v in laba.items()}, spec)
                loss = loss + 0.3 * aloss2
                digit_hist.append(am["digit_acc"])
        for g in opt.param_groups:
            if g["base"] == lr:
                g["lr"] = lr_at(step, steps, lr)
            else:
                g["lr"] = lr_at(step - unfreeze_step, steps - unfreeze_step, vision_lr, warm=30) if train_vision else 0.0
        optimizer_step(opt, loss, list(model.parameters()) + list(heads.parameters()))
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
            weights = update_type_weights(err, ok_t, n_t)
        hist.append((float(loss.detach()), ok_t.sum() / max(1, n_t.sum())))
        if step % log_every == 0 or step == steps - 1:
            log(f"{_progress(bundle, step, steps, hist[-log_every:], err)} | "
                f"vision {'on' if train_vision else 'frozen'} "
                f"{'aux-digit %.3f ' % np.mean(digit_hist[-log_every:]) if digit_hist else ''}"
                f"({time.perf_counter() - t0:.0f}s)")
        if ckpt is not None and step % 50 == 49:
            torch.save(model.state_dict(), ckpt)
        step += 1
    return {"steps": steps, "batch_images": batch, "questions_per_image": q_per_image,
            "seconds": time.perf_counter() - t0, "unfreeze_step": unfreeze_step, "budget_note": budget_note,
            "final_running_acc": {t: round(1 - e, 4) for t, e in zip(QTYPES, err)}}


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
    if count_centres and len(TESTBEDS[bundle.extra["testbed"]].view_regions()) != 1:
        raise ExportError("--count-centres needs a single-view testbed (llava)")
    hids, scenes = pool
    prompts = Prompts(bundle)
    model = bundle.model
    model.set_attn_implementation("sdpa")
    vset = {id(p) for p in vision_params(bundle)}
    for p in vision_params(bundle):
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
    pos, bias = packed_mask(P, Q, L, batch)
    rng = np.random.default_rng([bundle.seed, 5])
    weights = np.ones(len(QTYPES))
    err = np.full(len(QTYPES), 0.5)
    emb_layer = model.get_input_embeddings()
    tm = bundle.spec.text_model(model)
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
        feats = bundle.spec.project(model, hid.reshape(-1, *hid.shape[2:])).reshape(batch, -1, hsz)
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
                        rel = np.repeat(centre_tokens(tok_obj[q["objs"]]).any(0)[None], n_heads, 0)
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
            rows = answer_attention(tm, captured.pop("h"), pos, img_idx, torch.tensor(sup_b), torch.tensor(sup_t))
            loss = loss + attn_sup * attention_mass_loss(rows, np.stack(sup_m))  # rows: [N, heads, n_img]
        optimizer_step(opt, loss, other, lr_at(step, steps, lr))
        with torch.no_grad():
            # a question is right when every answer token (word + EOS) is
            seg_of = (torch.arange(batch)[:, None] * Q + (torch.arange(T)[None, :] - P).clamp(min=0) // L)[on]
            wrong = torch.zeros(batch * Q).index_add_(0, seg_of, (logits.argmax(-1) != target).float())
            ok = (wrong == 0).numpy().reshape(batch, Q)
            asked = types >= 0
            ok_t = np.bincount(types[asked], weights=ok[asked], minlength=len(QTYPES))
            n_t = np.bincount(types[asked], minlength=len(QTYPES))
            weights = update_type_weights(err, ok_t, n_t)
        hist.append((float(loss.detach()), ok_t.sum() / max(1, n_t.sum())))
        if step % log_every == 0 or step == steps - 1:
            log(f"{_progress(bundle, step, steps, hist[-log_every:], err)} ({time.perf_counter() - t0:.0f}s)")
        if ckpt is not None and step % 200 == 199:
            torch.save(model.state_dict(), ckpt)
        step += 1
    model.set_attn_implementation("eager")
    if hook is not None:
        hook.remove()
    for p in vision_params(bundle):
        p.requires_grad_(True)
    return {"steps": steps, "batch_images": batch, "questions_per_image": q_per_image, "lr": lr, "attn_sup": attn_sup,
            "count_centres": count_centres,
            "pool_scenes": len(scenes), "seconds": time.perf_counter() - t0, "budget_note": budget_note,
            "encoder": "frozen (stage-1 weights)",
            "final_running_acc": {t: round(1 - e, 4) for t, e in zip(QTYPES, err)}}
