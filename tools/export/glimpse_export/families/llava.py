"""LLaVA-1.5 = ``LlavaForConditionalGeneration``: CLIP vision tower (CLS dropped, feature layer -2), gelu MLP
projector, Llama text model."""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from ..common import ExportError
from ..onnx_parts import assert_close
from ..signals import CLS_LAYERS, attention_probs
from .base import FamilySpec

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
LLAVA_SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<image>"]

# Tiny sizes: CLIP vision 32 wide, 3 layers, patch 8 at 32 px -> 16 patches + CLS.
TINY_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32, patch_size=8,
    projection_dim=32, initializer_range=0.1,
)


# ----------------------------------------------------------------------------------------------- ONNX wrappers
class LlavaVisionEncoder(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.tower = model.model.vision_tower
        self.projector = model.model.multi_modal_projector
        self.layer = model.config.vision_feature_layer
        self.strategy = model.config.vision_feature_select_strategy
        if not isinstance(self.layer, int):
            raise ExportError("only a single vision_feature_layer is supported")

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.tower(pixel_values, output_hidden_states=True, return_dict=True)
        feats = out.hidden_states[self.layer]
        if self.strategy == "default":
            feats = feats[:, 1:]  # drop CLS
        return self.projector(feats)


class LlavaVisionSignals(LlavaVisionEncoder):
    def forward(self, pixel_values):
        out = self.tower(pixel_values, output_hidden_states=True, return_dict=True)
        hs = out.hidden_states
        feats = hs[self.layer]
        n_layers = len(hs) - 1
        feat_layer = self.layer % (n_layers + 1)  # hidden_states index = output of layer feat_layer - 1
        last = feat_layer - 1  # 0-based index of the layer that produces the features
        layers = self.tower.encoder.layers
        cls_rows = []
        for li in range(last - CLS_LAYERS + 1, last + 1):
            probs, k = attention_probs(layers[li], hs[li], None)
            cls_rows.append(probs[:, :, 0, 1:].mean(dim=1))
            if li == last:
                received = probs.mean(dim=1).mean(dim=1)[:, 1:]
                keys = k.mean(dim=1)[:, 1:]
        if self.strategy == "default":
            feats = feats[:, 1:]
        return self.projector(feats), torch.stack(cls_rows, dim=1), received, keys


# ---------------------------------------------------------------------------------------------------------- spec
class Llava(FamilySpec):
    name = "llava"
    family = "llava"
    chat_template = LLAVA_CHAT_TEMPLATE
    special_tokens = LLAVA_SPECIAL_TOKENS
    tokenizer_vocab = 480
    bos_prefix = "<s>"  # Llama style (LLaVA-1.5): the tokenizer prepends <s>
    tokenizer_kwargs = dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>", additional_special_tokens=["<image>"])
    tokenizer_attrs = {"image_token": "<image>"}
    text_tokens = ("<s>", "</s>", "<pad>")
    has_cls = True
    tiny_sizes = dict(vision=TINY_VISION)
    vision_input_axes = {"pixel_values": {0: "batch_size"}}
    vision_batch_axis = "batch_size"
    signals = ("cls_attention", "attention_received", "keys")

    # -------------------------------------------------------------------------------------------- builders
    def model_class(self):
        return LlavaForConditionalGeneration

    def image_processor(self, px: int):
        return CLIPImageProcessorPil(
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

    def processor(self, tok, sizes):
        vision = sizes["vision"]
        px, patch = vision["image_size"], vision["patch_size"]
        proc = LlavaProcessor(
            image_processor=self.image_processor(px), tokenizer=tok, patch_size=patch,
            vision_feature_select_strategy="default", num_additional_image_tokens=1,
            chat_template=self.chat_template,
        )
        return proc, (px // patch) ** 2

    def model_config(self, text_config, image_token_id, tok, sizes):
        vision = sizes["vision"]
        return LlavaConfig(
            vision_config=CLIPVisionConfig(**vision),
            text_config=text_config,
            image_token_index=image_token_id,
            image_seq_length=(vision["image_size"] // vision["patch_size"]) ** 2,
            projector_hidden_act="gelu",
            vision_feature_select_strategy="default",
            vision_feature_layer=-2,
            tie_word_embeddings=False,
        )

    def saved_image_seq_len(self, processor, config):
        return config["image_seq_length"]

    # ------------------------------------------------------------------------------------- model structure
    def vision_tower(self, model):
        return model.model.vision_tower

    def connector(self, model):
        return model.model.multi_modal_projector

    def text_model(self, model):
        return model.model.language_model

    def vision_hidden(self, model, pv):
        out = model.model.vision_tower(pv, output_hidden_states=True, return_dict=True)
        return out.hidden_states[model.config.vision_feature_layer], out.pooler_output

    def project(self, model, hid):
        return model.model.multi_modal_projector(hid[:, 1:])

    def patch_states(self, hid):
        return hid[:, 1:]

    def center_connector(self, model, hid):
        # subtract the mean output from the projector's last bias
        proj = model.model.multi_modal_projector
        out = proj(hid[:, 1:]).reshape(-1, proj.linear_2.out_features)
        proj.linear_2.bias -= out.mean(0)

    # -------------------------------------------------------------------------------------- image features
    def image_features(self, model, inputs):
        feats = model.model.get_image_features(
            pixel_values=inputs["pixel_values"],
            vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        ).pooler_output
        return torch.cat(list(feats), dim=0)

    def view_features(self, model, inputs):
        return self.project(model, self.vision_hidden(model, inputs["pixel_values"])[0])

    # ---------------------------------------------------------------------------------- vision_encoder.onnx
    def vision_wrapper(self, model):
        return LlavaVisionEncoder(model)

    def signals_wrapper(self, model):
        return LlavaVisionSignals(model)

    def vision_trace_args(self, sample):
        pv = sample["pixel_values"]  # [1, 3, H, W]; batch 2 so that the axis stays symbolic
        return (torch.cat([pv, pv.flip(-1)], dim=0),)

    def check_vision_wrapper(self, model, vision, sample):
        ref = self.image_features(model, sample)
        got = vision(sample["pixel_values"])
        assert_close("llava vision vs get_image_features", got.reshape(-1, got.shape[-1]), ref)

    @torch.no_grad()
    def reference_signals(self, model, sample):
        pv = sample["pixel_values"]
        tower = model.model.vision_tower
        out = tower(pv, output_attentions=True, output_hidden_states=True, return_dict=True)
        L = len(out.attentions)
        feat_idx = model.config.vision_feature_layer % (L + 1)
        last = feat_idx - 1
        cls = torch.stack([out.attentions[li][:, :, 0, 1:].mean(1) for li in range(last - CLS_LAYERS + 1, last + 1)],
                          1)
        rec = out.attentions[last].mean(1).mean(1)[:, 1:]
        layer = tower.encoder.layers[last]
        k = layer.self_attn.k_proj(layer.layer_norm1(out.hidden_states[last]))
        keys = k.reshape(k.shape[0], k.shape[1], layer.self_attn.num_heads, -1).mean(2)[:, 1:]
        return {"glimpse_cls_attention": cls.numpy(), "glimpse_attention_received": rec.numpy(),
                "glimpse_keys": keys.numpy()}


LLAVA = Llava()
