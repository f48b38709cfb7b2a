"""Tiny random-weight model definitions for the two families (real transformers architectures, tiny sizes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .common import seed_everything
from .tokenizer import train_tokenizer, wrap_tokenizer

FAMILIES = {"smolvlm": "idefics3", "llava": "llava", "idefics3": "idefics3", "llava_onevision": "llava_onevision",
            "onevision": "llava_onevision"}

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

# llava-hf/llava-onevision-qwen2-*-ov-hf chat template (the {% generation %} tags dropped, as for LLaVA-1.5)
OV_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\\n' + content['text'] }}"
    "{% endfor %}{{'<|im_end|>'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
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
# LLaVA-OneVision, tiny: SigLIP (no CLS) at 32 px with patch 8 -> 16 tokens per crop; anyres grid pinpoints up to
# 4 x 4 crops, so a 256 px picture takes the anyres_max_9 downsampling path (16 x 16 -> 12 x 12 tokens).
OV_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
    hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=False,
)
OV_PINPOINTS = [[32 * h, 32 * w] for h in range(1, 5) for w in range(1, 5)]
OV_ASPECT = "anyres_max_9"
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
        raise SystemExit(f"unknown family {name!r} (expected smolvlm, llava or llava_onevision)")


def build(family: str, seed: int) -> Bundle:
    family = canonical_family(family)
    if family == "idefics3":
        return _build_idefics3(seed)
    if family == "llava_onevision":
        return _build_llava_onevision(seed)
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


class OnevisionProcessor:
    """``LlavaOnevisionProcessor`` for images, built without its video processor (which needs torchvision, absent
    here): the image processor, the tokenizer and transformers' own token-count methods, borrowed unchanged."""

    def __init__(self, image_processor, tokenizer, num_image_tokens: int, vision_aspect_ratio: str,
                 chat_template: str):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.num_image_tokens = num_image_tokens
        self.vision_aspect_ratio = vision_aspect_ratio
        self.vision_feature_select_strategy = "full"
        self.image_token = "<image>"
        self.chat_template = chat_template

    @staticmethod
    def _methods():
        from transformers import LlavaOnevisionProcessor as P

        return P

    def _get_number_of_features(self, *a):
        return self._methods()._get_number_of_features(self, *a)

    def _get_unpadded_features(self, *a):
        return self._methods()._get_unpadded_features(self, *a)

    def replace_image_token(self, image_inputs, image_idx):
        return self._methods().replace_image_token(self, image_inputs, image_idx)

    def apply_chat_template(self, messages, add_generation_prompt=True):
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  tokenize=False, chat_template=self.chat_template)

    def __call__(self, images, text, return_tensors="pt"):
        from transformers import BatchFeature

        image_inputs = self.image_processor(images, return_tensors=return_tensors)
        prompts, idx = [], 0
        for t in text:
            pieces = t.split(self.image_token)
            out = pieces[0]
            for piece in pieces[1:]:
                out += self.replace_image_token(image_inputs, idx) + piece
                idx += 1
            prompts.append(out)
        enc = self.tokenizer(prompts, return_tensors=return_tensors)
        return BatchFeature(data={**enc, **image_inputs})

    def save_pretrained(self, out: str) -> None:
        import json
        from pathlib import Path

        self.tokenizer.save_pretrained(out)
        ip = json.loads(self.image_processor.to_json_string())
        ip.pop("processor_class", None)
        cfg = {
            "image_processor": ip,
            "image_token": self.image_token,
            "num_image_tokens": self.num_image_tokens,
            "processor_class": "LlavaOnevisionProcessor",
            "video_token": "<video>",
            "vision_aspect_ratio": self.vision_aspect_ratio,
            "vision_feature_select_strategy": self.vision_feature_select_strategy,
        }
        (Path(out) / "processor_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n",
                                                         encoding="utf-8")
        (Path(out) / "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")

    @classmethod
    def from_pretrained(cls, folder: str) -> "OnevisionProcessor":
        import json
        from pathlib import Path

        from transformers import AutoTokenizer
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil,
        )

        cfg = json.loads((Path(folder) / "processor_config.json").read_text(encoding="utf-8"))
        tok = AutoTokenizer.from_pretrained(folder)
        tok.image_token, tok.video_token = "<image>", "<video>"
        ip = LlavaOnevisionImageProcessorPil(**{k: v for k, v in cfg["image_processor"].items()
                                                if k not in ("image_processor_type",)})
        template = (Path(folder) / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(ip, tok, cfg["num_image_tokens"], cfg["vision_aspect_ratio"], template)


def _build_llava_onevision(seed: int) -> Bundle:
    from transformers import (
        GenerationConfig,
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    tok = wrap_tokenizer("llava_onevision", train_tokenizer("llava_onevision"), OV_CHAT_TEMPLATE)
    image_token_id = tok.convert_tokens_to_ids("<image>")
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    px = OV_VISION["image_size"]
    image_processor = LlavaOnevisionImageProcessorPil(
        do_resize=True, size={"height": px, "width": px}, image_grid_pinpoints=OV_PINPOINTS, resample=3,
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5], do_pad=True, do_convert_rgb=True,
    )
    n_img = (px // OV_VISION["patch_size"]) ** 2
    processor = OnevisionProcessor(image_processor, tok, n_img, OV_ASPECT, OV_CHAT_TEMPLATE)
    text = Qwen2Config(
        vocab_size=len(tok), bos_token_id=None, eos_token_id=eos, pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        use_sliding_window=False, **TEXT,
    )
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**OV_VISION), text_config=text, image_token_index=image_token_id,
        video_token_index=tok.convert_tokens_to_ids("<video>"), projector_hidden_act="gelu",
        vision_feature_select_strategy="full", vision_feature_layer=-1, vision_aspect_ratio=OV_ASPECT,
        image_grid_pinpoints=OV_PINPOINTS, tie_word_embeddings=False, multimodal_projector_bias=True,
    )
    seed_everything(seed)
    model = _finish_model(LlavaOnevisionForConditionalGeneration(config), seed)
    model.generation_config = GenerationConfig(eos_token_id=[eos], pad_token_id=text.pad_token_id)
    return Bundle("llava_onevision", seed, model, processor, tok, OV_CHAT_TEMPLATE, image_token_id, [eos],
                  extra=dict(image_seq_len=n_img))
