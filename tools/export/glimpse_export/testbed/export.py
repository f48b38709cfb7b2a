"""The ``export-testbed`` command: export a trained testbed with the tiny models' exporter, self-check, and compare
the onnxruntime greedy loop's answers with transformers' on the eval set."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..common import ExportError, seed_everything
from ..families import Bundle
from ..folder import write_export_info
from ..images import load_rgb
from ..onnx_parts import export_all, export_decoder
from ..ort_loop import OrtModel
from ..parity import compute_case, messages, self_check
from ..manifest import write_manifest
from ..signals import export_signals
from ..stages import export_stages
from .eval import MAX_ANSWER_TOKENS, groups, normalize, predict, read_evalset, summarize
from .model import load_testbed


def ort_predict(onnx_dir: Path, bundle: Bundle, eval_dir: Path, rows: list[dict]) -> list[str]:
    """The Rust runtime's loop (ort_loop.OrtModel): full prompt per question, vision once per picture."""
    ort_model = OrtModel(onnx_dir)
    proc = bundle.processor
    preds = []
    for grp in groups(rows):
        img = load_rgb(eval_dir / grp[0]["image"])
        feats = None
        for r in grp:
            text = proc.apply_chat_template(messages(r["question"]), add_generation_prompt=True)
            inputs = proc(images=[img], text=[text], return_tensors="np")
            if feats is None:
                feats = ort_model.image_features(inputs["pixel_values"], inputs.get("pixel_attention_mask"))
            ids = inputs["input_ids"].astype(np.int64)
            embeds = ort_model.splice(ids, bundle.image_token_id, feats)
            seq = ids.shape[1]
            attn = np.ones((1, seq), dtype=np.int64)
            pos = np.arange(seq, dtype=np.int64)[None]
            past = ort_model.empty_past(1)
            gen = []
            for _ in range(MAX_ANSWER_TOKENS):
                logits, past = ort_model.decode(embeds, attn, pos, past)
                t = int(logits[0, -1].argmax())
                gen.append(t)
                if t in bundle.eos_token_ids:
                    break
                embeds = ort_model.embed(np.asarray([[t]], dtype=np.int64))
                attn = np.ones((1, attn.shape[1] + 1), dtype=np.int64)
                pos = np.asarray([[attn.shape[1] - 1]], dtype=np.int64)
            preds.append(normalize(bundle.tokenizer.decode(gen, skip_special_tokens=True)))
    return preds


def _frozen_testbed(model_dir: Path):
    """A trained testbed with its weights frozen, its eval folder and the eval set's rows (seeded like every export)."""
    seed_everything(0)
    bundle = load_testbed(model_dir)
    for p in bundle.model.parameters():
        p.requires_grad_(False)
    eval_dir = model_dir / "eval"
    return bundle, eval_dir, read_evalset(eval_dir)


def run_testbed_export(model_dir: Path, parity_items: int, signals: bool = False) -> dict:
    """Export the trained weights in MODEL_DIR with the tiny models' exporter, self-check, and compare ORT greedy
    answers with transformers on the first PARITY_ITEMS eval questions."""
    bundle, eval_dir, rows = _frozen_testbed(model_dir)
    img_path = eval_dir / rows[0]["image"]
    case = compute_case(bundle, "eval0", img_path)
    onnx_dir = model_dir / "onnx"
    if onnx_dir.is_dir():
        for f in onnx_dir.iterdir():
            f.unlink()
    export_all(bundle, onnx_dir, case.torch_inputs)
    if signals:
        export_signals(bundle, model_dir, case.torch_inputs)
    report = self_check(bundle, model_dir, [case])
    write_export_info(model_dir, bundle)
    sub = rows[:parity_items]
    hf = predict(bundle, eval_dir, sub, progress=False)
    ort = ort_predict(onnx_dir, bundle, eval_dir, sub)
    agree = sum(a == b for a, b in zip(hf, ort)) / len(sub)
    acc_hf = summarize(sub, hf)["overall"]["accuracy"]
    acc_ort = summarize(sub, ort)["overall"]["accuracy"]
    if abs(acc_hf - acc_ort) > 0.005:
        raise ExportError(f"ORT accuracy {acc_ort} vs transformers {acc_hf} on {len(sub)} items")
    return {"self_check": report, "parity_items": len(sub), "answer_agreement": agree,
            "accuracy_transformers": acc_hf, "accuracy_onnxruntime": acc_ort}


def run_testbed_stages(model_dir: Path, groups: int) -> dict:
    """Write the staged vision encoder of a trained testbed next to its monolithic ``vision_encoder.onnx`` (which
    stays byte-identical, signals included) and list it in glimpse.json; checked like the tiny models' stages
    (torch against transformers' hidden states, the ONNX chain against the monolithic file, fewer tokens)."""
    bundle, eval_dir, rows = _frozen_testbed(model_dir)
    cases = [compute_case(bundle, f"eval{i}", eval_dir / rows[i]["image"]) for i in (0, 8)]
    spec = bundle.spec
    stages, report = export_stages(spec, bundle.model, model_dir / "onnx", spec.vision_trace_args(cases[0].torch_inputs),
                                   [spec.vision_args(c.torch_inputs) for c in cases], bundle.extra["image_seq_len"],
                                   groups)
    write_manifest(model_dir, stages=stages)
    return {"stages": stages, "report": report}


def run_testbed_decoder(model_dir: Path, attention_bias: bool, parity_items: int) -> dict:
    """Re-export only ``decoder_model_merged.onnx`` of a trained testbed, with the ``attention_bias`` input when asked
    (proportional attention for pooled tokens, docs/pruning.md), and check the ORT greedy loop (zero bias) still gives
    transformers' answers on the first PARITY_ITEMS eval questions."""
    bundle, eval_dir, rows = _frozen_testbed(model_dir)
    case = compute_case(bundle, "eval0", eval_dir / rows[0]["image"])
    export_decoder(bundle.model, model_dir / "onnx", case.torch_inputs, attention_bias)
    if attention_bias:
        write_bias_fixture(bundle, model_dir / "fixtures" / "attention_bias.json")
    sub = rows[:parity_items]
    hf = predict(bundle, eval_dir, sub, progress=False)
    ort_preds = ort_predict(model_dir / "onnx", bundle, eval_dir, sub)
    agree = sum(a == b for a, b in zip(hf, ort_preds)) / len(sub)
    if agree < 1.0:
        raise ExportError(f"ORT answers differ from transformers on {len(sub)} items (agreement {agree:.4f})")
    return {"attention_bias": attention_bias, "parity_items": len(sub), "answer_agreement": agree}


BIAS_FIXTURE_TEXT = "Is the red circle above or below the blue square?"


def write_bias_fixture(bundle, path: Path) -> None:
    """Record transformers' reference for the decoder's ``attention_bias`` input: a prompt's token ids, a per-key bias
    (zeros with ln 3 and ln 7 at two keys, as pooled summary rows of 3 and 7 dropped rows get) and the eager model's
    last-position logits under the equivalent 4-D float mask (causal -inf, the bias on every allowed key).
    tests/pooling.rs runs the exported decoder on both backends against it."""
    import json

    import torch

    model = bundle.model
    ids = torch.tensor([bundle.tokenizer(BIAS_FIXTURE_TEXT).input_ids], dtype=torch.int64)
    n = ids.shape[1]
    if n < 8:
        raise ExportError(f"bias fixture prompt has only {n} tokens")
    bias = torch.zeros(1, n)
    bias[0, 2] = float(np.log(3.0))
    bias[0, 5] = float(np.log(7.0))
    with torch.no_grad():
        emb = model.model.get_input_embeddings()(ids)
        causal = torch.full((n, n), float("-inf")).triu(1)
        mask4 = causal[None, None] + bias[:, None, None, :]
        pos = torch.arange(n)[None]
        logits = model(inputs_embeds=emb, attention_mask=mask4, position_ids=pos, use_cache=False).logits[0, -1]
        plain = model(inputs_embeds=emb, position_ids=pos, use_cache=False).logits[0, -1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "reference": f"transformers {__import__('transformers').__version__}, eager attention, 4-D float mask",
        "input_ids": ids[0].tolist(),
        "key_bias": [round(float(x), 9) for x in bias[0]],
        "logits": [float(x) for x in logits],
        "plain_logits": [float(x) for x in plain],
    }) + "\n")
