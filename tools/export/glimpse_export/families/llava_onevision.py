"""LLaVA-OneVision = ``LlavaOnevisionForConditionalGeneration``: SigLIP (no CLS) on the base image + anyres crops,
gelu projector, Qwen2 text model; the crop features are packed (unpad, anyres_max downsampling, image_newline)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from transformers import (
    AutoTokenizer,
    BatchFeature,
    GenerationConfig,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

from ..onnx_parts import assert_close
from .llava import LlavaVisionEncoder, Llava

# llava-hf/llava-onevision-qwen2-*-ov-hf chat template (the {% generation %} tags dropped, as for LLaVA-1.5)
OV_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\\n' + content['text'] }}"
    "{% endfor %}{{'<|im_end|>'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Qwen2 / LLaVA-OneVision: no BOS; <|im_end|> ends a turn.
ONEVISION_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
OV_ASPECT = "anyres_max_9"

# Tiny sizes: SigLIP (no CLS) at 32 px with patch 8 -> 16 tokens per crop; anyres grid pinpoints up to 4 x 4 crops,
# so a 256 px picture takes the anyres_max_9 downsampling path (16 x 16 -> 12 x 12 tokens).
TINY_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
    hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=False,
)
TINY_PINPOINTS = [[32 * h, 32 * w] for h in range(1, 5) for w in range(1, 5)]


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

    def _get_number_of_features(self, *a):
        return LlavaOnevisionProcessor._get_number_of_features(self, *a)

    def _get_unpadded_features(self, *a):
        return LlavaOnevisionProcessor._get_unpadded_features(self, *a)

    def replace_image_token(self, image_inputs, image_idx):
        return LlavaOnevisionProcessor.replace_image_token(self, image_inputs, image_idx)

    def apply_chat_template(self, messages, add_generation_prompt=True):
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  tokenize=False, chat_template=self.chat_template)

    def __call__(self, images, text, return_tensors="pt"):
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
        cfg = json.loads((Path(folder) / "processor_config.json").read_text(encoding="utf-8"))
        tok = AutoTokenizer.from_pretrained(folder)
        tok.image_token, tok.video_token = "<image>", "<video>"
        ip = LlavaOnevisionImageProcessorPil(**{k: v for k, v in cfg["image_processor"].items()
                                                if k not in ("image_processor_type",)})
        template = (Path(folder) / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(ip, tok, cfg["num_image_tokens"], cfg["vision_aspect_ratio"], template)


class OnevisionVisionEncoder(LlavaVisionEncoder):
    """LLaVA-OneVision: every crop (base image first, then the anyres crops) through SigLIP + projector, unpacked,
    plus the learned ``image_newline`` vector. Packing (unpad, anyres_max downsampling, one newline row per grid
    row) depends on the image size and is done by the runtime, as transformers' ``pack_image_features`` does."""

    def __init__(self, model):
        super().__init__(model)
        self.image_newline = model.model.image_newline

    def forward(self, pixel_values: torch.Tensor):
        feats = super().forward(pixel_values)
        return feats, self.image_newline


class LlavaOnevision(Llava):
    name = "llava_onevision"
    family = "llava_onevision"
    aliases = ("onevision",)
    chat_template = OV_CHAT_TEMPLATE
    special_tokens = ONEVISION_SPECIAL_TOKENS
    bos_prefix = None
    tokenizer_kwargs = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>",
                            additional_special_tokens=["<|im_start|>", "<|im_end|>", "<image>", "<video>"])
    tokenizer_attrs = {"image_token": "<image>", "video_token": "<video>"}
    text_tokens = (None, "<|im_end|>", "<|endoftext|>")
    text_config_extra = dict(use_sliding_window=False)
    has_cls = False
    packs_features = True
    # a 256 px picture: 4 x 4 crops, which takes the anyres_max_9 downsampling path (the testbed scene committed
    # under models/images; copied when exporting elsewhere)
    tiny_extra_images = ("scene",)
    tiny_sizes = dict(vision=TINY_VISION, pinpoints=TINY_PINPOINTS, tie_word_embeddings=False)
    vision_outputs = ("image_features", "image_newline")
    vision_input_axes = {"pixel_values": {0: "num_patches"}}
    vision_batch_axis = "num_patches"
    signals = ()

    # -------------------------------------------------------------------------------------------- builders
    def model_class(self):
        return LlavaOnevisionForConditionalGeneration

    def text_config_class(self):
        return Qwen2Config

    def image_processor(self, px: int, pinpoints: list):
        return LlavaOnevisionImageProcessorPil(
            do_resize=True, size={"height": px, "width": px}, image_grid_pinpoints=pinpoints, resample=3,
            do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5], do_pad=True, do_convert_rgb=True,
        )

    def processor(self, tok, sizes):
        vision = sizes["vision"]
        px = vision["image_size"]
        n_img = (px // vision["patch_size"]) ** 2
        ip = self.image_processor(px, sizes["pinpoints"])
        return OnevisionProcessor(ip, tok, n_img, OV_ASPECT, self.chat_template), n_img

    def model_config(self, text_config, image_token_id, tok, sizes):
        return LlavaOnevisionConfig(
            vision_config=SiglipVisionConfig(**sizes["vision"]), text_config=text_config,
            image_token_index=image_token_id, video_token_index=tok.convert_tokens_to_ids("<video>"),
            projector_hidden_act="gelu", vision_feature_select_strategy="full", vision_feature_layer=-1,
            vision_aspect_ratio=OV_ASPECT, image_grid_pinpoints=sizes["pinpoints"],
            tie_word_embeddings=sizes["tie_word_embeddings"], multimodal_projector_bias=True,
        )

    def generation_config(self, text_config, eos):
        return GenerationConfig(eos_token_id=eos, pad_token_id=text_config.pad_token_id)

    def load_processor(self, folder):
        return OnevisionProcessor.from_pretrained(str(folder))

    def saved_image_seq_len(self, processor, config):
        return processor.num_image_tokens

    # ------------------------------------------------------------------------------------- model structure
    def project(self, model, hid):
        return model.model.multi_modal_projector(hid)  # strategy "full": no CLS to drop

    def patch_states(self, hid):
        return hid

    def center_connector(self, model, hid):
        proj = model.model.multi_modal_projector
        out = proj(hid).reshape(-1, proj.linear_2.out_features)
        proj.linear_2.bias -= out.mean(0)

    # -------------------------------------------------------------------------------------- image features
    def image_features(self, model, inputs):
        feats = model.model.get_image_features(
            pixel_values=inputs["pixel_values"],
            image_sizes=inputs["image_sizes"],
            vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
            vision_aspect_ratio=model.config.vision_aspect_ratio,
            batch_num_images=inputs["batch_num_images"],
        ).pooler_output
        return torch.cat(list(feats), dim=0)

    def encoder_pixels(self, pixel_values):
        return pixel_values[0]  # the encoder takes the crops as its batch: [crops, 3, H, W]

    def packer(self, model, image_sizes):
        """transformers' ``pack_image_features`` applied to the ONNX encoder's crop features and newline vector."""

        def pack(feats: np.ndarray, newline: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                packed, _ = model.model.pack_image_features(
                    [torch.from_numpy(feats)], image_sizes, image_newline=torch.from_numpy(newline),
                    vision_aspect_ratio=model.config.vision_aspect_ratio)
            return packed[0].numpy()

        return pack

    # ---------------------------------------------------------------------------------- vision_encoder.onnx
    def vision_wrapper(self, model):
        return OnevisionVisionEncoder(model)

    def signals_wrapper(self, model):
        raise NotImplementedError("llava_onevision: no pruning-signal outputs")

    def vision_args(self, sample):
        return (sample["pixel_values"][0],)  # [1, crops, 3, H, W] -> [crops, 3, H, W]

    def vision_trace_args(self, sample):
        return (sample["pixel_values"][0, :2],)

    def check_vision_wrapper(self, model, vision, sample):
        ref = model.model.get_image_features(
            pixel_values=sample["pixel_values"], image_sizes=sample["image_sizes"],
            vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
            vision_aspect_ratio=model.config.vision_aspect_ratio, batch_num_images=sample["batch_num_images"],
        ).pooler_output[0]
        feats, newline = vision(sample["pixel_values"][0])
        packed, _ = model.model.pack_image_features([feats], sample["image_sizes"], image_newline=newline,
                                                    vision_aspect_ratio=model.config.vision_aspect_ratio)
        assert_close("llava_onevision vision + pack vs get_image_features", packed[0], ref)

    def reference_signals(self, model, sample):
        raise NotImplementedError("llava_onevision: no pruning-signal outputs")


LLAVA_ONEVISION = LlavaOnevision()
