"""Synthetic scenes + one-word-answer questions for the testbeds (~470 lines: one Scene model for all of it).

Deterministic: the renderer, the questions and the per-patch labels all read the same ``Scene``.

A scene is a square picture with a blocky noise background (a few dull tones, so palette PNGs stay small), several
small objects (shape x colour x size, some tiny) each lying fully inside one quadrant, and one small one- or
two-digit number drawn with a built-in 3x5 pixel font (no font files; SmolVLM scenes: 1 px per font cell, each digit
alone in one 8 px cell of the tile's patch grid, so one visual token shows it). Everything depends only on the seed.

Question types (one-word answers, lower case):
  colour      What colour is the {shape}?                      (shape unique in the scene)   -> red ...
  shape       What shape is the {colour} object?               (colour unique)              -> circle ...
  count       How many {shape}s are there?                                                  -> zero .. three
  leftright   Is the {c} {s} left or right of the {c} {s}?                                  -> left / right
  abovebelow  Is the {c} {s} above or below the {c} {s}?                                    -> above / below
  quadrant    Where is the {c} {s}?                                                         -> topleft ...
  exist       Is there a {c} {s}?                                                           -> yes / no
  ocr         What number is written?                                                       -> 7, 42 ...
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (225, 30, 30),
    "green": (30, 185, 40),
    "blue": (40, 70, 235),
    "yellow": (245, 225, 30),
    "purple": (155, 40, 205),
    "cyan": (30, 215, 225),
}
COLOUR_NAMES = list(COLOURS)
SHAPES = ["circle", "square", "triangle", "cross"]
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
COUNT_WORDS = ["zero", "one", "two", "three"]
QUADRANTS = ["topleft", "topright", "bottomleft", "bottomright"]
QTYPES = ["colour", "shape", "count", "leftright", "abovebelow", "quadrant", "exist", "ocr"]
DIGIT_RGB = (250, 250, 250)
# dull background tone sets (4 tones each)
BACKGROUNDS = [
    [(96, 96, 96), (112, 112, 112), (128, 128, 128), (104, 100, 92)],
    [(110, 90, 70), (124, 102, 80), (98, 82, 64), (132, 112, 90)],
    [(80, 100, 80), (92, 112, 90), (104, 120, 98), (86, 96, 86)],
    [(84, 92, 112), (96, 104, 124), (108, 114, 132), (90, 90, 100)],
]

# 3x5 digit glyphs, rows top to bottom
_GLYPHS = {
    "0": ["111", "101", "101", "101", "111"],
    "1": ["010", "110", "010", "010", "111"],
    "2": ["111", "001", "111", "100", "111"],
    "3": ["111", "001", "111", "001", "111"],
    "4": ["101", "101", "111", "001", "001"],
    "5": ["111", "100", "111", "001", "111"],
    "6": ["111", "100", "111", "101", "111"],
    "7": ["111", "001", "010", "010", "010"],
    "8": ["111", "101", "111", "101", "111"],
    "9": ["111", "101", "111", "001", "111"],
}

# label ids in the object-id map: 0 background, 1..N objects, DIGIT_BASE + d digit pixels
DIGIT_BASE = 100


@dataclass(frozen=True)
class SceneSpec:
    size: int  # picture side in pixels
    min_objects: int
    max_objects: int
    small: tuple[int, int]  # object side range (pixels) for small / tiny objects
    large: tuple[int, int]
    digit_scale: int  # pixels per glyph cell (glyph is 3x5 cells)
    block: int  # background noise block size
    min_sep: int  # minimum |dx| / |dy| for relation questions
    small_prob: float = 0.45
    # > 0: each digit of the number sits alone in one cell of this pixel grid (the encoder's patch grid), so a
    # single visual token shows it (digit_scale 1: a 3x5 px glyph per 8 px patch)
    digit_grid: int = 0


SMOL_SCENE = SceneSpec(size=256, min_objects=3, max_objects=6, small=(7, 10), large=(16, 26), digit_scale=1,
                       block=4, min_sep=12, digit_grid=8)
LLAVA_SCENE = SceneSpec(size=96, min_objects=3, max_objects=5, small=(5, 7), large=(9, 13), digit_scale=2,
                        block=2, min_sep=6)


@dataclass
class Obj:
    shape: str
    colour: str
    size: int
    cx: int
    cy: int
    quadrant: int  # index into QUADRANTS

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class Scene:
    seed: int
    spec: SceneSpec
    objects: list[Obj]
    number: str
    number_box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    number_quadrant: int
    bg: int
    extras: dict = field(default_factory=dict)


def _quadrant_of(spec: SceneSpec, x: float, y: float) -> int:
    h = spec.size / 2
    return int(y >= h) * 2 + int(x >= h)


def make_scene(spec: SceneSpec, seed: int) -> Scene:
    rng = np.random.default_rng([seed, 7331])
    half = spec.size // 2
    margin = 2
    boxes: list[tuple[int, int, int, int]] = []

    def free(b):
        x0, y0, x1, y1 = b
        return all(x1 + 2 <= c0 or c1 + 2 <= x0 or y1 + 2 <= d0 or d1 + 2 <= y0 for c0, d0, c1, d1 in boxes)

    def place(w: int, h: int):
        for _ in range(200):
            q = int(rng.integers(4))
            qx, qy = (q % 2) * half, (q // 2) * half
            x0 = int(rng.integers(qx + margin, qx + half - margin - w + 1))
            y0 = int(rng.integers(qy + margin, qy + half - margin - h + 1))
            b = (x0, y0, x0 + w, y0 + h)
            if free(b):
                boxes.append(b)
                return q, b
        return None

    # the number first (always present)
    n_digits = 1 + int(rng.integers(2))
    number = str(int(rng.integers(0, 10))) if n_digits == 1 else str(int(rng.integers(10, 100)))
    s = spec.digit_scale
    g = spec.digit_grid
    if g:
        # digits one grid cell apart, each glyph centred in its cell: pick a cell-aligned box
        nw, nh = (len(number) - 1) * g + 3 * s, 5 * s
        nq, nbox = None, None
        for _ in range(200):
            q = int(rng.integers(4))
            qx, qy = (q % 2) * half, (q // 2) * half
            cx = int(rng.integers(1, half // g - len(number)))
            cy = int(rng.integers(1, half // g - 1))
            x0, y0 = qx + cx * g + (g - 3 * s) // 2, qy + cy * g + (g - 5 * s) // 2  # centred in the cell
            b = (x0, y0, x0 + nw, y0 + nh)
            if free(b):
                boxes.append(b)
                nq, nbox = q, b
                break
    else:
        nw = len(number) * 3 * s + (len(number) - 1) * s
        nh = 5 * s
        nq, nbox = place(nw, nh)

    n_obj = int(rng.integers(spec.min_objects, spec.max_objects + 1))
    objects: list[Obj] = []
    used = set()
    shape_count = {sh: 0 for sh in SHAPES}
    tries = 0
    while len(objects) < n_obj and tries < 100:
        tries += 1
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        colour = COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
        if (shape, colour) in used or shape_count[shape] >= 3:
            continue
        lo, hi = spec.small if rng.random() < spec.small_prob else spec.large
        size = int(rng.integers(lo, hi + 1))
        got = place(size, size)
        if got is None:
            continue
        q, (x0, y0, x1, y1) = got
        used.add((shape, colour))
        shape_count[shape] += 1
        objects.append(Obj(shape, colour, size, (x0 + x1) // 2, (y0 + y1) // 2, q))
    # keep the box list aligned: boxes[0] is the number, boxes[1:] the objects
    scene = Scene(seed, spec, objects, number, nbox, nq, int(rng.integers(len(BACKGROUNDS))))
    scene.extras["boxes"] = boxes[1:]
    return scene


def _palette(scene: Scene) -> list[tuple[int, int, int]]:
    return list(BACKGROUNDS[scene.bg]) + [COLOURS[c] for c in COLOUR_NAMES] + [DIGIT_RGB]


def render(scene: Scene) -> tuple[Image.Image, np.ndarray]:
    """Palette image (mode "P") and the object-id map (uint8, same size)."""
    spec = scene.spec
    rng = np.random.default_rng([scene.seed, 4242])
    n = spec.size
    nb = (n + spec.block - 1) // spec.block
    tones = rng.integers(0, 4, size=(nb, nb)).astype(np.uint8)
    bg = np.kron(tones, np.ones((spec.block, spec.block), dtype=np.uint8))[:n, :n]
    img = Image.fromarray(bg, mode="P")
    pal = _palette(scene)
    flat = [v for rgb in pal for v in rgb]
    img.putpalette(flat + [0] * (768 - len(flat)))
    ids = Image.new("L", (n, n), 0)
    d, di = ImageDraw.Draw(img), ImageDraw.Draw(ids)
    for k, (o, box) in enumerate(zip(scene.objects, scene.extras["boxes"])):
        col = 4 + COLOUR_NAMES.index(o.colour)
        x0, y0, x1, y1 = box
        x1, y1 = x1 - 1, y1 - 1
        for dr, fill in ((d, col), (di, k + 1)):
            if o.shape == "circle":
                dr.ellipse([x0, y0, x1, y1], fill=fill)
            elif o.shape == "square":
                dr.rectangle([x0, y0, x1, y1], fill=fill)
            elif o.shape == "triangle":
                dr.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
            else:  # cross (plus sign), arm thickness about a third of the size
                t = max(1, round(o.size / 3))
                a = x0 + (o.size - t) // 2
                b = y0 + (o.size - t) // 2
                dr.rectangle([a, y0, a + t - 1, y1], fill=fill)
                dr.rectangle([x0, b, x1, b + t - 1], fill=fill)
    s = spec.digit_scale
    x, y = scene.number_box[0], scene.number_box[1]
    for ch in scene.number:
        for r, row in enumerate(_GLYPHS[ch]):
            for c, bit in enumerate(row):
                if bit == "1":
                    box = [x + c * s, y + r * s, x + c * s + s - 1, y + r * s + s - 1]
                    d.rectangle(box, fill=10)
                    di.rectangle(box, fill=DIGIT_BASE + int(ch))
        x += spec.digit_grid or 4 * s
    return img, np.asarray(ids)


# ------------------------------------------------------------------------------------------------------ questions
def _rel_pairs(scene: Scene, axis: str):
    sep = scene.spec.min_sep
    out = []
    for a in scene.objects:
        for b in scene.objects:
            if a is b:
                continue
            dv = (a.cx - b.cx) if axis == "x" else (a.cy - b.cy)
            if abs(dv) >= sep:
                out.append((a, b, dv))
    return out


def question_text(qtype: str, subject) -> str:
    """The question of a type about a subject: a shape (colour, count), a colour (shape), a (colour, shape) pair
    (quadrant, exist), a pair of objects (leftright, abovebelow) or None (ocr)."""
    if qtype == "colour":
        return f"What colour is the {subject}?"
    if qtype == "shape":
        return f"What shape is the {subject} object?"
    if qtype == "count":
        return f"How many {PLURAL[subject]} are there?"
    if qtype == "leftright":
        return f"Is the {subject[0].name} left or right of the {subject[1].name}?"
    if qtype == "abovebelow":
        return f"Is the {subject[0].name} above or below the {subject[1].name}?"
    if qtype == "quadrant":
        return f"Where is the {subject[0]} {subject[1]}?"
    if qtype == "exist":
        return f"Is there a {subject[0]} {subject[1]}?"
    if qtype == "ocr":
        return "What number is written?"
    raise ValueError(qtype)


def answer_of(scene: Scene, qtype: str, subject) -> str | None:
    """The answer to ``question_text(qtype, subject)`` on this scene; None where the question is not well-defined
    there (colour / shape: the shape / colour is not unique; quadrant: no such object; leftright / abovebelow: the
    two objects are closer than ``min_sep`` on that axis)."""
    objs = scene.objects
    if qtype == "colour":
        hit = [o for o in objs if o.shape == subject]
        return hit[0].colour if len(hit) == 1 else None
    if qtype == "shape":
        hit = [o for o in objs if o.colour == subject]
        return hit[0].shape if len(hit) == 1 else None
    if qtype == "count":
        return COUNT_WORDS[sum(o.shape == subject for o in objs)]
    if qtype in ("leftright", "abovebelow"):
        a, b = subject
        dv = (a.cx - b.cx) if qtype == "leftright" else (a.cy - b.cy)
        if abs(dv) < scene.spec.min_sep:
            return None
        if qtype == "leftright":
            return "left" if dv < 0 else "right"
        return "above" if dv < 0 else "below"
    if qtype == "quadrant":
        hit = [o for o in objs if (o.colour, o.shape) == tuple(subject)]
        return QUADRANTS[hit[0].quadrant] if hit else None
    if qtype == "exist":
        return "yes" if any((o.colour, o.shape) == tuple(subject) for o in objs) else "no"
    if qtype == "ocr":
        return scene.number
    raise ValueError(qtype)


def question(scene: Scene, qtype: str, rng: np.random.Generator) -> dict | None:
    objs = scene.objects
    shapes = [o.shape for o in objs]
    colours = [o.colour for o in objs]
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    if qtype == "colour":
        cands = [o for o in objs if shapes.count(o.shape) == 1]
        if not cands:
            return None
        o = pick(cands)
        return dict(question=question_text(qtype, o.shape), answer=answer_of(scene, qtype, o.shape),
                    objs=[objs.index(o)])
    if qtype == "shape":
        cands = [o for o in objs if colours.count(o.colour) == 1]
        if not cands:
            return None
        o = pick(cands)
        return dict(question=question_text(qtype, o.colour), answer=answer_of(scene, qtype, o.colour),
                    objs=[objs.index(o)])
    if qtype == "count":
        # balance answers: pick the wanted count first, then a shape with that count if any
        want = int(rng.integers(0, 4))
        cands = [s for s in SHAPES if shapes.count(s) == want] or SHAPES
        s = pick(cands)
        return dict(question=question_text(qtype, s), answer=answer_of(scene, qtype, s),
                    objs=[i for i, o in enumerate(objs) if o.shape == s])
    if qtype in ("leftright", "abovebelow"):
        pairs = _rel_pairs(scene, "x" if qtype == "leftright" else "y")
        if not pairs:
            return None
        a, b, _ = pick(pairs)
        return dict(question=question_text(qtype, (a, b)), answer=answer_of(scene, qtype, (a, b)),
                    objs=[objs.index(a), objs.index(b)])
    if qtype == "quadrant":
        o = pick(objs)
        key = (o.colour, o.shape)
        return dict(question=question_text(qtype, key), answer=answer_of(scene, qtype, key), objs=[objs.index(o)])
    if qtype == "exist":
        present = {(o.colour, o.shape) for o in objs}
        if rng.random() < 0.5:
            c, s = pick(sorted(present))
        else:
            # absent combination sharing a colour or a shape with something present (needs fine detail)
            cands = sorted({(c, s) for c in COLOUR_NAMES for s in SHAPES} - present)
            near = [(c, s) for c, s in cands if c in colours or s in shapes]
            c, s = pick(near or cands)
        return dict(question=question_text(qtype, (c, s)), answer=answer_of(scene, qtype, (c, s)),
                    objs=[i for i, o in enumerate(objs) if (o.colour, o.shape) == (c, s)])
    if qtype == "ocr":
        return dict(question=question_text(qtype, None), answer=answer_of(scene, qtype, None), objs=[-1])
    raise ValueError(qtype)


def questions_for(scene: Scene, qtypes=QTYPES, rng: np.random.Generator | None = None) -> list[dict]:
    rng = rng if rng is not None else np.random.default_rng([scene.seed, 99])
    out = []
    for t in qtypes:
        q = question(scene, t, rng)
        if q is not None:
            q["type"] = t
            out.append(q)
    return out


# ----------------------------------------------------------------------------------------------- patch labels
# per-patch classes for the dense vision supervision
N_COLOUR_CLS = 1 + len(COLOUR_NAMES) + 1  # none, colours, digit-white
N_SHAPE_CLS = 1 + len(SHAPES) + 1  # none, shapes, digit
N_DIGIT_CLS = 11  # none, 0..9


def patch_labels(scene: Scene, idmap: np.ndarray, x0: int, y0: int, side: int, grid: int) -> dict[str, np.ndarray]:
    """Labels of the grid x grid patches of the view covering idmap[y0:y0+side, x0:x0+side].

    A patch takes the label with the most pixels in it if that covers >= 1/8 of the patch (1/16 for digits; tiny
    objects still count), else background. Coordinates are the patch centre in the view, in [0, 1].
    """
    cell = side // grid
    sub = idmap[y0:y0 + side, x0:x0 + side].reshape(grid, cell, grid, cell).transpose(0, 2, 1, 3).reshape(grid, grid, -1)
    n = len(scene.objects)
    ids = list(range(1, n + 1)) + [DIGIT_BASE + d for d in range(10)]
    counts = np.stack([(sub == i).sum(-1) for i in ids], -1)  # grid, grid, K
    best = counts.argmax(-1)
    # objects need 1/8 of the patch; digit glyphs (3x5 cells, 7..13 lit) 1/16, so a 1 px glyph in an 8 px patch counts
    need = np.where(np.asarray(ids)[best] >= DIGIT_BASE, cell * cell / 16, cell * cell / 8)
    ok = counts.max(-1) >= need
    colour = np.zeros((grid, grid), np.int64)
    shape = np.zeros((grid, grid), np.int64)
    digit = np.zeros((grid, grid), np.int64)
    for k in range(len(ids)):
        m = ok & (best == k)
        if not m.any():
            continue
        if k < n:
            o = scene.objects[k]
            colour[m] = 1 + COLOUR_NAMES.index(o.colour)
            shape[m] = 1 + SHAPES.index(o.shape)
        else:
            colour[m] = N_COLOUR_CLS - 1
            shape[m] = N_SHAPE_CLS - 1
            digit[m] = 1 + (k - n)
    g = (np.arange(grid) + 0.5) / grid
    yy, xx = np.meshgrid(g, g, indexing="ij")
    return dict(colour=colour.reshape(-1), shape=shape.reshape(-1), digit=digit.reshape(-1),
                xy=np.stack([xx, yy], -1).reshape(-1, 2).astype(np.float32))


def presence_vector(scene: Scene) -> np.ndarray:
    """Image-level targets: (colour, shape) presence (24) + number digits present (10)."""
    v = np.zeros(len(COLOUR_NAMES) * len(SHAPES) + 10, np.float32)
    for o in scene.objects:
        v[COLOUR_NAMES.index(o.colour) * len(SHAPES) + SHAPES.index(o.shape)] = 1
    for ch in scene.number:
        v[len(COLOUR_NAMES) * len(SHAPES) + int(ch)] = 1
    return v


def shape_count_labels(scene: Scene, shape_lab: np.ndarray, whole: bool) -> np.ndarray:
    """Per-patch counting target: on a view of the whole picture, a patch labelled with a shape gets the number of
    objects of that shape in the scene minus one (0..2); everything else (background, digits, tiles that see part of
    the picture) is -100, the ignore index the shape targets use too."""
    out = np.full(shape_lab.shape, -100, np.int64)
    if not whole:
        return out
    shapes = [o.shape for o in scene.objects]
    for k, sh in enumerate(SHAPES):
        out[shape_lab == 1 + k] = shapes.count(sh) - 1
    return out


def vocabulary_corpus() -> list[str]:
    """Every question template and answer word, for training the testbed tokenizers."""
    lines = []
    for s in SHAPES:
        lines.append(f"What colour is the {s}?")
        lines.append(f"How many {PLURAL[s]} are there?")
    for c in COLOUR_NAMES:
        lines.append(f"What shape is the {c} object?")
        for s in SHAPES:
            lines += [f"Is there a {c} {s}?", f"Where is the {c} {s}?",
                      f"Is the {c} {s} left or right of the {c} {s}?", f"Is the {c} {s} above or below the {c} {s}?"]
    lines.append("What number is written?")
    answers = COLOUR_NAMES + SHAPES + COUNT_WORDS + QUADRANTS + ["left", "right", "above", "below", "yes", "no"]
    answers += [str(i) for i in range(100)]
    lines += [f" {a}" for a in answers] * 4
    lines += ["User: Assistant:", "USER: ASSISTANT:"] * 4
    return lines


def token_objects(scene: Scene, idmap: np.ndarray, regions: list[tuple[int, int, int, int]], merge: int) -> np.ndarray:
    """bool [n_objects + 1, n_tokens]: which LLM image tokens show each object (last row: the number's digits).

    ``regions`` are the views' (x0, y0, side, patch_grid) in order; a token covers ``merge`` x ``merge`` patches
    (the pixel shuffle's scale factor; 1 for LLaVA) in raster order within its view.
    """
    n = len(scene.objects)
    rows = []
    for (x0, y0, side, grid) in regions:
        tg = grid // merge
        cell = side // tg
        sub = idmap[y0:y0 + side, x0:x0 + side].reshape(tg, cell, tg, cell).transpose(0, 2, 1, 3).reshape(tg * tg, -1)
        m = np.stack([(sub == k + 1).any(-1) for k in range(n)] + [(sub >= DIGIT_BASE).any(-1)])
        rows.append(m)
    return np.concatenate(rows, axis=1)
