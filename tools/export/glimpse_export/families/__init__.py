"""The model families, one ``FamilySpec`` each (``families/<name>.py``), by CLI name."""

from __future__ import annotations

from .base import Bundle, FamilySpec, finish_model
from .llava import LLAVA
from .llava_onevision import LLAVA_ONEVISION
from .smolvlm import SMOLVLM

FAMILIES: dict[str, FamilySpec] = {
    "smolvlm": SMOLVLM,
    "llava": LLAVA,
    "llava_onevision": LLAVA_ONEVISION,
}


def get(name: str) -> FamilySpec:
    """The spec for a CLI name ("smolvlm"), a model type ("idefics3") or an alias ("onevision")."""
    for spec in FAMILIES.values():
        if name in (spec.name, spec.family, *spec.aliases):
            return spec
    raise SystemExit(f"unknown family {name!r} (expected smolvlm, llava or llava_onevision)")


__all__ = ["FAMILIES", "Bundle", "FamilySpec", "finish_model", "get"]
