"""Held-out eval sets (``evalset``) and transformers evaluation (``hf-eval``, optionally with random visual-token
dropping).

Convention (the Rust ``glimpse eval`` does exactly this): the user turn is the question text with one image, rendered
by the model's chat template with the generation prompt; the processor expands ``<image>``; greedy decoding until
EOS (at most MAX_ANSWER_TOKENS); prediction = decoded text (special tokens skipped), stripped, lower-cased; exact
match against ``answer``.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from ..common import ExportError, log, seed_everything
from ..families import Bundle
from ..images import load_rgb
from ..parity import messages
from ..scenes import QTYPES, make_scene, questions_for, render
from .config import TESTBEDS
from .data import Prompts
from .model import load_testbed

MAX_ANSWER_TOKENS = 8


# ------------------------------------------------------------------------------------------------------ eval sets
def write_evalset(testbed: str, out: Path, n_images: int, seed_base: int | None = None) -> dict:
    base = TESTBEDS[testbed].eval_seed_base if seed_base is None else seed_base
    spec = TESTBEDS[testbed].scene
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_images):
        sc = make_scene(spec, base + i)
        img, _ = render(sc)
        rel = f"images/{i:04d}.png"
        img.save(out / rel, format="PNG", optimize=True)
        for q in questions_for(sc):
            rows.append({"id": len(rows), "image": rel, "question": q["question"], "answer": q["answer"],
                         "type": q["type"]})
    with open(out / "questions.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    counts = {t: sum(r["type"] == t for r in rows) for t in QTYPES}
    size = sum(p.stat().st_size for p in (out / "images").glob("*.png"))
    return {"images": n_images, "questions": len(rows), "per_type": counts, "seed_base": base, "png_bytes": size}


def read_evalset(eval_dir: Path, limit: int | None = None) -> list[dict]:
    rows = [json.loads(l) for l in (eval_dir / "questions.jsonl").read_text().splitlines() if l.strip()]
    return rows[:limit] if limit else rows


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def summarize(rows: list[dict], preds: list[str]) -> dict:
    ok = [p == r["answer"] for p, r in zip(preds, rows)]

    def block(sel):
        n = len(sel)
        k = int(sum(sel))
        lo, hi = wilson(k, n)
        return {"accuracy": round(k / n, 4) if n else None, "n": n, "ci95": [round(lo, 4), round(hi, 4)]}

    out = {"overall": block(ok), "per_type": {}}
    for t in QTYPES:
        sel = [o for o, r in zip(ok, rows) if r["type"] == t]
        if sel:
            out["per_type"][t] = block(sel)
    return out


# ---------------------------------------------------------------------------------------------- transformers eval
def normalize(text: str) -> str:
    return text.strip().lower()


@torch.no_grad()
def _step(model, embeds, total, cache):
    out = model(inputs_embeds=embeds, attention_mask=torch.ones(1, total, dtype=torch.long), cache=cache,
                use_cache=True)
    return out, (out.cache if hasattr(out, "cache") else out.past_key_values)


@torch.no_grad()
def greedy_after_prefix(bundle: Bundle, prefix_cache, prefix_len: int, suffix_ids: list[int]) -> list[int]:
    """Greedy answer for prompt = (cached prefix) + suffix_ids. The prefix (BOS, chat header, the image tokens) is
    identical for every question of one picture, so its KV cache is computed once and copied."""
    model = bundle.model
    emb_layer = model.get_input_embeddings()
    cache = copy.deepcopy(prefix_cache)
    total = prefix_len + len(suffix_ids)
    out, cache = _step(model, emb_layer(torch.tensor([suffix_ids])), total, cache)
    gen = []
    for _ in range(MAX_ANSWER_TOKENS):
        tok = int(out.logits[0, -1].argmax())
        gen.append(tok)
        if tok in bundle.eos_token_ids:
            break
        total += 1
        out, cache = _step(model, emb_layer(torch.tensor([[tok]])), total, cache)
    return gen


def keep_rows(n: int, keep: float, seed: int, image_index: int) -> np.ndarray:
    """Sorted indices of the image-feature rows kept by --keep-random (seeded per image)."""
    k = max(1, int(round(keep * n)))
    rng = np.random.default_rng([seed, image_index])
    return np.sort(rng.choice(n, size=k, replace=False))


def groups(rows: list[dict]) -> list[list[dict]]:
    out: list[list[dict]] = []
    for r in rows:
        if out and out[-1][0]["image"] == r["image"]:
            out[-1].append(r)
        else:
            out.append([r])
    return out


@torch.no_grad()
def predict(bundle: Bundle, eval_dir: Path, rows: list[dict], keep: float | None = None, seed: int = 0,
            progress: bool = True) -> list[str]:
    """Greedy answers with transformers. Per picture: processor on (picture, first question) -> pixel values and the
    expanded prompt; image features via get_image_features; the prompt prefix up to the end of the image block is
    run once (KV cache), each question's suffix (question text + chat tail) continues from a copy of it."""
    proc, tok = bundle.processor, bundle.tokenizer
    prompts = Prompts(bundle)
    model = bundle.model
    emb_layer = model.get_input_embeddings()
    preds: dict[int, str] = {}
    t0, done = time.perf_counter(), 0
    for grp in groups(rows):
        img = load_rgb(eval_dir / grp[0]["image"])
        text = proc.apply_chat_template(messages(grp[0]["question"]), add_generation_prompt=True)
        inputs = proc(images=[img], text=[text], return_tensors="pt")
        feats = bundle.spec.image_features(model, inputs)
        ids = inputs["input_ids"][0]
        suf0 = prompts.suffix(grp[0]["question"])
        P = len(ids) - len(suf0)
        if ids[P:].tolist() != suf0:
            raise ExportError("prompt suffix tokenization differs from the processor's")
        pre = ids[:P]
        is_img = pre == bundle.image_token_id
        if int(is_img.sum()) != feats.shape[0]:
            raise ExportError(f"{int(is_img.sum())} image tokens for {feats.shape[0]} feature rows")
        if keep is not None and keep < 1.0:
            kept = torch.from_numpy(keep_rows(feats.shape[0], keep, seed, int(Path(grp[0]["image"]).stem)))
            img_pos = torch.nonzero(is_img)[:, 0]
            drop = torch.ones(len(img_pos), dtype=torch.bool)
            drop[kept] = False
            keep_tok = torch.ones(len(pre), dtype=torch.bool)
            keep_tok[img_pos[drop]] = False
            pre = pre[keep_tok]
            feats = feats[kept]
            is_img = pre == bundle.image_token_id
        emb = emb_layer(pre[None]).clone()
        emb[0, is_img] = feats
        out = model(inputs_embeds=emb, attention_mask=torch.ones(1, len(pre), dtype=torch.long), use_cache=True)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        for r in grp:
            gen = greedy_after_prefix(bundle, cache, len(pre), prompts.suffix(r["question"]))
            preds[r["id"]] = normalize(tok.decode(gen, skip_special_tokens=True))
            done += 1
            if progress and done % 200 == 0:
                log(f"  {done}/{len(rows)} ({time.perf_counter() - t0:.0f}s)")
    return [preds[r["id"]] for r in rows]


def run_hf_eval(model_dir: Path, keep: float | None, seed: int, limit: int | None) -> dict:
    seed_everything(0)
    bundle = load_testbed(model_dir)
    eval_dir = model_dir / "eval"
    rows = read_evalset(eval_dir, limit)
    t0 = time.perf_counter()
    preds = predict(bundle, eval_dir, rows, keep, seed)
    res = summarize(rows, preds)
    res.update({"model": str(model_dir), "keep_random": keep, "seed": seed if keep is not None else None,
                "items": len(rows), "seconds": round(time.perf_counter() - t0, 1)})
    return res
