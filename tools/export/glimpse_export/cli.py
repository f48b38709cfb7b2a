"""Command line: ``python -m glimpse_export <command>``, the commands from one table.

Each row of ``COMMANDS`` is (name, help, add_arguments, run). The run functions import their product package when
called (the only function-local imports of the package): ``--help`` and ``quantize`` then start without importing
torch and transformers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import common  # noqa: F401  (sets the offline / threading environment first)
from .common import DEFAULT_SEED, ExportError

# the parser's description (kept as it was when the CLI had two commands)
DESCRIPTION = "Command line: ``python -m glimpse_export {tiny,check}``."
TESTBED_NAMES = ["smolvlm", "llava"]
FAMILY_NAMES = ["smolvlm", "llava", "llava_onevision"]
ARCH_NAMES = ["smolvlm-256m", "smolvlm-500m", "llava-onevision-0.5b"]


def _print_json(obj, **kw) -> int:
    print(json.dumps(obj, indent=2, **kw))
    return 0


# ------------------------------------------------------------------------------------------------------- tiny / check
def add_tiny(p: argparse.ArgumentParser) -> None:
    p.add_argument("--family", required=True, choices=FAMILY_NAMES)
    p.add_argument("--out", required=True, type=Path, help="model folder to (re)write")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--images", type=Path, default=None,
                   help="where the test images are written (default: OUT/../images)")
    add_stage_groups(p)


def add_stage_groups(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stage-groups", type=int, default=2, metavar="N",
                   help="encoder layer groups of the staged vision encoder (vision_blocks_0..N-1; docs/stages.md)")


def cmd_tiny(args, ap) -> int:
    from .tiny.pipeline import run_tiny

    res = run_tiny(args.family, args.out, args.seed, args.images, args.stage_groups)
    print(f"tiny {args.family}: wrote {args.out} in {res['seconds']:.1f}s")
    for line in res["report"]:
        print(f"  {line}")
    return 0


def add_check(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--seed", type=int, default=None, help="default: the seed recorded in MODEL/export_info.json")


def cmd_check(args, ap) -> int:
    from .tiny.check import run_check

    return run_check(args.model, args.seed)


# ----------------------------------------------------------------------------------------------------------- testbeds
def add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--testbed", required=True, choices=TESTBED_NAMES)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--steps1", type=int, default=None, help="vision pre-training steps")
    p.add_argument("--steps2", type=int, default=None, help="connector + decoder steps")
    p.add_argument("--batch1", type=int, default=None, help="images per stage-1 step")
    p.add_argument("--batch2", type=int, default=None, help="images per stage-2 step")
    p.add_argument("--questions-per-image", type=int, default=16)
    p.add_argument("--unfreeze-at", type=float, default=None,
                   help="fraction of stage 2 after which the vision encoder is fine-tuned (1 = never)")
    p.add_argument("--budget2", type=float, default=None,
                   help="wall-clock seconds for stage 2: cuts --steps2 after timing 20 steps (recorded)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--aux-number-views", type=int, default=0,
                   help="stage 2, encoder unfrozen: per step, extra dense-supervised views holding the number")
    p.add_argument("--attn-sup", type=float, default=0.0,
                   help="weight of the training-only loss guiding the last decoder layer's attention (answer "
                        "position) to the image tokens of the objects asked about")
    p.add_argument("--center-projector", action="store_true",
                   help="before stage 2, re-initialise the connector so image tokens have zero mean")
    p.add_argument("--lr2", type=float, default=1.5e-3, help="stage-2 learning rate")
    p.add_argument("--text-init", type=float, default=None,
                   help="with --init-from: load only the vision encoder and re-initialise the rest with this std")
    p.add_argument("--init-from", type=Path, default=None,
                   help="skip stage 1: load a WORKDIR/<testbed>-stage1.pt checkpoint of an earlier run, or a trained "
                        "model folder (model.safetensors; auxiliary heads from --heads-from)")
    p.add_argument("--heads-from", type=Path, default=None,
                   help="with --init-from DIR: the checkpoint whose stage-1 auxiliary heads to load")
    p.add_argument("--digit-steps", type=int, default=0,
                   help="after loading --init-from: stage-1b encoder steps on the view holding the number plus one "
                        "other view (LLaVA: the whole picture)")
    p.add_argument("--shape-weight", type=float, default=1.0, help="stage 1b: weight of the per-patch shape loss")
    p.add_argument("--lr1b", type=float, default=2e-3, help="stage 1b learning rate")
    p.add_argument("--count-weight", type=float, default=0.0,
                   help="stage 1b: weight of the per-patch counting head (objects sharing the patch's shape)")
    p.add_argument("--vision-from", type=Path, default=None,
                   help="SmolVLM: initialise the vision encoder from a trained LLaVA testbed folder (its CLIP "
                        "layers up to the feature layer); the auxiliary heads start fresh")
    p.add_argument("--shape-global", action="store_true",
                   help="stage 1b (SmolVLM): per-patch shape targets on the global view only, which is then each "
                        "picture's second view")
    p.add_argument("--pool", type=int, default=0,
                   help="stage 2 on N pre-encoded scenes with the encoder frozen (fast path; 0 = the original loop)")
    p.add_argument("--count-centres", action="store_true",
                   help="with --pool and --attn-sup: count questions guide attention to one centre token per counted "
                        "object (llava)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/glimpse-testbed"),
                   help="checkpoints (not part of the model folder)")


def cmd_train(args, ap) -> int:
    from .testbed.config import TESTBEDS
    from .testbed.train import run_train

    d = TESTBEDS[args.testbed].train_defaults
    pick = lambda v, k: d[k] if v is None else v  # noqa: E731
    info = run_train(args.testbed, args.out, args.seed, pick(args.steps1, "steps1"), pick(args.steps2, "steps2"),
                     pick(args.batch1, "batch1"), pick(args.batch2, "batch2"), args.questions_per_image,
                     args.threads, pick(args.unfreeze_at, "unfreeze_at"), args.budget2, args.workdir, args.init_from,
                     args.aux_number_views, args.attn_sup, args.center_projector, args.lr2,
                     args.text_init, args.digit_steps, args.pool, args.shape_weight, args.lr1b,
                     args.count_centres, args.count_weight, args.heads_from, args.shape_global,
                     args.vision_from)
    return _print_json(info, default=str)


def add_snapshot(p: argparse.ArgumentParser) -> None:
    p.add_argument("--testbed", required=True, choices=TESTBED_NAMES)
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)


def cmd_snapshot(args, ap) -> int:
    from .testbed.train import snapshot

    return _print_json(snapshot(args.testbed, args.checkpoint, args.out, args.seed))


def add_evalset(p: argparse.ArgumentParser) -> None:
    p.add_argument("--testbed", required=True, choices=TESTBED_NAMES)
    p.add_argument("--out", required=True, type=Path, help="eval folder, e.g. models/testbed-smolvlm/eval")
    p.add_argument("--images", type=int, default=140)
    p.add_argument("--seed-base", type=int, default=None, help="first scene seed (default: the testbed's eval base)")


def cmd_evalset(args, ap) -> int:
    from .testbed.eval import write_evalset

    return _print_json(write_evalset(args.testbed, args.out, args.images, args.seed_base))


def add_scenestream(p: argparse.ArgumentParser) -> None:
    p.add_argument("--testbed", required=True, choices=TESTBED_NAMES)
    p.add_argument("--out", required=True, type=Path, help="output folder: frames/, sequence.jsonl, sequence_info.json")
    p.add_argument("--frames", type=int, default=100)
    p.add_argument("--seed", type=int, default=9_100_000, help="scene seed (default outside the eval and train seeds)")
    p.add_argument("--prompts", type=int, default=4, help="standing questions, each answered for every frame")
    p.add_argument("--check", action="store_true",
                   help="also write a 12-frame sequence twice into temp folders and require byte-identical files")


def cmd_scenestream(args, ap) -> int:
    from .testbed.sequence import check_sequence, write_sequence

    res = write_sequence(args.testbed, args.out, args.frames, args.seed, args.prompts)
    if args.check:
        res["check"] = check_sequence(args.testbed, args.seed, 12, args.prompts)["check"]
    return _print_json(res)


def add_hf_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--keep-random", type=float, default=None,
                   help="keep a random (seeded, per image) fraction R of the image-feature rows and their <image> tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None)


def cmd_hf_eval(args, ap) -> int:
    from .testbed.eval import run_hf_eval

    return _print_json(run_hf_eval(args.model, args.keep_random, args.seed, args.limit))


def add_export_testbed(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--parity-items", type=int, default=300)
    p.add_argument("--signals", action="store_true",
                   help="add pruning-signal outputs to vision_encoder.onnx and write glimpse.json")
    p.add_argument("--stages-only", action="store_true",
                   help="only (re)write the staged vision encoder next to the existing files (docs/stages.md)")
    p.add_argument("--decoder-only", action="store_true",
                   help="only (re)write decoder_model_merged.onnx (with --attention-bias: its key-bias input)")
    p.add_argument("--attention-bias", action="store_true",
                   help="give the decoder an additive per-key `attention_bias` input (proportional attention)")
    add_stage_groups(p)


def cmd_export_testbed(args, ap) -> int:
    from .testbed.export import run_testbed_decoder, run_testbed_export, run_testbed_stages

    if args.decoder_only:
        return _print_json(run_testbed_decoder(args.model, args.attention_bias, args.parity_items))
    if args.attention_bias:
        ap.error("--attention-bias goes with --decoder-only")
    if args.stages_only:
        return _print_json(run_testbed_stages(args.model, args.stage_groups))
    return _print_json(run_testbed_export(args.model, args.parity_items, args.signals))


# ------------------------------------------------------------------------------------------------ realsize / quantize
def add_realsize(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", required=True, choices=ARCH_NAMES)
    p.add_argument("--out", type=Path, default=None, help="model folder (default: models/real/ARCH)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads")
    add_stage_groups(p)


def cmd_realsize(args, ap) -> int:
    from .realsize.export import run_realsize

    return _print_json(run_realsize(args.arch, args.out, args.seed, args.threads, args.stage_groups))


def add_quantize(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--to", required=True, help="comma-separated: fp16,int8,uint8,quantized,q4,q4f16")
    p.add_argument("--parts", default=None,
                   help="comma-separated (default: vision_encoder,embed_tokens,decoder_model_merged and the "
                        "stage files named by glimpse.json)")
    p.add_argument("--external-data", choices=["auto", "always"], default="auto",
                   help="auto: <file>.onnx_data only when a file would reach 2 GB")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime self-check against the fp32 parts")
    p.add_argument("--json", type=Path, default=None, help="write the JSON report here instead of stdout")


def cmd_quantize(args, ap) -> int:
    from .quantize import MODES
    from .quantize import main as quantize_main

    modes = [m for m in args.to.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"--to: unknown {bad}; choose from {','.join(MODES)}")
    parts = [p for p in args.parts.split(",") if p] if args.parts else None
    return quantize_main(args.model, modes, parts, args.external_data, not args.no_check, args.json)


# ------------------------------------------------------------------------------------------------------------ compat
def add_compat(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=None, help="corpus folder (default: models/compat)")
    p.add_argument("--only", action="append", default=None, metavar="NAME",
                   help="one style (repeatable); default: all")


def cmd_compat(args, ap) -> int:
    from .compat.pipeline import run_compat

    rows = run_compat(args.out, args.only)
    width = max(len(r["name"]) for r in rows)
    print(f"{'folder':<{width}}  {'bytes':>9}  {'du -sb':>9}  ort tokens == transformers tokens")
    for r in rows:
        print(f"{r['name']:<{width}}  {r['bytes']:>9,}  {r['du']:>9,}  {r['equal']}")
    return 0


# -------------------------------------------------------------------------------------------------------- compressor
COMPRESSOR_ARCHS = ["xlm-roberta", "bert"]


def add_export_compressor(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", choices=COMPRESSOR_ARCHS, help="the tiny or large random-weight shape (not with --from)")
    p.add_argument("--from", dest="checkpoint", type=Path, default=None,
                   help="a local LLMLingua-2 checkpoint folder (e.g. microsoft/llmlingua-2-xlm-roberta-large-meetingbank "
                        "downloaded elsewhere) to export into --out; the arch comes from its config.json")
    p.add_argument("--out", type=Path, default=None,
                   help="compressor folder to (re)write, or to check (required for --size tiny; default for large: "
                        "models/real/llmlingua2-xlm-roberta-large)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--size", choices=["tiny", "large"], default="tiny",
                   help="tiny: the parity folders (llmlingua fixtures); large: the real-size "
                        "llmlingua-2-xlm-roberta-large shape with random weights, timing only (xlm-roberta, no fixtures)")
    p.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads (--size large)")
    p.add_argument("--check", action="store_true",
                   help="do not write: re-run llmlingua on OUT/fixtures and onnxruntime on their rows, compare")


def cmd_export_compressor(args, ap) -> int:
    from .compressor.pipeline import run_check_compressor, run_export_compressor

    if args.checkpoint is not None:
        if args.arch or args.check or args.size != "tiny" or args.out is None:
            ap.error("--from CHECKPOINT takes --out DIR only (no --arch, --size or --check)")
        from .compressor.checkpoint import run_from_checkpoint

        res = run_from_checkpoint(args.checkpoint, args.out, args.threads)
        print(f"export-compressor --from {args.checkpoint}: wrote {res['out']} ({res['arch']}, {res['bytes']:,} bytes, "
              f"{res['parameters'] / 1e6:.0f}M parameters) in {res['seconds']:.1f}s; onnxruntime max abs diff "
              f"{res['ort_max_abs_diff']:.2e}")
        return 0
    if args.arch is None:
        ap.error("--arch is required (or --from CHECKPOINT)")
    if args.size == "large":
        if args.arch != "xlm-roberta" or args.check:
            ap.error("--size large: --arch xlm-roberta only, and no --check (it has no fixtures)")
        from .compressor.realsize import run_realsize_compressor

        res = run_realsize_compressor(args.out, args.seed, args.threads)
        print(f"export-compressor --size large: wrote {res['out']} ({res['bytes']:,} bytes, "
              f"{res['parameters'] / 1e6:.0f}M parameters) in {res['seconds']:.1f}s; "
              f"onnxruntime max abs diff {res['ort_max_abs_diff_512']:.2e} (random weights: timing only)")
        return 0
    if args.out is None:
        ap.error("--out is required for --size tiny")
    if args.check:
        return run_check_compressor(args.arch, args.out, args.seed)
    res = run_export_compressor(args.arch, args.out, args.seed)
    print(f"export-compressor {args.arch}: wrote {args.out} ({res['bytes']:,} bytes, {res['cases']} fixture cases) "
          f"in {res['seconds']:.1f}s; onnxruntime max abs diff {res['ort_max_abs_diff']:.2e}")
    return 0


COMMANDS = (
    ("tiny", "build a tiny random-weight VLM, export ONNX parts, write fixtures", add_tiny, cmd_tiny),
    ("check", "re-export with the same seed and compare with a committed model folder", add_check, cmd_check),
    ("train", "train an accuracy testbed (scene QA) and save it (weights + HF files)", add_train, cmd_train),
    ("snapshot", "model folder from a running train's stage-2 checkpoint (progress checks)", add_snapshot,
     cmd_snapshot),
    ("evalset", "write a held-out eval set (PNGs + questions.jsonl) for a testbed", add_evalset, cmd_evalset),
    ("scenestream", "write a camera-like scene sequence (frames + standing questions answered per frame)",
     add_scenestream, cmd_scenestream),
    ("hf-eval", "transformers accuracy on MODEL/eval (JSON: overall + per type, 95%% CI)", add_hf_eval, cmd_hf_eval),
    ("export-testbed", "export a trained testbed's ONNX parts and check ORT against transformers",
     add_export_testbed, cmd_export_testbed),
    ("realsize", "real-size random-weight SmolVLM / LLaVA-OneVision export for timing", add_realsize, cmd_realsize),
    ("quantize", "write onnx-community dtype variants (<part>_fp16.onnx, _q4, ...) next to MODEL/onnx/*",
     add_quantize, cmd_quantize),
    ("compat", "write the compatibility corpus: folders exported the way other tools do (models/compat/<style>)",
     add_compat, cmd_compat),
    ("export-compressor", "tiny random-weight LLMLingua-2 prompt compressor (ONNX + llmlingua fixtures), or --check",
     add_export_compressor, cmd_export_compressor),
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m glimpse_export", description=DESCRIPTION)
    sub = ap.add_subparsers(dest="cmd", required=True)
    runs = {}
    for name, help_text, add_arguments, run in COMMANDS:
        add_arguments(sub.add_parser(name, help=help_text))
        runs[name] = run
    args = ap.parse_args(argv)
    try:
        return runs[args.cmd](args, ap)
    except ExportError as e:
        print(f"error: self-check failed: {e}", file=sys.stderr)
        return 2
