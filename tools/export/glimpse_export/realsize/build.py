"""Real-size models: build one architecture with seeded random weights; parameters per ONNX part."""

from __future__ import annotations

from transformers import GenerationConfig

from ..common import seed_everything
from ..families import Bundle, finish_model
from .archs import ARCHS
from .tokenizer import real_tokenizer


def build(arch: str, seed: int) -> Bundle:
    a = ARCHS[arch]
    spec = a["family"]
    tok = real_tokenizer(spec, a["tokenizer"])
    image_token_id = a["tokenizer"].special["<image>"]
    processor, seq = spec.processor(tok, a["sizes"])
    config = spec.model_config(spec.text_config_class()(**a["text"]), image_token_id, tok, a["sizes"])
    seed_everything(seed)
    model = finish_model(spec.model_class()(config))
    eos = list(a["generation"]["eos_token_id"])
    model.generation_config = GenerationConfig(**a["generation"])
    return Bundle(spec, seed, model, processor, tok, spec.chat_template, image_token_id, eos,
                  extra=dict(image_seq_len=seq))


def _count(params) -> int:
    seen, n = set(), 0
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def param_counts(bundle: Bundle) -> dict[str, int]:
    """Torch parameters per ONNX part (the lm_head counts for the decoder, also when tied to embed_tokens)."""
    model, spec = bundle.model, bundle.spec
    vision = _count(list(spec.vision_tower(model).parameters()) + list(spec.connector(model).parameters()))
    text = model.get_decoder() if hasattr(model, "get_decoder") else model.model.get_decoder()
    emb = model.get_input_embeddings().weight
    decoder = _count([p for p in text.parameters() if p is not emb] + [model.lm_head.weight])
    return {"vision_encoder": vision, "embed_tokens": emb.numel(), "decoder_model_merged": decoder,
            "total_unique": _count(model.parameters())}
