"""``glimpse.json``, the model manifest: the one writer of that file.

Format (keys in this order; ``json.dumps(indent=2)`` plus a newline)::

    {
      "manifest_version": 1,
      "kind": "vlm",
      "parts": [{"role": "vision_encoder", "stem": "vision_encoder"},
                {"role": "embed_tokens", "stem": "embed_tokens"},
                {"role": "decoder", "stem": "decoder_model_merged"}],
      "stages": {"embed": "vision_embed",
                 "blocks": [{"stem": "vision_blocks_0", "layers": [0, 1]}, {"stem": "vision_blocks_1", "layers": [1, 2]}],
                 "head": "vision_head", "made_by": "export"},
      "signals": {"attention_received": "glimpse_attention_received", ...},
      "export": {"realsize": true, "note": "...", "arch": "...", ...}
    }

``parts``: the ONNX files under ``onnx/`` by role (``stem`` = file name without ``.onnx``; dtype variants add their
suffix, e.g. ``decoder_model_merged_fp16``). ``stages`` (omitted when there are none): the staged vision encoder
next to ``vision_encoder`` (docs/stages.md): the stems of the embed file, of each blocks file with its encoder layers
``[first, end)``, and of the head file (without dtype suffix: a variant adds the parts' suffix, e.g.
``vision_blocks_0_fp16``); ``made_by``: ``"export"`` (this package) or ``"split"`` (``glimpse split``, the Rust side).
``signals``: pruning-signal name -> extra ``vision_encoder`` output (omitted when there are none). ``export``: facts
about how the folder was made (``realsize``: random weights, for timing only; the Rust profiler reads
``export.realsize``); ``{}`` when there are none.

``write_manifest`` merges into an existing file: a key passed replaces that key, the others are kept (so the
signal export adds ``signals`` to a folder written earlier and keeps its ``stages``). Older files are read too:
``{"signals": ...}`` and the flat real-size form ``{"realsize": true, "note": ..., ...}`` (whose keys become
``export``).
"""

from __future__ import annotations

import json
from pathlib import Path

MANIFEST = "glimpse.json"
MANIFEST_VERSION = 1
PART_STEMS = (("vision_encoder", "vision_encoder"), ("embed_tokens", "embed_tokens"),
              ("decoder", "decoder_model_merged"))


def default_parts(suffix: str = "") -> list[dict]:
    """The three onnx-community parts; ``suffix`` names a dtype variant (``"_fp16"``, ``"_q4"``, ...)."""
    return [{"role": role, "stem": stem + suffix} for role, stem in PART_STEMS]


def read_manifest(model_dir: Path) -> dict:
    """The manifest of ``model_dir`` as {"parts", "stages", "signals", "export"} (empty when there is no file)."""
    path = Path(model_dir) / MANIFEST
    if not path.is_file():
        return {}
    old = json.loads(path.read_text(encoding="utf-8"))
    if "manifest_version" in old:
        return {k: old[k] for k in ("parts", "stages", "signals", "export") if k in old}
    out = {}
    if "signals" in old:
        out["signals"] = old["signals"]
    facts = {k: v for k, v in old.items() if k != "signals"}
    if facts:
        out["export"] = facts
    return out


def write_manifest(model_dir: Path, *, parts: list[dict] | None = None, stages: dict | None = None,
                   signals: dict | None = None, export: dict | None = None) -> Path:
    """Write ``model_dir/glimpse.json``, merged into the existing one; returns its path."""
    path = Path(model_dir) / MANIFEST
    cur = read_manifest(model_dir)
    if parts is not None:
        cur["parts"] = parts
    if stages is not None:
        cur["stages"] = stages
    if signals is not None:
        cur["signals"] = signals
    if export is not None:
        cur["export"] = export
    doc = {"manifest_version": MANIFEST_VERSION, "kind": "vlm", "parts": cur.get("parts") or default_parts()}
    if cur.get("stages"):
        doc["stages"] = cur["stages"]
    if cur.get("signals"):
        doc["signals"] = cur["signals"]
    doc["export"] = cur.get("export") or {}
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return path
