"""SmolVLM = ``Idefics3ForConditionalGeneration``: SigLIP-style tiles + global view, pixel shuffle, Llama text model."""

from __future__ import annotations

import torch
from torch import nn
from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor, Idefics3VisionConfig
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

from ..onnx_parts import assert_close, pixel_shuffle
from ..signals import attention_probs
from .base import FamilySpec

# SmolVLM's real chat template (HuggingFaceTB/SmolVLM-*-Instruct, image part).
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
SMOLVLM_SPECIAL_TOKENS = (
    ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>", "<global-img>"]
    + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
)

# Tiny sizes: vision 32 wide, 2 layers, patch 8 on 64 px tiles, pixel shuffle 2 -> 16 tokens per tile; 3 tiles.
TINY_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=8,
    initializer_range=0.1,
)
TINY_SCALE_FACTOR = 2
TINY_LONGEST_EDGE = 3 * TINY_VISION["image_size"]


# ----------------------------------------------------------------------------------------------- ONNX wrappers
class Idefics3VisionEncoder(nn.Module):
    def __init__(self, model):
        super().__init__()
        m = model.model
        vc = model.config.vision_config
        self.embeddings = m.vision_model.embeddings
        self.encoder = m.vision_model.encoder
        self.post_layernorm = m.vision_model.post_layernorm
        self.projection = m.connector.modality_projection
        self.patch = vc.patch_size
        self.nps = vc.image_size // vc.patch_size  # patches per side of a full tile
        self.scale = model.config.scale_factor
        self.dim = vc.hidden_size
        # same float32 constant as Idefics3VisionEmbeddings builds
        self.register_buffer(
            "boundaries", torch.arange(1 / self.nps, 1.0, 1 / self.nps, dtype=torch.float32), persistent=False
        )

    def _positions(self, patch_mask: torch.Tensor) -> torch.Tensor:
        # Idefics3VisionEmbeddings.forward, with bucketize(x, b, right=True) == #(b <= x)
        n = patch_mask.shape[0]
        pm = patch_mask.to(torch.int64)
        nb_h = pm[:, :, 0].sum(dim=1)
        nb_w = pm[:, 0, :].sum(dim=1)
        step_h = 1.0 / nb_h
        step_w = 1.0 / nb_w
        h_idx = torch.arange(patch_mask.shape[1], dtype=torch.float32)
        w_idx = torch.arange(patch_mask.shape[2], dtype=torch.float32)
        fh = torch.clamp(h_idx[None, :] * step_h[:, None], max=(1.0 - 1e-6))
        fw = torch.clamp(w_idx[None, :] * step_w[:, None], max=(1.0 - 1e-6))
        bh = (fh[..., None] >= self.boundaries).to(torch.int64).sum(-1)
        bw = (fw[..., None] >= self.boundaries).to(torch.int64).sum(-1)
        pos = (bh[:, :, None] * self.nps + bw[:, None, :]).reshape(n, -1)
        return torch.where(patch_mask.reshape(n, -1), pos, torch.zeros_like(pos))

    def embed(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor):
        """The vision preamble: (patch + position embeddings [views, patches, D], additive attention bias)."""
        c, h, w = pixel_values.shape[2], pixel_values.shape[3], pixel_values.shape[4]
        pv = pixel_values.reshape(-1, c, h, w)
        p = self.patch
        hp, wp = h // p, w // p
        pm = pixel_attention_mask.reshape(-1, h, w)[:, : hp * p, : wp * p].to(torch.int32)
        patch_mask = pm.reshape(-1, hp, p, wp, p).sum(dim=(2, 4)) > 0  # == unfold(1,p,p).unfold(2,p,p).sum > 0

        x = self.embeddings.patch_embedding(pv).flatten(2).transpose(1, 2)
        x = x + self.embeddings.position_embedding(self._positions(patch_mask))
        keep = patch_mask.reshape(patch_mask.shape[0], 1, 1, -1)
        bias = torch.where(keep, torch.tensor(0.0), torch.tensor(torch.finfo(torch.float32).min))
        return x, bias

    def forward(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor) -> torch.Tensor:
        x, bias = self.embed(pixel_values, pixel_attention_mask)
        x = self.encoder(inputs_embeds=x, attention_mask=bias).last_hidden_state
        x = self.post_layernorm(x)
        # Idefics3Connector.pixel_shuffle for a full tile (seq = nps^2), batch left dynamic
        return self.projection(pixel_shuffle(x, self.nps, self.scale, self.dim))


class Idefics3VisionSignals(Idefics3VisionEncoder):
    def forward(self, pixel_values, pixel_attention_mask):
        x, bias = self.embed(pixel_values, pixel_attention_mask)
        layers = self.encoder.layers
        for layer in layers[:-1]:
            x = layer(x, bias)
        last_in = x
        x = layers[-1](x, bias)
        x = self.post_layernorm(x)
        n, s = self.nps, self.scale
        feats = self.projection(pixel_shuffle(x, n, s))
        probs, k = attention_probs(layers[-1], last_in, bias)
        received = probs.mean(dim=1).mean(dim=1)  # [v, patches]: over heads, then over queries
        received = pixel_shuffle(received[..., None], n, s).sum(-1)  # [v, tokens]
        keys = pixel_shuffle(k.mean(dim=1), n, s)  # [v, tokens, s*s*head_dim]
        return feats, received, keys


# ---------------------------------------------------------------------------------------------------------- spec
class SmolVLM(FamilySpec):
    name = "smolvlm"
    family = "idefics3"
    chat_template = SMOLVLM_CHAT_TEMPLATE
    special_tokens = SMOLVLM_SPECIAL_TOKENS
    tokenizer_vocab = 512
    tokenizer_kwargs = dict(
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=[t for t in SMOLVLM_SPECIAL_TOKENS if t not in ("<|endoftext|>", "<|im_start|>")],
    )
    text_tokens = ("<|im_start|>", "<end_of_utterance>", "<|endoftext|>")
    tiny_sizes = dict(vision=TINY_VISION, scale_factor=TINY_SCALE_FACTOR, longest_edge=TINY_LONGEST_EDGE)
    vision_inputs = ("pixel_values", "pixel_attention_mask")
    # H and W stay fixed at the tile size (the pixel shuffle is built for full tiles)
    vision_input_axes = {"pixel_values": {0: "batch_size", 1: "num_images"},
                         "pixel_attention_mask": {0: "batch_size", 1: "num_images"}}
    vision_batch_axis = "batch_num_images"
    signals = ("attention_received", "keys")

    # -------------------------------------------------------------------------------------------- builders
    def model_class(self):
        return Idefics3ForConditionalGeneration

    def image_processor(self, tile: int, longest_edge: int):
        return Idefics3ImageProcessorPil(
            do_resize=True,
            size={"longest_edge": longest_edge},
            max_image_size={"longest_edge": tile},
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

    def processor(self, tok, sizes):
        vision = sizes["vision"]
        tile = vision["image_size"]
        seq = (tile // vision["patch_size"]) ** 2 // sizes["scale_factor"] ** 2
        ip = self.image_processor(tile, sizes["longest_edge"])
        return Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=seq,
                                 chat_template=self.chat_template), seq

    def model_config(self, text_config, image_token_id, tok, sizes):
        return Idefics3Config(
            vision_config=Idefics3VisionConfig(**sizes["vision"]),
            text_config=text_config,
            scale_factor=sizes["scale_factor"],
            image_token_id=image_token_id,
            tie_word_embeddings=False,
            pad_token_id=text_config.pad_token_id,
        )

    def saved_image_seq_len(self, processor, config):
        return processor.image_seq_len

    # ------------------------------------------------------------------------------------- model structure
    def vision_tower(self, model):
        return model.model.vision_model

    def connector(self, model):
        return model.model.connector

    def text_model(self, model):
        return model.model.text_model

    def vision_hidden(self, model, pv):
        out = model.model.vision_model(pixel_values=pv, patch_attention_mask=None, return_dict=True)
        return out.last_hidden_state, None

    def project(self, model, hid):
        return model.model.connector(hid)  # [N, tokens, text_hidden]

    def token_merge(self, config):
        return config.scale_factor

    def center_connector(self, model, hid):
        # the connector has no bias: remove the mean input direction from the weight
        c = model.model.connector
        x = c.pixel_shuffle(hid, c.scale_factor).reshape(-1, hid.shape[-1] * c.scale_factor**2)
        mu = x.mean(0)
        w = c.modality_projection.proj.weight  # [out, in]
        w -= torch.outer(w @ mu, mu) / mu.dot(mu)

    # -------------------------------------------------------------------------------------- image features
    def image_features(self, model, inputs):
        feats = model.model.get_image_features(inputs["pixel_values"], inputs["pixel_attention_mask"]).pooler_output
        return torch.cat(list(feats), dim=0)

    def view_features(self, model, inputs):
        feats = model.model.get_image_features(inputs["pixel_values"], inputs["pixel_attention_mask"]).pooler_output
        return torch.cat(list(feats), dim=0).reshape(inputs["pixel_values"].shape[:2].numel(), -1,
                                                     feats[0].shape[-1])

    def layout(self, processor, image):
        info = processor.image_processor(images=[[image]], return_row_col_info=True)
        return {"rows": int(info["rows"][0][0]), "cols": int(info["cols"][0][0])}

    # ---------------------------------------------------------------------------------- vision_encoder.onnx
    def vision_wrapper(self, model):
        return Idefics3VisionEncoder(model)

    def signals_wrapper(self, model):
        return Idefics3VisionSignals(model)

    def vision_args(self, sample):
        return sample["pixel_values"], sample["pixel_attention_mask"].to(torch.bool)  # [1, n, 3, H, W], [1, n, H, W]

    def vision_trace_args(self, sample):
        # batch 2 and 3 tiles, so that both axes stay symbolic
        pv, pam = self.vision_args(sample)
        return torch.cat([pv[:, :3], pv[:, 1:4]], dim=0), torch.cat([pam[:, :3], pam[:, 1:4]], dim=0)

    def check_vision_wrapper(self, model, vision, sample):
        pv, pam = self.vision_args(sample)
        ref = self.image_features(model, {"pixel_values": pv, "pixel_attention_mask": pam})
        got = vision(pv, pam)
        assert_close("idefics3 vision vs get_image_features", got.reshape(-1, got.shape[-1]), ref)

    @torch.no_grad()
    def reference_signals(self, model, sample):
        pv = sample["pixel_values"]
        b, n_img = pv.shape[:2]
        vm = model.model.vision_model
        out = vm(pixel_values=pv.reshape(b * n_img, *pv.shape[2:]), output_attentions=True, output_hidden_states=True,
                 return_dict=True)
        att = out.attentions[-1]  # [v, h, P, P]
        vc = model.config.vision_config
        n, s = vc.image_size // vc.patch_size, model.config.scale_factor
        rec = att.mean(1).mean(1)
        rec = rec.reshape(-1, n // s, s, n // s, s).sum((2, 4)).reshape(rec.shape[0], -1)  # 2x2 blocks, raster
        layer = vm.encoder.layers[-1]
        k = layer.self_attn.k_proj(layer.layer_norm1(out.hidden_states[-2]))
        k = k.reshape(k.shape[0], k.shape[1], layer.self_attn.num_heads, -1).mean(2)
        keys = pixel_shuffle(k, n, s)
        return {"glimpse_attention_received": rec.numpy(), "glimpse_keys": keys.numpy()}


SMOLVLM = SmolVLM()
