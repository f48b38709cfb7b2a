"""Parity fixtures: llmlingua 0.2.2's own ``compress_prompt`` (LLMLingua-2 path) on the tiny model of a folder.

``PromptCompressor(model_name=NAME, use_llmlingua2=True, device_map="cpu")`` where NAME is a symlink to the folder
whose name contains the family string llmlingua dispatches on (``xlm-roberta-large`` / ``bert-base-multilingual-
cased``, ``utils.is_begin_of_new_word``): nothing else of llmlingua is patched. tiktoken's cl100k_base comes from
``cl100k.ensure_cl100k`` (the real file). A forward hook on the model records, for every row llmlingua feeds it,
the unmasked input ids and keep probabilities (torch float32, rounded to 6 decimals) so a reimplementation can
check its model outputs separately from its word / threshold logic.

``fixtures/llmlingua.json``::

    {"llmlingua": "0.2.2", "model_name_used": "...", "cases": [
       {"name", "context": str | [str], "params": {rate, target_token, force_tokens, force_reserve_digit,
        drop_consecutive, use_context_level_filter?},
        "result": {compressed_prompt, compressed_prompt_list, origin_tokens, compressed_tokens, ratio, rate},
        "words": [...], "labels": [0|1 ...],          # fn_labeled_original_prompt (return_word_label=True) split
        "model_rows": [{"ids": [...], "p_keep": [...]}, ...]}  # every model row, in call order
    ]}
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from ..common import ExportError, log

WORD_SEP = "\t\t|\t\t"
LABEL_SEP = " "

SENTENCES = [
    "Good evening, everyone. The meeting of the city council is now called to order.",
    "Item number 12 on the agenda is the budget for the next fiscal year, about 4.5 million dollars.",
    "Council member Smith moved to approve the report; council member Lee seconded the motion.",
    "All those in favour say aye. Those opposed? The motion carries 7 to 2.",
    "We will now hear public comment. Please state your name and keep your remarks to three minutes.",
    "The committee recommends that the council adopt the resolution and direct the manager to report back in June.",
    "Speaker 1: I think we should compress the prompt before we send it to the model.",
    "Speaker 2: Yes, the compressor keeps the important words and drops the filler words.",
    "The total cost is $1,250 and the deadline is March 3rd, 2024 at 10:30 a.m.",
    "Residents asked about parking near the library, the new bike lanes, and the noise from the plant.",
    "Is there any further discussion? Seeing none, we will vote on item 14 now.",
    "The clerk read the minutes of the meeting held on 2 February; they were approved without changes.",
]


def long_text(start: int, n_chars: int, sep: str = " ") -> str:
    """Sentences from SENTENCES (cycled from ``start``, each numbered) until ``n_chars`` characters."""
    parts, i = [], start
    while sum(len(p) + len(sep) for p in parts) < n_chars:
        k = i % len(SENTENCES)
        parts.append(f"({i}) {SENTENCES[k]}" if i % 3 == 0 else SENTENCES[k])
        i += 1
    return sep.join(parts)


FT = ["\n", "?", "."]


def cases() -> list[dict]:
    """The fixture cases (the same for both archs): >= 20 distinct prompts."""
    short = [
        "Good evening, everyone.",
        SENTENCES[1],
        SENTENCES[3] + " " + SENTENCES[4],
        "What was the vote on item 12?\nThe motion passed 7 to 2.\nWho seconded it? Council member Lee.",
        SENTENCES[8] + " Call 555-0142 or e-mail clerk@city.gov before 5 p.m.",
        "Wait... what?? No!!! That is not what we agreed... Really?\n\n\nOK.",
        "Zebras, quantum fjords & llmlingua: unusual words, split into many pieces; ünïcödé ß € 😀 too.",
        "Summary:\n- budget: 4.5M\n- vote: 7-2\n- next meeting: June 14, 2024\n\nQuestion: when is the next meeting?",
        "   Leading and trailing spaces, tabs\tand  double  spaces.   ",
        "Item 1. Item 2. Item 3. Item 4. Item 5. Item 6. Item 7. Item 8. Item 9. Item 10.",
    ]
    medium = [long_text(0, 700), long_text(5, 900, sep="\n"), long_text(2, 600, sep=" ... ")]
    long = [long_text(0, 3000), long_text(7, 4200, sep="\n"), long_text(3, 2600, sep="? ")]
    multi = [
        [SENTENCES[0], SENTENCES[1], SENTENCES[2], SENTENCES[3]],
        [long_text(1, 400), long_text(4, 500), "Thank you.", long_text(9, 300)],
        [long_text(2, 1600), SENTENCES[6] + "\n" + SENTENCES[7]],
    ]
    out: list[dict] = []

    def add(name, context, **params):
        p = {"rate": 0.5, "target_token": -1, "force_tokens": [], "force_reserve_digit": False,
             "drop_consecutive": False}
        p.update(params)
        out.append({"name": name, "context": context, "params": p})

    for i, s in enumerate(short):
        add(f"short{i}_r50", s)
        add(f"short{i}_r33_force", s, rate=0.33, force_tokens=FT, force_reserve_digit=(i % 2 == 0),
            drop_consecutive=(i % 3 != 1))
    add("short4_digits_r33", short[4], rate=0.33, force_reserve_digit=True)
    add("short5_dropcons_r50", short[5], force_tokens=FT + ["!"], drop_consecutive=True)
    add("short5_nodrop_r50", short[5], force_tokens=FT + ["!"], drop_consecutive=False)
    add("short6_multipiece_force", short[6], rate=0.33, force_tokens=["\n", "?", "llmlingua", "quantum", "€"])
    add("short3_target10", short[3], target_token=10, force_tokens=FT)
    add("short1_target_over", short[1], target_token=100)  # rate -> 1: reduce_rate 0, the regex word path
    for i, s in enumerate(medium):
        add(f"medium{i}_r50", s, force_reserve_digit=(i == 1))
        add(f"medium{i}_r33_force", s, rate=0.33, force_tokens=FT, drop_consecutive=(i != 0))
        add(f"medium{i}_target60", s, target_token=60, force_tokens=["\n"], force_reserve_digit=True)
    for i, s in enumerate(long):
        add(f"long{i}_r50", s)
        add(f"long{i}_r33_force", s, rate=0.33, force_tokens=FT, force_reserve_digit=(i != 1),
            drop_consecutive=True)
        add(f"long{i}_target200", s, target_token=200, force_tokens=["?"])
    for i, ctx in enumerate(multi):
        add(f"multi{i}_r50", ctx)
        add(f"multi{i}_r33_force", ctx, rate=0.33, force_tokens=FT, drop_consecutive=True)
        add(f"multi{i}_target40", ctx, target_token=40)
        add(f"multi{i}_nofilter_r50", ctx, use_context_level_filter=False, force_tokens=FT)
    add("multi0_target_over", multi[0], target_token=500, force_tokens=FT)
    return out


class _Recorder:
    def __init__(self, model):
        self.rows: list[dict] = []
        self.handle = model.register_forward_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs, output):
        ids = kwargs["input_ids"]
        mask = kwargs["attention_mask"].bool()
        p = torch.softmax(output.logits, dim=-1)[..., 1]
        for j in range(ids.shape[0]):
            self.rows.append({"ids": ids[j][mask[j]].tolist(),
                              "p_keep": [round(float(x), 6) for x in p[j][mask[j]]]})

    def take(self) -> list[dict]:
        rows, self.rows = self.rows, []
        return rows


def load_compressor(model_dir: Path, family: str, tmp: Path):
    """llmlingua's PromptCompressor on ``model_dir`` through a symlink named for ``family``."""
    from .cl100k import ensure_cl100k

    ensure_cl100k()
    from llmlingua import PromptCompressor

    link = tmp / f"glimpse-tiny-{family}"
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(Path(model_dir).resolve(), link)
    comp = PromptCompressor(model_name=str(link), use_llmlingua2=True, device_map="cpu")
    return comp, link


def run_case(comp, rec: _Recorder, case: dict) -> dict:
    import copy

    p = copy.deepcopy(case["params"])
    res = comp.compress_prompt(copy.deepcopy(case["context"]), return_word_label=True, word_sep=WORD_SEP,
                               label_sep=LABEL_SEP, **p)
    pairs = res["fn_labeled_original_prompt"].split(WORD_SEP) if res["fn_labeled_original_prompt"] else []
    words, labels = [], []
    for pair in pairs:
        w, _, lab = pair.rpartition(LABEL_SEP)
        words.append(w)
        labels.append(int(lab))
    keep = ("compressed_prompt", "compressed_prompt_list", "origin_tokens", "compressed_tokens", "ratio", "rate")
    return {"name": case["name"], "context": case["context"], "params": case["params"],
            "result": {k: res[k] for k in keep}, "words": words, "labels": labels, "model_rows": rec.take()}


def write_fixtures(model_dir: Path, family: str) -> tuple[list[dict], list[str]]:
    """Run every case; write fixtures/llmlingua.json. Returns (results, llmlingua's special_tokens)."""
    import llmlingua

    with tempfile.TemporaryDirectory() as tmp:
        comp, link = load_compressor(model_dir, family, Path(tmp))
        check_tokenizer_contract(comp, model_dir)
        rec = _Recorder(comp.model)
        results = [run_case(comp, rec, c) for c in cases()]
        skip = sorted(comp.special_tokens - {None})
        rec.handle.remove()
    doc = {"llmlingua": llmlingua.__version__, "produced_by": "glimpse_export export-compressor",
           "model_name_used": f"<tmp>/glimpse-tiny-{family} -> this folder",
           "call": "PromptCompressor(model_name, use_llmlingua2=True, device_map='cpu').compress_prompt(context, "
                   "return_word_label=True, **params)",
           "word_sep": WORD_SEP, "label_sep": LABEL_SEP, "cases": results}
    (model_dir / "fixtures").mkdir(exist_ok=True)
    (model_dir / "fixtures" / "llmlingua.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n",
                                                            encoding="utf-8")
    rows = sum(len(r["model_rows"]) for r in results)
    chunked = sum(1 for r in results if isinstance(r["context"], str) and len(r["model_rows"]) > 1)
    log(f"  fixtures: {len(results)} cases, {rows} model rows, {chunked} single-context cases split into chunks")
    return results, skip


def check_tokenizer_contract(comp, model_dir: Path) -> None:
    """The Rust side uses the ``tokenizers`` crate on tokenizer.json: transformers' tokenize /
    convert_tokens_to_string must be exactly its encode(add_special_tokens=False).tokens / decoder.decode."""
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    texts = []
    for c in cases():
        texts += [c["context"]] if isinstance(c["context"], str) else c["context"]
    texts += ["[NEW0] x [NEW1]\n?", "\n", "?", "."]
    for t in texts:
        a = comp.tokenizer.tokenize(t)
        b = raw.encode(t, add_special_tokens=False).tokens
        if a != b:
            raise ExportError(f"transformers tokenize != tokenizers encode on {t[:40]!r}")
        if comp.tokenizer.convert_tokens_to_string(a) != raw.decoder.decode(b):
            raise ExportError(f"convert_tokens_to_string != decoder.decode on {t[:40]!r}")
    if len(comp.tokenizer) != comp.model.config.vocab_size or comp.model.config.vocab_size != raw.get_vocab_size():
        raise ExportError("llmlingua resized the embeddings: vocab sizes differ")


def check_fixtures(model_dir: Path, family: str) -> list[str]:
    """Re-run llmlingua on DIR/fixtures/llmlingua.json; returns the mismatches (empty = reproduced)."""
    doc = json.loads((model_dir / "fixtures" / "llmlingua.json").read_text(encoding="utf-8"))
    bad = []
    with tempfile.TemporaryDirectory() as tmp:
        comp, _ = load_compressor(model_dir, family, Path(tmp))
        check_tokenizer_contract(comp, model_dir)
        rec = _Recorder(comp.model)
        for case in doc["cases"]:
            got = run_case(comp, rec, case)
            for key in ("result", "words", "labels"):
                if got[key] != case[key]:
                    bad.append(f"{case['name']}: {key} differs")
            if [r["ids"] for r in got["model_rows"]] != [r["ids"] for r in case["model_rows"]]:
                bad.append(f"{case['name']}: model input ids differ")
            else:
                d = max((abs(a - b) for r, s in zip(got["model_rows"], case["model_rows"])
                         for a, b in zip(r["p_keep"], s["p_keep"])), default=0.0)
                if d > 2e-6:
                    bad.append(f"{case['name']}: p_keep differs by {d:g}")
        rec.handle.remove()
    return bad
