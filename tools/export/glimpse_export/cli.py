"""Command line: ``python -m glimpse_export {tiny,check}``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import common  # noqa: F401  (sets the offline / threading environment first)
from .common import DEFAULT_SEED, ExportError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m glimpse_export", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("tiny", help="build a tiny random-weight VLM, export ONNX parts, write fixtures")
    t.add_argument("--family", required=True, choices=["smolvlm", "llava"])
    t.add_argument("--out", required=True, type=Path, help="model folder to (re)write")
    t.add_argument("--seed", type=int, default=DEFAULT_SEED)
    t.add_argument("--images", type=Path, default=None,
                   help="where the test images are written (default: OUT/../images)")

    c = sub.add_parser("check", help="re-export with the same seed and compare with a committed model folder")
    c.add_argument("--model", required=True, type=Path)
    c.add_argument("--seed", type=int, default=None, help="default: the seed recorded in MODEL/export_info.json")

    args = ap.parse_args(argv)
    try:
        if args.cmd == "tiny":
            from .pipeline import run_tiny

            res = run_tiny(args.family, args.out, args.seed, args.images)
            print(f"tiny {args.family}: wrote {args.out} in {res['seconds']:.1f}s")
            for line in res["report"]:
                print(f"  {line}")
            return 0
        from .check import run_check

        return run_check(args.model, args.seed)
    except ExportError as e:
        print(f"error: self-check failed: {e}", file=sys.stderr)
        return 2
