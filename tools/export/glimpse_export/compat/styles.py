"""The compatibility styles: one folder each under ``models/compat/<name>/``.

Every style builds a real transformers class with sizes unlike the tiny fixtures (``families/*.py``: vision 32 wide,
Llama 64 / 2 layers / 4 heads / 2 KV heads, 32 or 64 px views) and exports it the way some other tool would.
``exporter`` picks the code path in ``export.py``; ``decoders`` lists the decoder files the folder ships (stem,
fixture key of its onnxruntime tokens or None when they must equal transformers').
"""

from __future__ import annotations

from dataclasses import dataclass, field


def _text(hidden, inter, layers, heads, kv, tie=False, eps=1e-5):
    return dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv, max_position_embeddings=256, rms_norm_eps=eps, initializer_range=0.1,
                tie_word_embeddings=tie)


def _clip(hidden, layers, heads, px, patch):
    return dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
                image_size=px, patch_size=patch, projection_dim=hidden, initializer_range=0.1)


@dataclass(frozen=True)
class Style:
    name: str
    family: str  # families/ spec name
    seed: int
    vocab: int  # BPE vocabulary size (the family's special tokens included)
    text: dict
    vision: dict
    extra: dict = field(default_factory=dict)  # llava: feature_layer, strategy; idefics3: scale_factor, longest_edge
    exporter: str = "legacy"
    decoders: tuple = (("decoder_model_merged", None),)
    summary: str = ""


STYLES = (
    Style(
        "llava-plain-export", "llava", 11, 448,
        text=_text(48, 96, 3, 4, 2, eps=1e-6),
        vision=_clip(24, 4, 2, 40, 10),
        extra=dict(feature_layer=-3, strategy="full"),
        exporter="plain",
        summary="LLaVA, decoder = plain torch.onnx.export (dynamo=False) of the Hugging Face LM with a 2-D "
                "attention_mask (transformers builds the causal mask in the graph); GQA 4/2; feature layer -3, "
                "strategy full (CLS kept); vision encoder fixed to 1 image",
    ),
    Style(
        "llava-feature-layers", "llava", 12, 500,
        text=_text(40, 80, 2, 2, 1),
        vision=_clip(32, 4, 4, 36, 6),
        extra=dict(feature_layer=[-1, -3], strategy="default"),
        summary="LLaVA with vision_feature_layer [-1, -3] (two hidden states concatenated, projector input 2x "
                "the vision width), strategy default; MQA (2 heads / 1 KV head, head_dim 20)",
    ),
    Style(
        "smolvlm-dynamic-hw", "smolvlm", 13, 520,
        text=_text(72, 144, 2, 6, 3),
        vision=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=36,
                    patch_size=4, initializer_range=0.1),
        extra=dict(scale_factor=3, longest_edge=108),
        exporter="dynamic_hw",
        summary="Idefics3 / SmolVLM, vision encoder with symbolic height and width; 36 px tiles, patch 4 (9x9 "
                "patches), pixel shuffle 3 -> 9 tokens per tile; processor files exactly as transformers 5 "
                "save_pretrained writes them (processor_config.json only)",
    ),
    Style(
        "smolvlm-dynamo", "smolvlm", 14, 384,
        text=_text(64, 128, 3, 8, 2),
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=48,
                    patch_size=6, initializer_range=0.1),
        extra=dict(scale_factor=2, longest_edge=96),
        exporter="dynamo",
        summary="Idefics3 / SmolVLM exported with torch.onnx.export(dynamo=True) (torch.export + onnxscript), "
                "48 px tiles, patch 6, pixel shuffle 2 -> 16 tokens per tile, 3 layers, 8 heads / 2 KV heads",
    ),
    Style(
        "llava-external-data", "llava", 15, 420,
        text=_text(56, 112, 2, 7, 7),
        vision=_clip(32, 5, 2, 48, 12),
        extra=dict(feature_layer=-2, strategy="default"),
        exporter="external",
        summary="LLaVA whose three ONNX files keep every initializer in <part>.onnx_data (size_threshold 0); "
                "plain multi-head attention (7 heads = 7 KV heads, head_dim 8), CLIP 48 px / patch 12",
    ),
    Style(
        "llava-int8-decoder-only", "llava", 16, 460,
        text=_text(64, 160, 2, 4, 1),
        vision=_clip(32, 2, 2, 32, 4),
        extra=dict(feature_layer=-1, strategy="default"),
        exporter="decoder_variants",
        decoders=(("decoder_model_merged_int8", "generated_ids_ort_int8"),
                  ("decoder_model_merged_fp16", "generated_ids_ort_fp16")),
        summary="LLaVA with fp32 vision_encoder / embed_tokens but the decoder only as _int8 (quantize_dynamic "
                "QInt8) and _fp16 (fp16 weights, fp32 I/O); no fp32 decoder_model_merged.onnx",
    ),
    Style(
        "llava-onevision-no-newline", "llava_onevision", 17, 470,
        text=_text(48, 96, 2, 4, 2, tie=True, eps=1e-6),
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=40,
                    patch_size=8, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=False),
        extra=dict(pinpoints=[[40 * h, 40 * w] for h in range(1, 4) for w in range(1, 4)]),
        exporter="onevision_plain",
        summary="LLaVA-OneVision whose vision_encoder is only the SigLIP tower + projector (no image_newline "
                "output); the newline vector is in config.json as \"image_newline\" (optimum-intel's convention)",
    ),
)


def get(names: list[str] | None) -> list[Style]:
    if not names:
        return list(STYLES)
    by_name = {s.name: s for s in STYLES}
    bad = [n for n in names if n not in by_name]
    if bad:
        raise SystemExit(f"unknown compat style(s) {bad}; choose from {', '.join(by_name)}")
    return [by_name[n] for n in names]
