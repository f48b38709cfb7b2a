"""Published configs of the real-size architectures (recalled, not downloaded)."""

from __future__ import annotations

from ..families import FAMILIES
from .tokenizer import QWEN2, SMOLLM2

# SmolVLM-*-Instruct: Idefics3ForConditionalGeneration, SigLIP-B/16 at 512 px, pixel shuffle 4 (64 tokens per tile),
# SmolLM2 text model (Llama), untied lm_head; processor size.longest_edge 2048 (4 x 512), max_image_size 512.
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
SMOL_GENERATION = dict(bos_token_id=1, eos_token_id=[SMOLLM2.special["<end_of_utterance>"]], pad_token_id=2)
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
OV_GRID_PINPOINTS = [[h, w] for h in range(384, 2305, 384) for w in range(384, 2305, 384)]

def _smolvlm(source: str, **text) -> dict:
    return dict(
        family=FAMILIES["smolvlm"], source=source,
        sizes=dict(vision=SMOL_VISION, scale_factor=4, longest_edge=2048), text=dict(SMOL_TEXT_COMMON, **text),
        tokenizer=SMOLLM2, generation=SMOL_GENERATION,
        ref_pixels=(1, 2, 3, 512, 512), trace_pixels=(2, 2, 3, 512, 512),
    )


# family: FamilySpec; sizes: its processor / model-config sizes; text: text config; tokenizer: real ids;
# generation: generation_config.json; ref_pixels / trace_pixels: pixel_values shapes of the self-check reference
# (SmolVLM one image of 2 tiles, LLaVA-OneVision 3 crops) and of the export trace.
ARCHS = {
    "smolvlm-256m": _smolvlm("HuggingFaceTB/SmolVLM-256M-Instruct", hidden_size=576, intermediate_size=1536,
                             num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3),
    "smolvlm-500m": _smolvlm("HuggingFaceTB/SmolVLM-500M-Instruct", hidden_size=960, intermediate_size=2560,
                             num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5),
    "llava-onevision-0.5b": dict(
        family=FAMILIES["llava_onevision"], source="llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
        sizes=dict(vision=OV_VISION, pinpoints=OV_GRID_PINPOINTS, tie_word_embeddings=True),
        text=OV_TEXT, tokenizer=QWEN2,
        generation=dict(bos_token_id=151643, eos_token_id=[QWEN2.special["<|im_end|>"], QWEN2.special["<|endoftext|>"]],
                        pad_token_id=151643),
        ref_pixels=(3, 3, 384, 384), trace_pixels=(2, 3, 384, 384),
    ),
}
