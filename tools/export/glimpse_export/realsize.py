"""The ``realsize`` command: real-size random-weight models for timing (no download).

Builds the exact architecture of SmolVLM-256M-Instruct, SmolVLM-500M-Instruct or LLaVA-OneVision-0.5B
(llava-hf/llava-onevision-qwen2-0.5b-ov-hf) from configs written below (values of the published ``config.json`` /
``preprocessor_config.json`` / ``processor_config.json`` files), with seeded random weights, an offline byte-level
BPE tokenizer whose special tokens sit at the real ids, and exports the three onnx-community parts (fp32) with the
wrappers of ``onnx_parts``. Weights of a part above the 2 GiB protobuf limit go to ``<file>.onnx_data`` next to the
``.onnx``; smaller parts keep them inside.

Self-check: onnxruntime runs every part once on a real-size input and must match the torch model within 1e-3
(vision features, token embeddings, decoder logits of a prefill with empty past and of one decode step).
"""

from __future__ import annotations

import gc
import json
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from .common import OPSET, ExportError, Timer, log, seed_everything
from .families import OV_CHAT_TEMPLATE, SMOLVLM_CHAT_TEMPLATE, Bundle, OnevisionProcessor, _finish_model
from .onnx_parts import Decoder, EmbedTokens, Idefics3VisionEncoder, OnevisionVisionEncoder, kv_shape, name_outputs

PROTOBUF_LIMIT = 2**31  # bytes: one serialized ONNX protobuf cannot exceed 2 GiB
TOL = 1e-3
GLIMPSE_NOTE = "random weights: for timing only, accuracy cannot be judged"

# --------------------------------------------------------------------------------------------- published configs
# SmolVLM-*-Instruct: Idefics3ForConditionalGeneration, SigLIP-B/16 at 512 px, pixel shuffle 4 (64 tokens per tile),
# SmolLM2 text model (Llama), untied lm_head.
SMOL_VISION = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, num_channels=3,
    image_size=512, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, attention_dropout=0.0,
    initializer_range=0.02,
)
SMOL_TEXT_COMMON = dict(
    vocab_size=49280, head_dim=64, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
    hidden_act="silu", attention_bias=False, mlp_bias=False, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    tie_word_embeddings=False, initializer_range=0.02,
)
# LLaVA-OneVision-0.5B: SigLIP so400m (26 of 27 layers, no head) at 384 px, patch 14 (729 tokens per crop),
# 2-layer gelu projector, Qwen2-0.5B text model with tied embeddings (vocab padded to 152000 by the llava-hf conversion).
OV_VISION = dict(
    hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16, num_channels=3,
    image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, attention_dropout=0.0,
    vision_use_head=False,
)
OV_TEXT = dict(
    vocab_size=152000, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
    num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6, hidden_act="silu",
    use_sliding_window=False, sliding_window=None, max_window_layers=24, bos_token_id=151643, eos_token_id=151645,
    tie_word_embeddings=True, initializer_range=0.02,
)

ARCHS = {
    "smolvlm-256m": dict(
        kind="idefics3", source="HuggingFaceTB/SmolVLM-256M-Instruct",
        text=dict(SMOL_TEXT_COMMON, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3),
    ),
    "smolvlm-500m": dict(
        kind="idefics3", source="HuggingFaceTB/SmolVLM-500M-Instruct",
        text=dict(SMOL_TEXT_COMMON, hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                  num_attention_heads=15, num_key_value_heads=5),
    ),
    "llava-onevision-0.5b": dict(kind="llava_onevision", source="llava-hf/llava-onevision-qwen2-0.5b-ov-hf", text=OV_TEXT),
}

SMOL_SCALE_FACTOR = 4
SMOL_IMAGE_TOKEN_ID = 49190
SMOL_IMAGE_SEQ_LEN = 64  # (512 / 16)^2 / 4^2
SMOL_LONGEST_EDGE = 2048  # processor size.longest_edge (4 x 512)
SMOL_TILE = 512  # processor max_image_size.longest_edge

# SmolLM2 / SmolVLM special tokens at their real ids (tokenizer.json added_tokens)
SMOL_SPECIAL = {
    "<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2,
    "<global-img>": 49152,
    **{f"<row_{r}_col_{c}>": 49153 + (r - 1) * 6 + (c - 1) for r in range(1, 7) for c in range(1, 7)},
    "<fake_token_around_image>": 49189,
    "<image>": 49190,
    **{f"<|reserved_special_token_{i}|>": 49191 + i for i in range(88)},
    "<end_of_utterance>": 49279,
}
SMOL_TOKENIZER_LEN = 49280

# Qwen2 special tokens + the two llava-hf added ones
OV_SPECIAL = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<image>": 151646,
              "<video>": 151647}
OV_TOKENIZER_LEN = 151648  # the model's vocab (152000) is larger: ids above are never produced
OV_IMAGE_TOKEN_ID = 151646
OV_NUM_IMAGE_TOKENS = 729
OV_GRID_PINPOINTS = [[h, w] for h in range(384, 2305, 384) for w in range(384, 2305, 384)]


QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


# ------------------------------------------------------------------------------------------------------ tokenizer
def build_tokenizer(kind: str):
    """Byte-level BPE trained on the built-in corpus, re-numbered so that the special tokens have the real ids;
    free ids below the real tokenizer length are filled with never-produced placeholder tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    from .tokenizer import CORPUS

    special, length = (SMOL_SPECIAL, SMOL_TOKENIZER_LEN) if kind == "idefics3" else (OV_SPECIAL, OV_TOKENIZER_LEN)
    tok = Tokenizer(models.BPE())
    if kind == "idefics3":  # SmolLM2: individual digits, then GPT-2 byte-level split
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:  # Qwen2: NFC, regex split, byte-level without its own regex
        from tokenizers import Regex

        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, min_frequency=2, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    lines = [line for line in CORPUS.splitlines() if line]
    tok.train_from_iterator(lines * 3, trainer=trainer)

    spec = json.loads(tok.to_str())
    trained = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    taken = set(special.values())
    vocab = dict(special)
    free = (i for i in range(length) if i not in taken)
    for token, _ in trained:
        vocab[token] = next(free)
    for i in free:
        vocab[f"<|glimpse_unused_{i}|>"] = i
    assert len(vocab) == length and sorted(vocab.values()) == list(range(length))
    spec["model"]["vocab"] = vocab
    spec["added_tokens"] = []
    out = Tokenizer.from_str(json.dumps(spec))
    out.post_processor = processors.ByteLevel(trim_offsets=False)
    out.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    for t, i in special.items():
        if out.token_to_id(t) != i:
            raise ExportError(f"tokenizer: {t} has id {out.token_to_id(t)}, expected {i}")
    if out.get_vocab_size(with_added_tokens=True) != length:
        raise ExportError(f"tokenizer: {out.get_vocab_size(with_added_tokens=True)} tokens, expected {length}")
    return out


def wrap(kind: str, tok):
    from transformers import PreTrainedTokenizerFast

    if kind == "idefics3":
        kw = dict(bos_token="<|im_start|>", eos_token="<end_of_utterance>", pad_token="<|im_end|>",
                  unk_token="<|endoftext|>", model_max_length=8192, chat_template=SMOLVLM_CHAT_TEMPLATE,
                  additional_special_tokens=["<fake_token_around_image>", "<image>", "<end_of_utterance>"])
    else:
        kw = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=32768,
                  chat_template=OV_CHAT_TEMPLATE, additional_special_tokens=["<|im_start|>", "<|im_end|>", "<image>", "<video>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **kw)
    if kind == "llava_onevision":
        fast.image_token = "<image>"
        fast.video_token = "<video>"
    return fast


# --------------------------------------------------------------------------------------------------------- models
def build(arch: str, seed: int) -> Bundle:
    spec = ARCHS[arch]
    kind = spec["kind"]
    tok = wrap(kind, build_tokenizer(kind))
    if kind == "idefics3":
        from transformers import (GenerationConfig, Idefics3Config, Idefics3ForConditionalGeneration,
                                  Idefics3Processor, Idefics3VisionConfig, LlamaConfig)
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

        ip = Idefics3ImageProcessorPil(
            do_resize=True, size={"longest_edge": SMOL_LONGEST_EDGE}, max_image_size={"longest_edge": SMOL_TILE},
            do_image_splitting=True, resample=1, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
            image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_pad=True, do_convert_rgb=True,
        )
        processor = Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=SMOL_IMAGE_SEQ_LEN,
                                      chat_template=SMOLVLM_CHAT_TEMPLATE)
        config = Idefics3Config(
            vision_config=Idefics3VisionConfig(**SMOL_VISION), text_config=LlamaConfig(**spec["text"]),
            scale_factor=SMOL_SCALE_FACTOR, image_token_id=SMOL_IMAGE_TOKEN_ID, tie_word_embeddings=False,
            pad_token_id=2,
        )
        seed_everything(seed)
        model = _finish_model(Idefics3ForConditionalGeneration(config), seed)
        eos = [SMOL_SPECIAL["<end_of_utterance>"]]
        model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=eos, pad_token_id=2)
        return Bundle("idefics3", seed, model, processor, tok, SMOLVLM_CHAT_TEMPLATE, SMOL_IMAGE_TOKEN_ID, eos,
                      extra=dict(image_seq_len=SMOL_IMAGE_SEQ_LEN))

    from transformers import (GenerationConfig, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              Qwen2Config, SiglipVisionConfig)
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    ip = LlavaOnevisionImageProcessorPil(
        do_resize=True, size={"height": 384, "width": 384}, image_grid_pinpoints=OV_GRID_PINPOINTS, resample=3,
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5], do_pad=True, do_convert_rgb=True,
    )
    # LlavaOnevisionProcessor itself needs torchvision (its video part), which is not installed
    processor = OnevisionProcessor(ip, tok, OV_NUM_IMAGE_TOKENS, "anyres_max_9", OV_CHAT_TEMPLATE)
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**OV_VISION), text_config=Qwen2Config(**spec["text"]),
        image_token_index=OV_IMAGE_TOKEN_ID, video_token_index=OV_SPECIAL["<video>"], projector_hidden_act="gelu",
        vision_feature_select_strategy="full", vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9",
        image_grid_pinpoints=OV_GRID_PINPOINTS, tie_word_embeddings=True, multimodal_projector_bias=True,
    )
    seed_everything(seed)
    model = _finish_model(LlavaOnevisionForConditionalGeneration(config), seed)
    eos = [OV_SPECIAL["<|im_end|>"], OV_SPECIAL["<|endoftext|>"]]
    model.generation_config = GenerationConfig(bos_token_id=151643, eos_token_id=eos, pad_token_id=151643)
    return Bundle("llava_onevision", seed, model, processor, tok, OV_CHAT_TEMPLATE, OV_IMAGE_TOKEN_ID, eos,
                  extra=dict(image_seq_len=OV_NUM_IMAGE_TOKENS))


def _count(params) -> int:
    seen, n = set(), 0
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def param_counts(model) -> dict[str, int]:
    """Torch parameters per ONNX part (the lm_head counts for the decoder, also when tied to embed_tokens)."""
    m = model.model
    if hasattr(m, "connector"):
        vision = _count(list(m.vision_model.parameters()) + list(m.connector.parameters()))
    else:
        vision = _count(list(m.vision_tower.parameters()) + list(m.multi_modal_projector.parameters()))
    text = model.get_decoder() if hasattr(model, "get_decoder") else m.get_decoder()
    emb = model.get_input_embeddings().weight
    decoder = _count([p for p in text.parameters() if p is not emb] + [model.lm_head.weight])
    return {"vision_encoder": vision, "embed_tokens": emb.numel(), "decoder_model_merged": decoder,
            "total_unique": _count(model.parameters())}


# --------------------------------------------------------------------------------------------------------- export
def _tensor_bytes(m) -> int:
    return sum(len(t.raw_data) for t in m.graph.initializer)


def export_part(module, args: tuple, path: Path, input_names, output_names, dynamic_axes,
                fixed_out_dims: dict | None = None) -> dict:
    """torch.onnx.export (legacy, opset 18) into a scratch folder, then one ``.onnx`` with its weights inside, or,
    above the protobuf limit, ``.onnx`` + ``.onnx_data`` (all tensors in one external file)."""
    import onnx

    t = Timer()
    scratch = Path(tempfile.mkdtemp(prefix=f".{path.stem}-", dir=path.parent))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, str(scratch / path.name), input_names=list(input_names),
                              output_names=list(output_names), dynamic_axes=dynamic_axes, opset_version=OPSET,
                              do_constant_folding=True, dynamo=False)
        trace_s = t()
        m = onnx.load(str(scratch / path.name), load_external_data=True)
        name_outputs(m, output_names)
        for out in m.graph.output:
            for axis, value in (fixed_out_dims or {}).get(out.name, {}).items():
                dim = out.type.tensor_type.shape.dim[axis]
                dim.Clear()
                dim.dim_value = value
        got_in, got_out = [i.name for i in m.graph.input], [o.name for o in m.graph.output]
        if got_in != list(input_names) or got_out != list(output_names):
            raise ExportError(f"{path.name}: I/O {got_in} -> {got_out} != {list(input_names)} -> {list(output_names)}")
        data = path.with_name(path.name + "_data")
        for p in (path, data):
            if p.exists():
                p.unlink()
        weights = _tensor_bytes(m)
        external = weights + 64 * 2**20 >= PROTOBUF_LIMIT  # margin for the graph itself
        n_init = sum(int(np.prod(i.dims)) for i in m.graph.initializer)
        if external:
            onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data.name, size_threshold=1024)
        else:
            onnx.save_model(m, str(path))
        n_nodes = len(m.graph.node)
        del m
        gc.collect()
        onnx.checker.check_model(str(path))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    files = {p.name: p.stat().st_size for p in (path, data) if p.exists()}
    log(f"  wrote {files} ({n_nodes} nodes, {n_init} initializer values) in {t():.1f}s (trace {trace_s:.1f}s)")
    return {"files": files, "external_data": external, "initializer_values": n_init, "nodes": n_nodes,
            "seconds": round(t(), 1)}


def _decoder_axes(n_layers: int):
    in_names = ["inputs_embeds", "attention_mask", "position_ids"]
    out_names = ["logits"]
    axes = {
        "inputs_embeds": {0: "batch_size", 1: "sequence_length"},
        "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
        "position_ids": {0: "batch_size", 1: "sequence_length"},
        "logits": {0: "batch_size", 1: "sequence_length"},
    }
    for i in range(n_layers):
        for kv in ("key", "value"):
            in_names.append(f"past_key_values.{i}.{kv}")
            out_names.append(f"present.{i}.{kv}")
            axes[f"past_key_values.{i}.{kv}"] = {0: "batch_size", 2: "past_sequence_length"}
            axes[f"present.{i}.{kv}"] = {0: "batch_size", 2: "total_sequence_length"}
    return in_names, out_names, axes


# ------------------------------------------------------------------------------------------------------- self-check
PREFILL = 24  # tokens of the decoder check prefill


@torch.no_grad()
def torch_references(bundle: Bundle, seed: int) -> dict:
    """Real-size inputs and the torch model's outputs for every part (computed before export)."""
    model = bundle.model
    g = torch.Generator().manual_seed(seed + 1)
    ref: dict = {}
    if bundle.family == "idefics3":
        pv = torch.rand(1, 2, 3, 512, 512, generator=g) * 2 - 1  # one image, 2 tiles, normalised range
        pam = torch.ones(1, 2, 512, 512, dtype=torch.bool)
        feats = model.model.get_image_features(pv, pam).pooler_output
        ref["vision_in"] = {"pixel_values": pv.numpy(), "pixel_attention_mask": pam.numpy()}
        ref["vision_out"] = torch.cat(list(feats), dim=0).reshape(2, -1, feats[0].shape[-1]).numpy()
    else:
        pv = torch.rand(3, 3, 384, 384, generator=g) * 2 - 1  # 3 crops (e.g. 2 anyres crops + the base image)
        vis = model.model.vision_tower(pv, output_hidden_states=True, return_dict=True)
        ref["vision_in"] = {"pixel_values": pv.numpy()}
        ref["vision_out"] = model.model.multi_modal_projector(vis.hidden_states[-1]).numpy()
    n_tok = len(bundle.tokenizer)
    ids = torch.randint(0, n_tok, (1, PREFILL), generator=g)
    ref["ids"] = ids.numpy()
    ref["embeds"] = model.get_input_embeddings()(ids).numpy()
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    out2 = model(input_ids=nxt, attention_mask=torch.ones(1, PREFILL + 1, dtype=torch.int64), cache=out.cache,
                 use_cache=True)
    ref["prefill_logits"] = out.logits.numpy()
    ref["next_id"] = nxt.numpy()
    ref["next_embeds"] = model.get_input_embeddings()(nxt).numpy()
    ref["step_logits"] = out2.logits.numpy()
    ref["present0_key"] = out2.cache.layers[0].keys.numpy()
    return ref


def _maxdiff(a, b) -> float:
    if a.shape != b.shape:
        raise ExportError(f"shape {a.shape} != {b.shape}")
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def _session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _io(sess) -> dict:
    def fmt(xs):
        return [f"{x.name} {x.type.replace('tensor(', '').rstrip(')')} {list(x.shape)}" for x in xs]

    return {"inputs": fmt(sess.get_inputs()), "outputs": fmt(sess.get_outputs())}


def ort_check(onnx_dir: Path, ref: dict, threads: int) -> dict:
    res: dict = {}
    t = Timer()
    s = _session(onnx_dir / "vision_encoder.onnx", threads)
    res["io_vision_encoder"] = _io(s)
    t0 = time.perf_counter()
    (feats,) = s.run(["image_features"], ref["vision_in"])
    res["vision_run_s"] = round(time.perf_counter() - t0, 2)
    res["vision_features_diff"] = _maxdiff(feats, ref["vision_out"])
    res["vision_shape"] = list(feats.shape)
    del s
    gc.collect()

    s = _session(onnx_dir / "embed_tokens.onnx", threads)
    res["io_embed_tokens"] = _io(s)
    (emb,) = s.run(["inputs_embeds"], {"input_ids": ref["ids"].astype(np.int64)})
    res["embed_diff"] = _maxdiff(emb, ref["embeds"])
    del s
    gc.collect()

    s = _session(onnx_dir / "decoder_model_merged.onnx", threads)
    res["io_decoder_model_merged"] = _io(s)
    names = [o.name for o in s.get_outputs()]
    past = {}
    for i in s.get_inputs():
        if i.name.startswith("past_key_values."):
            past[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), dtype=np.float32)
    feeds = {"inputs_embeds": ref["embeds"], "attention_mask": np.ones((1, PREFILL), np.int64),
             "position_ids": np.arange(PREFILL, dtype=np.int64)[None], **past}
    t0 = time.perf_counter()
    outs = dict(zip(names, s.run(names, feeds)))
    res["prefill_run_s"] = round(time.perf_counter() - t0, 3)
    res["prefill_logits_diff"] = _maxdiff(outs["logits"], ref["prefill_logits"])
    past = {n.replace("present.", "past_key_values."): v for n, v in outs.items() if n.startswith("present.")}
    feeds = {"inputs_embeds": ref["next_embeds"], "attention_mask": np.ones((1, PREFILL + 1), np.int64),
             "position_ids": np.asarray([[PREFILL]], np.int64), **past}
    t0 = time.perf_counter()
    outs2 = dict(zip(names, s.run(names, feeds)))
    res["step_run_s"] = round(time.perf_counter() - t0, 3)
    res["step_logits_diff"] = _maxdiff(outs2["logits"], ref["step_logits"])
    res["step_present0_key_diff"] = _maxdiff(outs2["present.0.key"], ref["present0_key"])
    del s
    gc.collect()
    res["seconds"] = round(t(), 1)
    return res


# ------------------------------------------------------------------------------------------------------------ main
def _default_out(arch: str) -> Path:
    return Path(__file__).resolve().parents[3] / "models" / "real" / arch


def run_realsize(arch: str, out: Path | None, seed: int = 0, threads: int = 2) -> dict:
    from .pipeline import save_folder, write_export_info

    if arch not in ARCHS:
        raise SystemExit(f"unknown arch {arch!r} (expected one of {', '.join(ARCHS)})")
    timer = Timer()
    out = (out or _default_out(arch)).resolve()
    log(f"[realsize] arch={arch} ({ARCHS[arch]['source']}) out={out} seed={seed}")
    out.mkdir(parents=True, exist_ok=True)
    if (out / "onnx").is_dir():
        shutil.rmtree(out / "onnx")
    onnx_dir = out / "onnx"
    onnx_dir.mkdir()
    seed_everything(seed)
    torch.set_num_threads(threads)

    bundle = build(arch, seed)
    model = bundle.model
    params = param_counts(model)
    log(f"[realsize] built in {timer():.1f}s; parameters {params}")
    save_folder(bundle, out)
    write_export_info(out, bundle)

    t = Timer()
    ref = torch_references(bundle, seed)
    torch_ref_s = round(t(), 1)
    log(f"[realsize] torch references in {torch_ref_s}s")

    parts = {}
    n_layers, kv_heads, head_dim = kv_shape(model)
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        if bundle.family == "idefics3":
            vision = Idefics3VisionEncoder(model).eval()
            args = (torch.rand(2, 2, 3, 512, 512, generator=g) * 2 - 1, torch.ones(2, 2, 512, 512, dtype=torch.bool))
            names = ["pixel_values", "pixel_attention_mask"]
            axes = {"pixel_values": {0: "batch_size", 1: "num_images"},
                    "pixel_attention_mask": {0: "batch_size", 1: "num_images"},
                    "image_features": {0: "batch_num_images"}}
        else:
            vision = OnevisionVisionEncoder(model).eval()  # crop features unpacked + image_newline
            args = (torch.rand(2, 3, 384, 384, generator=g) * 2 - 1,)
            names = ["pixel_values"]
            axes = {"pixel_values": {0: "num_patches"}, "image_features": {0: "num_patches"}}
        outputs = ["image_features"] if bundle.family == "idefics3" else ["image_features", "image_newline"]
        parts["vision_encoder"] = export_part(vision, args, onnx_dir / "vision_encoder.onnx", names, outputs,
                                              axes, fixed_out_dims={"image_features": {1: bundle.extra["image_seq_len"]}})
        del vision, args
        gc.collect()

        ids = torch.randint(0, len(bundle.tokenizer), (2, 7), generator=g)
        axes = {"input_ids": {0: "batch_size", 1: "sequence_length"},
                "inputs_embeds": {0: "batch_size", 1: "sequence_length"}}
        parts["embed_tokens"] = export_part(EmbedTokens(model).eval(), (ids,), onnx_dir / "embed_tokens.onnx",
                                            ["input_ids"], ["inputs_embeds"], axes)
        gc.collect()

        b, past_len, seq = 2, 3, 4
        hidden = model.config.text_config.hidden_size
        emb = torch.randn(b, seq, hidden, generator=g) * 0.02
        mask = torch.ones(b, past_len + seq, dtype=torch.int64)
        pos = torch.arange(past_len, past_len + seq)[None].repeat(b, 1)
        past = [torch.randn(b, kv_heads, past_len, head_dim, generator=g) for _ in range(2 * n_layers)]
        in_names, out_names, axes = _decoder_axes(n_layers)
        parts["decoder_model_merged"] = export_part(Decoder(model).eval(), (emb, mask, pos, *past),
                                                    onnx_dir / "decoder_model_merged.onnx", in_names, out_names, axes)
    export_s = round(timer(), 1)
    del model, bundle.model, past
    bundle.model = None
    gc.collect()

    log(f"[realsize] exported in {export_s}s; onnxruntime self-check")
    check = ort_check(onnx_dir, ref, threads)
    diffs = {k: v for k, v in check.items() if k.endswith("_diff")}
    ok = all(v < TOL for v in diffs.values())

    info = {
        "realsize": True,
        "note": GLIMPSE_NOTE,
        "arch": arch,
        "architecture_of": ARCHS[arch]["source"],
        "model_type": "idefics3" if bundle.family == "idefics3" else "llava_onevision",
        "seed": seed,
    }
    (out / "glimpse.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    report = {
        "arch": arch,
        "out": str(out),
        "parameters": params,
        "parts": parts,
        "files": {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()},
        "self_check": check,
        "self_check_ok": ok,
        "seconds": {"total": round(timer(), 1), "build_to_export_done": export_s, "torch_references": torch_ref_s,
                    "ort_check": check["seconds"]},
    }
    (out / "realsize_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if not ok:
        raise ExportError(f"{arch}: onnxruntime vs torch max abs diffs {diffs} (tolerance {TOL})")
    log(f"[realsize] done in {timer():.1f}s")
    return report
