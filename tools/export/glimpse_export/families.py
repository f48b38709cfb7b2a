"""Tiny random-weight model definitions for the two families (real transformers architectures, tiny sizes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .common import seed_everything
from .tokenizer import train_tokenizer, wrap_tokenizer

FAMILIES = {"smolvlm": "idefics3", "llava": "llava", "idefics3": "idefics3"}

# SmolVLM's real chat template (HuggingFaceTB/SmolVLM-*-Instruct, image part).
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# LLaVA-1.5 style (llava-hf/llava-1.5-*-hf template without the {% generation %} tag):
# "USER: <image>\n{text} ASSISTANT:"; <s> comes from the tokenizer's post-processor.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}{% endfor %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Tiny sizes. Text model is the same Llama for both families.
TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    initializer_range=0.1,  # larger than the usual 0.02: clear argmax margins for greedy decoding
    tie_word_embeddings=False,
)
SMOL_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=8,
    initializer_range=0.1,
)
SMOL_SCALE_FACTOR = 2
SMOL_TILE = 64
SMOL_LONGEST_EDGE = 3 * SMOL_TILE
CLIP_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32, patch_size=8,
    projection_dim=32, initializer_range=0.1,
)


@dataclass
class Bundle:
    family: str  # "idefics3" | "llava"
    seed: int
    model: Any
    processor: Any
    tokenizer: Any
    chat_template: str
    image_token_id: int
    eos_token_ids: list[int]
    extra: dict = field(default_factory=dict)

    @property
    def text_config(self):
        return self.model.config.text_config


def canonical_family(name: str) -> str:
    try:
        return FAMILIES[name]
    except KeyError:
        raise SystemExit(f"unknown family {name!r} (expected smolvlm or llava)")


def build(family: str, seed: int) -> Bundle:
    family = canonical_family(family)
    if family == "idefics3":
        return _build_idefics3(seed)
    return _build_llava(seed)


def _text_config(tok, bos: str, eos: str, pad: str):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok),
        bos_token_id=tok.convert_tokens_to_ids(bos),
        eos_token_id=tok.convert_tokens_to_ids(eos),
        pad_token_id=tok.convert_tokens_to_ids(pad),
        **TEXT,
    )


def _finish_model(model, seed: int):
    model.eval()
    model.set_attn_implementation("eager")
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _build_idefics3(seed: int) -> Bundle:
    from transformers import (
        GenerationConfig,
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3Processor,
        Idefics3VisionConfig,
    )
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tok = wrap_tokenizer("idefics3", train_tokenizer("idefics3"), SMOLVLM_CHAT_TEMPLATE)
    image_token_id = tok.convert_tokens_to_ids("<image>")
    eos = tok.convert_tokens_to_ids("<end_of_utterance>")

    image_processor = Idefics3ImageProcessorPil(
        do_resize=True,
        size={"longest_edge": SMOL_LONGEST_EDGE},
        max_image_size={"longest_edge": SMOL_TILE},
        do_image_splitting=True,
        resample=1,  # PIL LANCZOS, SmolVLM's value
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_pad=True,
        do_convert_rgb=True,
    )
    image_seq_len = (SMOL_TILE // SMOL_VISION["patch_size"]) ** 2 // SMOL_SCALE_FACTOR**2
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tok, image_seq_len=image_seq_len,
        chat_template=SMOLVLM_CHAT_TEMPLATE,
    )
    config = Idefics3Config(
        vision_config=Idefics3VisionConfig(**SMOL_VISION),
        text_config=_text_config(tok, "<|im_start|>", "<end_of_utterance>", "<|endoftext|>"),
        scale_factor=SMOL_SCALE_FACTOR,
        image_token_id=image_token_id,
        tie_word_embeddings=False,
        pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
    )
    seed_everything(seed)
    model = _finish_model(Idefics3ForConditionalGeneration(config), seed)
    model.generation_config = GenerationConfig(
        bos_token_id=config.text_config.bos_token_id,
        eos_token_id=[eos],
        pad_token_id=config.text_config.pad_token_id,
    )
    return Bundle("idefics3", seed, model, processor, tok, SMOLVLM_CHAT_TEMPLATE, image_token_id, [eos],
                  extra=dict(image_seq_len=image_seq_len))


def _build_llava(seed: int) -> Bundle:
    from transformers import (
        CLIPVisionConfig,
        GenerationConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = wrap_tokenizer("llava", train_tokenizer("llava"), LLAVA_CHAT_TEMPLATE)
    image_token_id = tok.convert_tokens_to_ids("<image>")
    eos = tok.convert_tokens_to_ids("</s>")
    px = CLIP_VISION["image_size"]
    image_processor = CLIPImageProcessorPil(
        do_resize=True,
        size={"shortest_edge": px},
        resample=3,  # PIL BICUBIC
        do_center_crop=True,
        crop_size={"height": px, "width": px},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        do_convert_rgb=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=CLIP_VISION["patch_size"],
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    n_img = (px // CLIP_VISION["patch_size"]) ** 2
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**CLIP_VISION),
        text_config=_text_config(tok, "<s>", "</s>", "<pad>"),
        image_token_index=image_token_id,
        image_seq_length=n_img,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        tie_word_embeddings=False,
    )
    seed_everything(seed)
    model = _finish_model(LlavaForConditionalGeneration(config), seed)
    model.generation_config = GenerationConfig(
        bos_token_id=config.text_config.bos_token_id,
        eos_token_id=[eos],
        pad_token_id=config.text_config.pad_token_id,
    )
    return Bundle("llava", seed, model, processor, tok, LLAVA_CHAT_TEMPLATE, image_token_id, [eos],
                  extra=dict(image_seq_len=n_img))
