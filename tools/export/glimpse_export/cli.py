"""Command line: ``python -m glimpse_export {tiny,check}``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import common  # noqa: F401  (sets the offline / threading environment first)
from .common import DEFAULT_SEED, ExportError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m glimpse_export", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("tiny", help="build a tiny random-weight VLM, export ONNX parts, write fixtures")
    t.add_argument("--family", required=True, choices=["smolvlm", "llava", "llava_onevision"])
    t.add_argument("--out", required=True, type=Path, help="model folder to (re)write")
    t.add_argument("--seed", type=int, default=DEFAULT_SEED)
    t.add_argument("--images", type=Path, default=None,
                   help="where the test images are written (default: OUT/../images)")

    c = sub.add_parser("check", help="re-export with the same seed and compare with a committed model folder")
    c.add_argument("--model", required=True, type=Path)
    c.add_argument("--seed", type=int, default=None, help="default: the seed recorded in MODEL/export_info.json")

    tr = sub.add_parser("train", help="train an accuracy testbed (scene QA) and save it (weights + HF files)")
    tr.add_argument("--testbed", required=True, choices=["smolvlm", "llava"])
    tr.add_argument("--out", required=True, type=Path)
    tr.add_argument("--seed", type=int, default=DEFAULT_SEED)
    tr.add_argument("--steps1", type=int, default=None, help="vision pre-training steps")
    tr.add_argument("--steps2", type=int, default=None, help="connector + decoder steps")
    tr.add_argument("--batch1", type=int, default=None, help="images per stage-1 step")
    tr.add_argument("--batch2", type=int, default=None, help="images per stage-2 step")
    tr.add_argument("--questions-per-image", type=int, default=16)
    tr.add_argument("--unfreeze-at", type=float, default=None,
                    help="fraction of stage 2 after which the vision encoder is fine-tuned (1 = never)")
    tr.add_argument("--budget2", type=float, default=None,
                    help="wall-clock seconds for stage 2: cuts --steps2 after timing 20 steps (recorded)")
    tr.add_argument("--threads", type=int, default=1)
    tr.add_argument("--aux-number-views", type=int, default=0,
                    help="stage 2, encoder unfrozen: per step, extra dense-supervised views holding the number")
    tr.add_argument("--attn-sup", type=float, default=0.0,
                    help="weight of the training-only loss guiding the last decoder layer's attention (answer "
                         "position) to the image tokens of the objects asked about")
    tr.add_argument("--center-projector", action="store_true",
                    help="before stage 2, re-initialise the connector so image tokens have zero mean")
    tr.add_argument("--lr2", type=float, default=1.5e-3, help="stage-2 learning rate")
    tr.add_argument("--text-init", type=float, default=None,
                    help="with --init-from: load only the vision encoder and re-initialise the rest with this std")
    tr.add_argument("--init-from", type=Path, default=None,
                    help="skip stage 1: load a WORKDIR/<testbed>-stage1.pt checkpoint of an earlier run, or a trained "
                         "model folder (model.safetensors; auxiliary heads from --heads-from)")
    tr.add_argument("--heads-from", type=Path, default=None,
                    help="with --init-from DIR: the checkpoint whose stage-1 auxiliary heads to load")
    tr.add_argument("--digit-steps", type=int, default=0,
                    help="after loading --init-from: stage-1b encoder steps on the view holding the number plus one "
                         "other view (LLaVA: the whole picture)")
    tr.add_argument("--shape-weight", type=float, default=1.0, help="stage 1b: weight of the per-patch shape loss")
    tr.add_argument("--lr1b", type=float, default=2e-3, help="stage 1b learning rate")
    tr.add_argument("--count-weight", type=float, default=0.0,
                    help="stage 1b: weight of the per-patch counting head (objects sharing the patch's shape)")
    tr.add_argument("--vision-from", type=Path, default=None,
                    help="SmolVLM: initialise the vision encoder from a trained LLaVA testbed folder (its CLIP "
                         "layers up to the feature layer); the auxiliary heads start fresh")
    tr.add_argument("--shape-global", action="store_true",
                    help="stage 1b (SmolVLM): per-patch shape targets on the global view only, which is then each "
                         "picture's second view")
    tr.add_argument("--pool", type=int, default=0,
                    help="stage 2 on N pre-encoded scenes with the encoder frozen (fast path; 0 = the original loop)")
    tr.add_argument("--count-centres", action="store_true",
                    help="with --pool and --attn-sup: count questions guide attention to one centre token per counted "
                         "object (llava)")
    tr.add_argument("--workdir", type=Path, default=Path("/tmp/glimpse-testbed"),
                    help="checkpoints (not part of the model folder)")

    sn = sub.add_parser("snapshot", help="model folder from a running train's stage-2 checkpoint (progress checks)")
    sn.add_argument("--testbed", required=True, choices=["smolvlm", "llava"])
    sn.add_argument("--checkpoint", required=True, type=Path)
    sn.add_argument("--out", required=True, type=Path)
    sn.add_argument("--seed", type=int, default=DEFAULT_SEED)

    ev = sub.add_parser("evalset", help="write a held-out eval set (PNGs + questions.jsonl) for a testbed")
    ev.add_argument("--testbed", required=True, choices=["smolvlm", "llava"])
    ev.add_argument("--out", required=True, type=Path, help="eval folder, e.g. models/testbed-smolvlm/eval")
    ev.add_argument("--images", type=int, default=140)
    ev.add_argument("--seed-base", type=int, default=None, help="first scene seed (default: the testbed's eval base)")

    he = sub.add_parser("hf-eval", help="transformers accuracy on MODEL/eval (JSON: overall + per type, 95%% CI)")
    he.add_argument("--model", required=True, type=Path)
    he.add_argument("--keep-random", type=float, default=None,
                    help="keep a random (seeded, per image) fraction R of the image-feature rows and their <image> tokens")
    he.add_argument("--seed", type=int, default=0)
    he.add_argument("--limit", type=int, default=None)

    xt = sub.add_parser("export-testbed", help="export a trained testbed's ONNX parts and check ORT against transformers")
    xt.add_argument("--model", required=True, type=Path)
    xt.add_argument("--parity-items", type=int, default=300)
    xt.add_argument("--signals", action="store_true",
                    help="add pruning-signal outputs to vision_encoder.onnx and write glimpse.json")

    rs = sub.add_parser("realsize", help="real-size random-weight SmolVLM / LLaVA-OneVision export for timing")
    rs.add_argument("--arch", required=True, choices=["smolvlm-256m", "smolvlm-500m", "llava-onevision-0.5b"])
    rs.add_argument("--out", type=Path, default=None, help="model folder (default: models/real/ARCH)")
    rs.add_argument("--seed", type=int, default=DEFAULT_SEED)
    rs.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads")

    qz = sub.add_parser("quantize", help="write onnx-community dtype variants (<part>_fp16.onnx, _q4, ...) next to MODEL/onnx/*")
    qz.add_argument("--model", required=True, type=Path)
    qz.add_argument("--to", required=True, help="comma-separated: fp16,int8,uint8,quantized,q4,q4f16")
    qz.add_argument("--parts", default=None, help="comma-separated (default: vision_encoder,embed_tokens,decoder_model_merged)")
    qz.add_argument("--external-data", choices=["auto", "always"], default="auto",
                    help="auto: <file>.onnx_data only when a file would reach 2 GB")
    qz.add_argument("--no-check", action="store_true", help="skip the onnxruntime self-check against the fp32 parts")
    qz.add_argument("--json", type=Path, default=None, help="write the JSON report here instead of stdout")

    args = ap.parse_args(argv)
    try:
        if args.cmd == "train":
            from .testbed import TRAIN_DEFAULTS, run_train

            d = TRAIN_DEFAULTS[args.testbed]
            pick = lambda v, k: d[k] if v is None else v  # noqa: E731
            info = run_train(args.testbed, args.out, args.seed, pick(args.steps1, "steps1"), pick(args.steps2, "steps2"),
                             pick(args.batch1, "batch1"), pick(args.batch2, "batch2"), args.questions_per_image,
                             args.threads, pick(args.unfreeze_at, "unfreeze_at"), args.budget2, args.workdir, args.init_from,
                             args.aux_number_views, args.attn_sup, args.center_projector, args.lr2,
                             args.text_init, args.digit_steps, args.pool, args.shape_weight, args.lr1b,
                             args.count_centres, args.count_weight, args.heads_from, args.shape_global,
                             args.vision_from)
            print(json.dumps(info, indent=2, default=str))
            return 0
        if args.cmd == "snapshot":
            from .testbed import snapshot

            print(json.dumps(snapshot(args.testbed, args.checkpoint, args.out, args.seed), indent=2))
            return 0
        if args.cmd == "evalset":
            from .testbed_eval import write_evalset

            print(json.dumps(write_evalset(args.testbed, args.out, args.images, args.seed_base), indent=2))
            return 0
        if args.cmd == "hf-eval":
            from .testbed_eval import run_hf_eval

            print(json.dumps(run_hf_eval(args.model, args.keep_random, args.seed, args.limit), indent=2))
            return 0
        if args.cmd == "export-testbed":
            from .testbed_eval import run_testbed_export

            print(json.dumps(run_testbed_export(args.model, args.parity_items, args.signals), indent=2))
            return 0
        if args.cmd == "realsize":
            from .realsize import run_realsize

            print(json.dumps(run_realsize(args.arch, args.out, args.seed, args.threads), indent=2))
            return 0
        if args.cmd == "quantize":
            from .quantize import MODES
            from .quantize import main as quantize_main

            modes = [m for m in args.to.split(",") if m]
            bad = [m for m in modes if m not in MODES]
            if bad:
                ap.error(f"--to: unknown {bad}; choose from {','.join(MODES)}")
            parts = [p for p in args.parts.split(",") if p] if args.parts else None
            return quantize_main(args.model, modes, parts, args.external_data, not args.no_check, args.json)
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
