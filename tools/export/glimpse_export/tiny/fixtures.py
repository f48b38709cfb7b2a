"""fixtures/fixtures.json + raw little-endian tensor files (read by the Rust tests)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

DTYPES = {"f32": "<f4", "u8": "u1", "i64": "<i8"}


def write_tensor(folder: Path, file: str, arr: np.ndarray, dtype: str) -> dict:
    a = np.ascontiguousarray(np.asarray(arr).astype(DTYPES[dtype]))
    a.tofile(folder / file)
    return {"file": file, "dtype": dtype, "shape": [int(s) for s in a.shape]}


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
