"""``export-compressor``: build, export, check and write fixtures for one tiny compressor folder; ``--check``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from ..common import ExportError, Timer, log, seed_everything

README = """\
# Fixtures of this tiny LLMLingua-2 compressor

`llmlingua.json` was produced by **llmlingua {llmlingua}** itself (PyPI, `llmlingua/prompt_compressor.py`
`compress_prompt` -> `compress_prompt_llmlingua2`), on CPU, with the model and tokenizer of this folder:

    PromptCompressor(model_name=<tmp>/glimpse-tiny-{family}, use_llmlingua2=True, device_map="cpu")
        .compress_prompt(context, return_word_label=True, **params)

* `<tmp>/glimpse-tiny-{family}` is a symlink to this folder: llmlingua 0.2.2 decides how tokens form words from
  the substring `{family}` in `model_name` (`utils.is_begin_of_new_word`, `get_pure_token`) and raises
  NotImplementedError for any other name. Nothing in llmlingua is patched or stubbed.
* Token counts (origin/compressed tokens, the per-word weights of the percentile, `target_token` -> rate) use
  tiktoken **cl100k_base, the real table**: the `.tiktoken` file was rebuilt offline from the npm package
  `js-tiktoken@1.0.21` and accepted only with tiktoken's expected sha256 (`glimpse_export/compressor/cl100k.py`).
  No stand-in counter.
* The tokenizer already holds `[NEW0]`..`[NEW99]`, so llmlingua's `init_llmlingua2` adds nothing and
  `resize_token_embeddings` is a no-op: the model llmlingua ran is exactly `onnx/model.onnx` (checked: onnxruntime
  on every recorded row, unpadded, vs the recorded torch probabilities, max abs diff in `export_info.json`).
* Per case: `context` (str, or a list = several contexts), `params` (passed to `compress_prompt`), `result`
  (llmlingua's compressed_prompt, compressed_prompt_list, origin_tokens, compressed_tokens, ratio, rate), `words` /
  `labels` (`fn_labeled_original_prompt` split on `word_sep` / the last `label_sep`; 1 = kept), `model_rows` (every
  row llmlingua fed the model, in order: unmasked input ids incl. the `[CLS]`/`[SEP]` ids, and softmax(logits)[..., 1]
  rounded to 6 decimals).

Regenerate / re-check (from the repo root):

    PYTHONPATH=tools/export .venv/bin/python -m glimpse_export export-compressor --arch {arch} --out models/{dirname}
    PYTHONPATH=tools/export .venv/bin/python -m glimpse_export export-compressor --arch {arch} --out models/{dirname} --check
"""


def _ort_on_rows(model_dir: Path, results: list[dict]) -> float:
    """onnxruntime on each recorded row (batch 1, no padding) vs the recorded torch keep probabilities."""
    import onnxruntime

    from .export import ONNX_PATH

    sess = onnxruntime.InferenceSession(str(model_dir / ONNX_PATH), providers=["CPUExecutionProvider"])
    worst = 0.0
    for r in results:
        for row in r["model_rows"]:
            ids = np.array([row["ids"]], dtype=np.int64)
            logits = sess.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0][0]
            e = np.exp(logits - logits.max(-1, keepdims=True))
            p = e[:, 1] / e.sum(-1)
            worst = max(worst, float(np.abs(p - np.array(row["p_keep"])).max()))
    if not worst <= 1e-4:
        raise ExportError(f"onnxruntime (unpadded) vs llmlingua's torch keep probabilities: {worst:g} > 1e-4")
    return worst


def run_export_compressor(arch: str, out: Path, seed: int) -> dict:
    from .export import ARCHS, export_and_check, save_hf_folder, write_compressor_manifest, write_export_info
    from .fixtures import write_fixtures
    from .model import build_model
    from .tokenizer import BUILDERS

    t = Timer()
    out = Path(out)
    seed_everything(seed)
    tok = BUILDERS[arch]()
    model = build_model(arch, tok, seed)
    for name in ("onnx", "fixtures"):
        if (out / name).is_dir():
            shutil.rmtree(out / name)
    out.mkdir(parents=True, exist_ok=True)
    fast = save_hf_folder(arch, tok, model, out)
    info = export_and_check(model, tok, out)
    family = ARCHS[arch]["llmlingua_family"]
    results, skip = write_fixtures(out, family)
    info["ort_vs_llmlingua_rows_max_abs_diff_p_keep"] = _ort_on_rows(out, results)
    write_compressor_manifest(out, arch, tok, fast, skip)
    import llmlingua

    info["fixtures"] = {"cases": len(results), "model_rows": sum(len(r["model_rows"]) for r in results),
                        "token_counter": "tiktoken cl100k_base (real file, rebuilt from npm js-tiktoken@1.0.21)"}
    write_export_info(out, arch, seed, info)
    (out / "fixtures" / "README.md").write_text(
        README.format(llmlingua=llmlingua.__version__, family=family, arch=arch, dirname=out.name), encoding="utf-8")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"seconds": t(), "bytes": size, "cases": len(results), **info}


def run_check_compressor(arch: str, model_dir: Path, seed: int | None) -> int:
    """Rebuild the tokenizer and compare tokenizer.json's model, re-run llmlingua on the fixtures, and onnxruntime
    on their model rows. Exit code 0 = everything reproduces."""
    from .export import ARCHS
    from .fixtures import check_fixtures
    from .tokenizer import BUILDERS

    model_dir = Path(model_dir)
    info = json.loads((model_dir / "export_info.json").read_text(encoding="utf-8"))
    if info.get("arch") != arch:
        raise ExportError(f"{model_dir} was exported for --arch {info.get('arch')}, not {arch}")
    bad = []
    saved = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    fresh = json.loads(BUILDERS[arch]().to_str())
    if saved["model"] != fresh["model"] or saved["added_tokens"] != fresh["added_tokens"]:
        bad.append("tokenizer.json: the rebuilt vocabulary differs")
    bad += check_fixtures(model_dir, ARCHS[arch]["llmlingua_family"])
    doc = json.loads((model_dir / "fixtures" / "llmlingua.json").read_text(encoding="utf-8"))
    try:
        d = _ort_on_rows(model_dir, doc["cases"])
        log(f"  onnxruntime on {sum(len(c['model_rows']) for c in doc['cases'])} fixture rows: max |dp| {d:.2e}")
    except ExportError as e:
        bad.append(str(e))
    for b in bad:
        print(f"MISMATCH {b}")
    print(f"check-compressor {model_dir}: {len(doc['cases'])} cases, "
          f"{'reproduced' if not bad else f'{len(bad)} mismatches'}")
    return 0 if not bad else 1
