"""Camera-like scene sequences (``scenestream``): one testbed scene whose objects drift, pause, appear and disappear,
with standing questions answered for every frame.

The background and the number never change (same seed and tones, so the background is bit-exact in every frame);
an object moves a few pixels per frame while it is in a moving phase, reflects at its quadrant's border (margin 2, as
``make_scene`` places objects) and never comes within 2 px of another object or the number, so it stays fully inside
its quadrant. Most frames therefore differ from their predecessor only around one or two objects, and now and then
nothing moves at all (a global pause, or every object resting): the frame repeats its predecessor exactly. Every
10-20 frames (seeded) an event happens: an object appears or disappears, or the subject of a quadrant question
jumps to another quadrant (gone and back in the same frame, so it is present in every frame).

Standing questions (``prompts`` of them, cycling count, exist, quadrant, colour, shape) are picked on the first frame
and constrain the events so each one is well-defined in every frame: a quadrant / colour / shape subject is never
removed, no second object of a colour question's shape (or a shape question's colour) is added, and no shape
exceeds three objects. Events prefer the count and exist subjects, so those answers change over time. The texts come
from ``scenes.question_text`` (the eval sets' phrasing), the answers from ``scenes.answer_of`` on each frame's scene.

Output: ``OUT/frames/NNNN.png``, ``OUT/sequence.jsonl`` (one row per (prompt, frame), grouped by prompt) and
``OUT/sequence_info.json`` (per frame: changed pixels vs the previous frame, their bounding box, the changed views).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..common import ExportError
from ..scenes import (COLOUR_NAMES, COUNT_WORDS, DIGIT_BASE, QUADRANTS, SHAPES, Obj, Scene, SceneSpec, answer_of,
                      make_scene, question_text, render)
from .config import TESTBEDS

STANDING = ["count", "exist", "quadrant", "colour", "shape"]  # cycled when choosing the standing questions
ANSWERS = {"count": COUNT_WORDS, "exist": ["yes", "no"], "quadrant": QUADRANTS, "colour": COLOUR_NAMES,
           "shape": SHAPES}
MARGIN = 2  # object box to quadrant border (make_scene's margin)
GAP = 2  # free pixels between two boxes (make_scene's free())
EVERY = (10, 20)  # frames between events
MOVE = (3, 10)  # frames an object moves ...
REST = (4, 16)  # ... and rests
PAUSE_P = 0.07  # chance per frame that a global pause (1-3 identical frames) starts


@dataclass
class _Mover:
    obj: Obj
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    vx: int
    vy: int
    moving: bool
    left: int  # frames left in this phase


def _apart(b: tuple[int, int, int, int], others) -> bool:
    x0, y0, x1, y1 = b
    return all(x1 + GAP <= c0 or c1 + GAP <= x0 or y1 + GAP <= d0 or d1 + GAP <= y0 for c0, d0, c1, d1 in others)


def _inside(spec: SceneSpec, q: int, b: tuple[int, int, int, int]) -> bool:
    half = spec.size // 2
    qx, qy = (q % 2) * half, (q // 2) * half
    return qx + MARGIN <= b[0] and b[2] <= qx + half - MARGIN and qy + MARGIN <= b[1] and b[3] <= qy + half - MARGIN


class _Stream:
    """The evolving scene: movers, the fixed number, the event schedule and the standing questions' constraints."""

    def __init__(self, spec: SceneSpec, seed: int, n_prompts: int):
        self.spec = spec
        self.base = make_scene(spec, seed)
        self.rng = np.random.default_rng([seed, 5150])
        self.speed = max(2, round(spec.size / 96))  # max |v| per axis: 3 px on 256 px scenes, 2 px on 96 px
        self.movers = [self._mover(o, b) for o, b in zip(self.base.objects, self.base.extras["boxes"])]
        self.prompts = self._standing(n_prompts)
        self.keep = {s for t, s in self.prompts if t == "quadrant"}
        self.keep |= {(o.colour, o.shape) for o in self.base.objects for t, s in self.prompts
                      if (t, s) in (("colour", o.shape), ("shape", o.colour))}
        self.unique_shapes = {s for t, s in self.prompts if t == "colour"}
        self.unique_colours = {s for t, s in self.prompts if t == "shape"}
        self.pause = 0
        self.turn = 0  # next count / exist question an event aims at
        self.next_event = int(self.rng.integers(EVERY[0], EVERY[1] + 1))
        self.events: list[dict] = []

    # ------------------------------------------------------------------------------------------------ set up
    def _velocity(self) -> tuple[int, int]:
        while True:
            vx, vy = (int(v) for v in self.rng.integers(-self.speed, self.speed + 1, size=2))
            if vx or vy:
                return vx, vy

    def _mover(self, o: Obj, box) -> _Mover:
        vx, vy = self._velocity()
        moving = bool(self.rng.random() < 0.4)
        lo, hi = MOVE if moving else REST
        return _Mover(replace(o), tuple(box), vx, vy, moving, int(self.rng.integers(lo, hi + 1)))

    def _standing(self, k: int) -> list[tuple[str, object]]:
        """k distinct (qtype, subject) pairs, well-defined on the first frame, their types cycling through STANDING;
        a subject about other (colour, shape) combinations than the ones picked before is preferred (a colour question
        on a counted shape would freeze the count)."""
        objs = self.base.objects
        shapes, colours = [o.shape for o in objs], [o.colour for o in objs]
        shuffled = lambda xs: [xs[i] for i in self.rng.permutation(len(xs))]  # noqa: E731
        present = shuffled(sorted((o.colour, o.shape) for o in objs))
        absent = shuffled(sorted({(c, s) for c in COLOUR_NAMES for s in SHAPES} - set(present)))
        cands = {
            "count": shuffled([s for s in SHAPES if shapes.count(s) > 0]) + shuffled([s for s in SHAPES
                                                                                      if shapes.count(s) == 0]),
            "exist": [x for pair in zip(present, absent) for x in pair] + absent[len(present):],
            "quadrant": shuffled(sorted(present)),
            "colour": shuffled([s for s in SHAPES if shapes.count(s) == 1]),
            "shape": shuffled([c for c in COLOUR_NAMES if colours.count(c) == 1]),
        }

        def touches(t: str, s) -> set[tuple[str, str]]:
            if t in ("count", "colour"):
                return {(c, s) for c in COLOUR_NAMES}
            if t == "shape":
                return {(s, sh) for sh in SHAPES}
            return {tuple(s)}

        types: list[str] = []
        while len(types) < k:
            more = [t for t in STANDING if types.count(t) < len(cands[t])]
            if not more:
                raise ExportError(f"only {len(types)} standing questions fit this scene (asked for {k})")
            types += more[:k - len(types)]
        # subjects of the constraining types first, so the count / exist subjects can avoid what they freeze
        out: list[tuple[str, object]] = [("", None)] * k
        used: set[tuple[str, str]] = set()
        for i in sorted(range(k), key=lambda i: (types[i] in ("count", "exist"), i)):
            t = types[i]
            j = next((j for j, s in enumerate(cands[t]) if not touches(t, s) & used), 0)
            out[i] = (t, cands[t].pop(j))
            used |= touches(*out[i])
        return out

    # ------------------------------------------------------------------------------------------------ frames
    def scene(self) -> Scene:
        b = self.base
        sc = Scene(b.seed, b.spec, [replace(m.obj) for m in self.movers], b.number, b.number_box, b.number_quadrant,
                   b.bg)
        sc.extras["boxes"] = [m.box for m in self.movers]
        return sc

    def _blocked(self, skip: _Mover | None = None) -> list[tuple[int, int, int, int]]:
        return [self.base.number_box] + [m.box for m in self.movers if m is not skip]

    def _place(self, size: int, quadrants: list[int]) -> tuple[int, tuple[int, int, int, int]] | None:
        half = self.spec.size // 2
        blocked = self._blocked()
        for _ in range(200):
            q = quadrants[int(self.rng.integers(len(quadrants)))]
            qx, qy = (q % 2) * half, (q // 2) * half
            x0 = int(self.rng.integers(qx + MARGIN, qx + half - MARGIN - size + 1))
            y0 = int(self.rng.integers(qy + MARGIN, qy + half - MARGIN - size + 1))
            b = (x0, y0, x0 + size, y0 + size)
            if _apart(b, blocked):
                return q, b
        return None

    def _set_box(self, m: _Mover, q: int, b: tuple[int, int, int, int]) -> None:
        m.box = b
        m.obj.cx, m.obj.cy, m.obj.quadrant = (b[0] + b[2]) // 2, (b[1] + b[3]) // 2, q

    def _move(self, m: _Mover) -> None:
        x0, y0, x1, y1 = m.box
        w, h = x1 - x0, y1 - y0
        q = m.obj.quadrant
        nx, ny = x0 + m.vx, y0 + m.vy
        if not _inside(self.spec, q, (nx, y0, nx + w, y1)):  # reflect at the quadrant border
            m.vx = -m.vx
            nx = x0 + m.vx if _inside(self.spec, q, (x0 + m.vx, y0, x0 + m.vx + w, y1)) else x0
        if not _inside(self.spec, q, (x0, ny, x1, ny + h)):
            m.vy = -m.vy
            ny = y0 + m.vy if _inside(self.spec, q, (x0, y0 + m.vy, x1, y0 + m.vy + h)) else y0
        b = (nx, ny, nx + w, ny + h)
        if _apart(b, self._blocked(m)):
            self._set_box(m, q, b)
        else:  # would touch another object or the number: bounce back, stay this frame
            m.vx, m.vy = -m.vx, -m.vy

    def _event(self, index: int) -> None:
        rng, spec = self.rng, self.spec
        keys = {(m.obj.colour, m.obj.shape) for m in self.movers}
        shape_n = {s: sum(m.obj.shape == s for m in self.movers) for s in SHAPES}
        adds = [(c, s) for c in COLOUR_NAMES for s in SHAPES if (c, s) not in keys and shape_n[s] < 3
                and s not in self.unique_shapes and c not in self.unique_colours]
        removes = [m for m in self.movers if (m.obj.colour, m.obj.shape) not in self.keep]
        n = len(self.movers)
        # mostly aim at the count / exist questions in turn, so their answers change over time
        targets = [(t, s) for t, s in self.prompts if t in ("count", "exist")]
        if targets and rng.random() < 0.7:
            t, s = targets[self.turn % len(targets)]
            self.turn += 1
            hit = (lambda key: key[1] == s) if t == "count" else (lambda key: key == tuple(s))  # noqa: E731
            adds_t = [a for a in adds if hit(a)]
            removes_t = [m for m in removes if hit((m.obj.colour, m.obj.shape))]
            if (adds_t and n < spec.max_objects) or (removes_t and n > spec.min_objects):
                adds, removes = adds_t, removes_t
        kinds = (["add"] if adds and n < spec.max_objects else []) + (
            ["remove"] if removes and n > spec.min_objects else [])
        jumpers = sorted(s for t, s in self.prompts if t == "quadrant")
        if jumpers and rng.random() < 0.3:
            kinds = ["jump"]
        if not kinds:
            return
        kind = kinds[int(rng.integers(len(kinds)))]
        if kind == "add":
            c, s = adds[int(rng.integers(len(adds)))]
            lo, hi = spec.small if rng.random() < spec.small_prob else spec.large
            size = int(rng.integers(lo, hi + 1))
            got = self._place(size, list(range(4)))
            if got is None:
                return
            q, b = got
            m = self._mover(Obj(s, c, size, 0, 0, q), b)
            self._set_box(m, q, b)
            self.movers.append(m)
            self.events.append({"index": index, "kind": "add", "object": m.obj.name, "quadrant": QUADRANTS[q]})
        elif kind == "remove":
            m = removes[int(rng.integers(len(removes)))]
            self.movers.remove(m)
            self.events.append({"index": index, "kind": "remove", "object": m.obj.name,
                                "quadrant": QUADRANTS[m.obj.quadrant]})
        else:  # jump: a quadrant subject leaves its quadrant and appears in another one
            c, s = jumpers[int(rng.integers(len(jumpers)))]
            m = next(m for m in self.movers if (m.obj.colour, m.obj.shape) == (c, s))
            others = [q for q in range(4) if q != m.obj.quadrant]
            got = self._place(m.obj.size, others)
            if got is None:
                return
            self._set_box(m, *got)
            self.events.append({"index": index, "kind": "jump", "object": m.obj.name, "quadrant": QUADRANTS[got[0]]})

    def step(self, index: int) -> None:
        """Advance to frame ``index`` (>= 1)."""
        rng = self.rng
        if self.pause > 0:
            self.pause -= 1
            return
        if rng.random() < PAUSE_P:
            self.pause = int(rng.integers(0, 3))
            return
        if index >= self.next_event:
            self._event(index)
            self.next_event = index + int(rng.integers(EVERY[0], EVERY[1] + 1))
        for m in self.movers:
            m.left -= 1
            if m.left <= 0:
                m.moving = not m.moving
                lo, hi = MOVE if m.moving else REST
                m.left = int(rng.integers(lo, hi + 1))
                if m.moving and rng.random() < 0.5:
                    m.vx, m.vy = self._velocity()
            if m.moving:
                self._move(m)


def _check_frame(sc: Scene, ids: np.ndarray, rgb: np.ndarray, ref: np.ndarray, index: int) -> None:
    """Self-checks: objects fully inside their quadrants and apart, the background + number bit-exact."""
    boxes = sc.extras["boxes"]
    for k, (o, b) in enumerate(zip(sc.objects, boxes)):
        if not _inside(sc.spec, o.quadrant, b) or not _apart(b, [sc.number_box] + boxes[:k] + boxes[k + 1:]):
            raise ExportError(f"frame {index}: {o.name} at {b} leaves its quadrant or touches another object")
    bg = (ids == 0) | (ids >= DIGIT_BASE)
    if not np.array_equal(rgb[bg], ref[bg]):
        raise ExportError(f"frame {index}: background differs from the first frame's")


def write_sequence(testbed: str, out: Path, frames: int, seed: int, prompts: int = 4) -> dict:
    """Write ``frames`` frames of one testbed scene sequence and its standing questions into ``out``."""
    if frames < 1 or prompts < 1:
        raise ExportError("frames and prompts must be >= 1")
    tb = TESTBEDS[testbed]
    spec = tb.scene
    stream = _Stream(spec, seed, prompts)
    (out / "frames").mkdir(parents=True, exist_ok=True)
    b = stream.base
    ref_img, _ = render(Scene(b.seed, spec, [], b.number, b.number_box, b.number_quadrant, b.bg, {"boxes": []}))
    ref = np.asarray(ref_img.convert("RGB"))
    regions = tb.view_regions()
    answers: list[list[str]] = [[] for _ in stream.prompts]
    per_frame, prev = [], None
    for i in range(frames):
        if i:
            stream.step(i)
        sc = stream.scene()
        img, ids = render(sc)
        rgb = np.asarray(img.convert("RGB"))
        _check_frame(sc, ids, rgb, ref, i)
        rel = f"frames/{i:04d}.png"
        img.save(out / rel, format="PNG", optimize=True)
        for k, (t, s) in enumerate(stream.prompts):
            a = answer_of(sc, t, s)
            if a not in ANSWERS[t]:
                raise ExportError(f"frame {i}: {question_text(t, s)!r} has no valid answer ({a!r})")
            answers[k].append(a)
        row = {"frame": rel, "index": i, "objects": len(sc.objects), "changed_pixels": None, "changed_box": None,
               "changed_views": None}
        if prev is not None:
            diff = (rgb != prev).any(-1)
            ys, xs = np.nonzero(diff)
            row["changed_pixels"] = int(diff.sum())
            if len(xs):
                row["changed_box"] = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
            row["changed_views"] = [v for v, (x0, y0, side, _) in enumerate(regions)
                                    if diff[y0:y0 + side, x0:x0 + side].any()]
        per_frame.append(row)
        prev = rgb
    with open(out / "sequence.jsonl", "w", encoding="utf-8") as f:
        for (t, s), ans in zip(stream.prompts, answers):
            for i, a in enumerate(ans):
                f.write(json.dumps({"frame": f"frames/{i:04d}.png", "index": i, "prompt": question_text(t, s),
                                    "qtype": t, "answer": a}) + "\n")
    changed = [r["changed_pixels"] for r in per_frame[1:]]
    questions = [{"prompt": question_text(t, s), "qtype": t, "answers": {a: ans.count(a) for a in sorted(set(ans))},
                  "changes": sum(x != y for x, y in zip(ans, ans[1:]))} for (t, s), ans in zip(stream.prompts, answers)]
    summary = {
        "testbed": testbed, "seed": seed, "frames": frames, "prompts": len(stream.prompts), "rows": frames * prompts,
        "size": spec.size, "identical_frames": sum(c == 0 for c in changed),
        "mean_changed_fraction": round(float(np.mean(changed)) / spec.size ** 2, 6) if changed else 0.0,
        "events": len(stream.events), "questions": questions,
        "png_bytes": sum((out / r["frame"]).stat().st_size for r in per_frame),
    }
    info = dict(summary, views=[list(r) for r in regions], events=stream.events, per_frame=per_frame)
    (out / "sequence_info.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    return summary


def check_sequence(testbed: str, seed: int, frames: int = 12, prompts: int = 4) -> dict:
    """Write a sequence twice into temp folders and require byte-identical files (plus write_sequence's own
    checks: background bit-exact, objects inside their quadrants, every answer valid)."""
    import filecmp
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        a, b = Path(d) / "a", Path(d) / "b"
        res = write_sequence(testbed, a, frames, seed, prompts)
        write_sequence(testbed, b, frames, seed, prompts)
        names = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
        _, bad, err = filecmp.cmpfiles(a, b, names, shallow=False)
        if bad or err or sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file()) != names:
            raise ExportError(f"scenestream is not deterministic: {bad + err}")
    return dict(res, check="ok: two runs byte-identical", files=len(names))
