"""Deterministic test images (committed under ``models/images/``).

The pictures depend only on this code (fixed RNG seed, PIL drawing primitives), never on ``--seed``: both tiny
models share them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SEED = 1234

# name -> (width, height)
IMAGE_SIZES = {
    "small": (48, 40),  # tiny picture; Idefics3 upscales it to the longest edge anyway
    "wide": (200, 90),  # wide picture: non-square tile grid (rows != cols) for tiny-smolvlm
}


def _noise_background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    base = np.array([70, 110, 150], dtype=np.int16)
    noise = rng.integers(-40, 41, size=(h, w, 3), dtype=np.int16)
    # a gentle horizontal gradient so that tiles differ even without shapes
    grad = (np.linspace(-30, 30, w)[None, :, None]).astype(np.int16)
    arr = np.clip(base + noise + grad, 0, 255).astype(np.uint8)
    return Image.fromarray(arr, mode="RGB")


def make_image(name: str) -> Image.Image:
    w, h = IMAGE_SIZES[name]
    rng = np.random.default_rng(IMAGE_SEED + sorted(IMAGE_SIZES).index(name))
    img = _noise_background(rng, w, h)
    d = ImageDraw.Draw(img)
    if name == "small":
        d.rectangle([4, 5, 20, 18], fill=(220, 40, 40))
        d.ellipse([24, 8, 42, 26], fill=(250, 220, 30))
        d.polygon([(6, 36), (18, 22), (30, 36)], fill=(40, 200, 80))
    else:
        d.rectangle([10, 10, 60, 50], fill=(220, 40, 40))
        d.ellipse([70, 20, 120, 70], fill=(250, 220, 30))
        d.polygon([(130, 80), (160, 15), (190, 80)], fill=(40, 200, 80))
        d.line([(0, 85), (199, 60)], fill=(255, 255, 255), width=3)
        d.rectangle([150, 40, 170, 88], fill=(140, 60, 200))
    return img


def write_images(images_dir: Path) -> dict[str, Path]:
    images_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in IMAGE_SIZES:
        path = images_dir / f"{name}.png"
        make_image(name).save(path, format="PNG", optimize=False, compress_level=9)
        out[name] = path
    return out


def load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def pixels_equal(path: Path, name: str) -> bool:
    return np.array_equal(np.asarray(load_rgb(path)), np.asarray(make_image(name)))
