"""fixtures/fixtures.json + raw little-endian tensor files (read by the Rust tests)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from ..common import MAX_NEW_TOKENS, PROMPT

DTYPES = {"f32": "<f4", "u8": "u1", "i64": "<i8"}


def write_tensor(folder: Path, file: str, arr: np.ndarray, dtype: str) -> dict:
    a = np.ascontiguousarray(np.asarray(arr).astype(DTYPES[dtype]))
    a.tofile(folder / file)
    return {"file": file, "dtype": dtype, "shape": [int(s) for s in a.shape]}


def case_json(c, folder: Path, *, after_ids: dict | None = None, after_layout: dict | None = None) -> dict:
    """One case of fixtures.json from a computed parity case (`parity.compute_case`), its tensors
    written next to it. `after_ids` / `after_layout` add keys at those places (the compat corpus
    records ONNX Runtime's tokens and LLaVA-OneVision's image sizes); key order is part of the
    committed bytes."""
    tensors = {}
    for key in ("pixel_values", "pixel_attention_mask", "image_features", "logits"):
        if key in c.tensors:
            dtype = "u8" if key == "pixel_attention_mask" else "f32"
            tensors[key] = write_tensor(folder, f"{c.name}.{key}.bin", c.tensors[key], dtype)
    return {
        "name": c.name,
        "image": os.path.relpath(c.image_path, folder).replace(os.sep, "/"),
        "prompt": PROMPT,
        "prompt_text": c.prompt_text,
        "input_ids": c.input_ids,
        "generated_ids": c.generated_ids,
        **(after_ids or {}),
        "max_new_tokens": MAX_NEW_TOKENS,
        "layout": c.layout,
        **(after_layout or {}),
        "tensors": tensors,
    }


def read_tensor(folder: Path, spec: dict) -> np.ndarray:
    a = np.fromfile(folder / spec["file"], dtype=DTYPES[spec["dtype"]])
    return a.reshape(spec["shape"])


def write_fixtures(folder: Path, family: str, cases: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "fixtures.json"
    text = json.dumps({"family": family, "cases": cases}, indent=1, ensure_ascii=False)
    # keep integer lists (ids, shapes) on one line
    text = re.sub(r"\[\s*(-?\d+(?:,\s*-?\d+)*)\s*\]", lambda m: "[" + ", ".join(m.group(1).replace(",", " ").split()) + "]", text)
    path.write_text(text + "\n", encoding="utf-8")
    return path


def read_fixtures(folder: Path) -> dict:
    return json.loads((folder / "fixtures.json").read_text(encoding="utf-8"))
