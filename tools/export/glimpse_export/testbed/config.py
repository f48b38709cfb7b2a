"""Testbed sizes, seeds and view layouts (``smolvlm``: 2 x 2 tiles + global view; ``llava``: one view)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..families import FAMILIES, FamilySpec
from ..scenes import LLAVA_SCENE, SMOL_SCENE, SceneSpec

TRAIN_SEED_BASE = {1: 10_000_000, 2: 20_000_000, 3: 30_000_000}  # scene seeds: stage -> base (eval sets use 0 .. 999_999)
TOKENIZER_VOCAB = 640
TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=1024, rms_norm_eps=1e-5,
            initializer_range=0.02, tie_word_embeddings=False)
SMOL_TILE = 128
SMOL_VISION = dict(hidden_size=96, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                   image_size=SMOL_TILE, patch_size=8, initializer_range=0.02)
LLAVA_PX = 96
CLIP_VISION = dict(hidden_size=96, intermediate_size=256, num_hidden_layers=5, num_attention_heads=4,
                   image_size=LLAVA_PX, patch_size=8, projection_dim=96, initializer_range=0.02)


@dataclass(frozen=True)
class Testbed:
    """One testbed: its family, family sizes, scenes, and how the processor cuts a scene picture into views."""

    name: str
    spec: FamilySpec
    sizes: dict  # FamilySpec sizes (vision config, ...)
    scene: SceneSpec
    grid: int  # tiles per side
    global_view: bool  # a downscaled view of the whole picture follows the tiles
    eval_seed_base: int
    train_defaults: dict

    @property
    def view_px(self) -> int:
        return self.sizes["vision"]["image_size"]

    def views(self, rgb: Image.Image, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
        """[n_views, 3, H, W] normalised: the tiles in raster order, then the global view (if any)."""
        a = np.asarray(rgb)
        t, g = self.view_px, self.grid
        views = [a[r * t:(r + 1) * t, c * t:(c + 1) * t] for r in range(g) for c in range(g)]
        if self.global_view:
            views.append(np.asarray(rgb.resize((t, t), Image.Resampling.LANCZOS)))
        v = np.stack(views).astype(np.float32) / 255.0
        v = (v - mean) / std
        return v.transpose(0, 3, 1, 2).copy()

    def view_regions(self) -> list[tuple[int, int, int, int]]:
        """(x0, y0, side, patch grid) of each view in scene pixels."""
        t, g = self.view_px, self.grid
        patches = t // self.sizes["vision"]["patch_size"]
        regions = [(c * t, r * t, t, patches) for r in range(g) for c in range(g)]
        if self.global_view:
            regions.append((0, 0, g * t, patches))
        return regions


TESTBEDS = {
    "smolvlm": Testbed(
        "smolvlm", FAMILIES["smolvlm"], dict(vision=SMOL_VISION, scale_factor=2, longest_edge=2 * SMOL_TILE),
        SMOL_SCENE, grid=2, global_view=True, eval_seed_base=0,
        train_defaults=dict(steps1=500, steps2=1300, batch1=6, batch2=6, unfreeze_at=1.0)),
    "llava": Testbed(
        "llava", FAMILIES["llava"], dict(vision=CLIP_VISION), LLAVA_SCENE, grid=1, global_view=False,
        eval_seed_base=500_000, train_defaults=dict(steps1=800, steps2=1400, batch1=32, batch2=16, unfreeze_at=0.7)),
}
