"""The three onnx-community parts as small ``nn.Module`` wrappers, and their export.

Parts (inputs -> outputs):
  vision_encoder.onnx         idefics3: pixel_values f32 [batch, n_tiles, 3, H, W], pixel_attention_mask bool
                              [batch, n_tiles, H, W] -> image_features f32 [batch*n_tiles, tokens_per_tile, hidden]
                              llava: pixel_values f32 [batch, 3, H, W] -> image_features f32 [batch, n_patches, hidden]
                              llava_onevision: pixel_values f32 [crops, 3, H, W] -> image_features f32
                              [crops, tokens_per_crop, hidden] (unpacked), image_newline f32 [hidden]
  embed_tokens.onnx           input_ids i64 [batch, seq] -> inputs_embeds f32 [batch, seq, hidden]
  decoder_model_merged.onnx   inputs_embeds, attention_mask i64 [batch, total_seq], position_ids i64 [batch, seq],
                              past_key_values.{i}.key/.value f32 [batch, kv_heads, past_seq, head_dim]
                              -> logits f32 [batch, seq, vocab], present.{i}.key/.value [batch, kv_heads, total_seq, head_dim]

Exporter: TorchScript-based ``torch.onnx.export(..., dynamo=False)`` with ``dynamic_axes``, opset 18. The wrappers
avoid the constructs that the tracer would freeze or cannot express:
  * Idefics3 vision: ``Tensor.unfold`` (patch mask) -> reshape + sum; ``torch.bucketize`` (position ids) ->
    comparison count; pixel shuffle with ``-1`` for the tile batch. Padding tiles (all-zero pixel_values) are NOT
    removed inside the graph: feed only real tiles (the processor only pads when batching images with different
    tile counts).
  * decoder: the 4-D additive attention mask (causal + padding, finfo.min, exactly what transformers' eager
    attention adds) is built in the wrapper from ``attention_mask`` and passed through, so the graph never depends
    on traced Python ints.
Every wrapper is checked against the transformers module it replaces before export.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch
from torch import nn

from .common import OPSET, ExportError, log


# ----------------------------------------------------------------------------------------------------------- vision
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

    def forward(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor) -> torch.Tensor:
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
        x = self.encoder(inputs_embeds=x, attention_mask=bias).last_hidden_state
        x = self.post_layernorm(x)

        # Idefics3Connector.pixel_shuffle for a full tile (seq = nps^2), batch left dynamic
        s, d, n = self.scale, self.dim, self.nps
        x = x.reshape(-1, n, n, d)
        x = x.reshape(-1, n, n // s, d * s)
        x = x.permute(0, 2, 1, 3)
        x = x.reshape(-1, n // s, n // s, d * s * s)
        x = x.permute(0, 2, 1, 3)
        x = x.reshape(-1, (n * n) // (s * s), d * s * s)
        return self.projection(x)


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


# ------------------------------------------------------------------------------------------------- embed / decoder
class EmbedTokens(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.embed = model.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)


class Decoder(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.text = model.model.get_decoder() if hasattr(model.model, "get_decoder") else model.get_decoder()
        self.lm_head = model.lm_head
        self.num_layers = model.config.text_config.num_hidden_layers

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        seq = inputs_embeds.shape[1]
        total = attention_mask.shape[1]
        past_len = total - seq
        # causal (query i sits at absolute position past_len + i) AND padding
        q_pos = torch.arange(seq)[:, None] + past_len
        k_pos = torch.arange(total)[None, :]
        allowed = (k_pos <= q_pos)[None, None, :, :] & attention_mask.to(torch.bool)[:, None, None, :]
        bias = torch.where(allowed, torch.tensor(0.0), torch.tensor(torch.finfo(torch.float32).min))

        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)])
        out = self.text(
            inputs_embeds=inputs_embeds, attention_mask=bias, position_ids=position_ids, cache=cache, use_cache=True
        )
        logits = self.lm_head(out.last_hidden_state)
        presents = []
        for layer in cache.layers:
            presents += [layer.keys, layer.values]
        return (logits, *presents)


def kv_shape(model) -> tuple[int, int, int]:
    tc = model.config.text_config
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    return tc.num_hidden_layers, tc.num_key_value_heads, head_dim


# ----------------------------------------------------------------------------------------------------------- export
def name_outputs(m, output_names) -> bool:
    """Gives every graph output its declared name. A constant output (LLaVA-OneVision's ``image_newline``) is folded
    into an initializer that keeps the tracer's name; an Identity node restores the declared one. True if changed."""
    import onnx

    changed = False
    for out, name in zip(m.graph.output, output_names):
        if out.name != name:
            m.graph.node.append(onnx.helper.make_node("Identity", [out.name], [name], name=f"{name}_identity"))
            out.name = name
            changed = True
    return changed


def _export(module: nn.Module, args: tuple, path: Path, input_names, output_names, dynamic_axes,
            fixed_out_dims: dict[str, dict[int, int]] | None = None) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about python values: covered by the self-checks
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    if name_outputs(m, output_names):
        onnx.save(m, str(path))
    if fixed_out_dims:
        # the tracer leaves some static output dims symbolic (e.g. "MatMulimage_features_dim_1"): pin them
        for out in m.graph.output:
            for axis, value in fixed_out_dims.get(out.name, {}).items():
                dim = out.type.tensor_type.shape.dim[axis]
                dim.Clear()
                dim.dim_value = value
        onnx.save(m, str(path))
    for init in m.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            raise ExportError(f"{path.name}: initializer {init.name} uses external data")
    onnx.checker.check_model(m)
    got_in = [i.name for i in m.graph.input]
    if got_in != list(input_names):
        raise ExportError(f"{path.name}: inputs {got_in} != {list(input_names)} (an input was unused and dropped?)")
    got_out = [o.name for o in m.graph.output]
    if got_out != list(output_names):
        raise ExportError(f"{path.name}: outputs {got_out} != {list(output_names)}")
    log(f"  wrote {path.name} ({path.stat().st_size} bytes, {len(m.graph.node)} nodes)")


def _assert_close(name: str, a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    if a.shape != b.shape:
        raise ExportError(f"wrapper check {name}: shape {tuple(a.shape)} != {tuple(b.shape)}")
    d = (a - b).abs().max().item() if a.numel() else 0.0
    if not d <= tol:
        raise ExportError(f"wrapper check {name}: max abs diff {d:g} > {tol:g}")


@torch.no_grad()
def export_all(bundle, onnx_dir: Path, sample) -> None:
    """Export the three parts. ``sample`` is a processor output (batch 1) used to build trace inputs."""
    model = bundle.model
    onnx_dir.mkdir(parents=True, exist_ok=True)
    n_layers, kv_heads, head_dim = kv_shape(model)

    # ---- vision: trace with batch 2 (and 3 tiles for idefics3) so that those axes stay symbolic
    if bundle.family == "idefics3":
        vision = Idefics3VisionEncoder(model).eval()
        pv = sample["pixel_values"]  # [1, n, 3, H, W]
        pam = sample["pixel_attention_mask"].to(torch.bool)
        ref = model.model.get_image_features(pv, pam).pooler_output
        ref = torch.cat(list(ref), dim=0)
        got = vision(pv, pam)
        _assert_close("idefics3 vision vs get_image_features", got.reshape(-1, got.shape[-1]), ref)
        pv2 = torch.cat([pv[:, :3], pv[:, 1:4]], dim=0)
        pam2 = torch.cat([pam[:, :3], pam[:, 1:4]], dim=0)
        args = (pv2, pam2)
        names = ["pixel_values", "pixel_attention_mask"]
        # H and W stay fixed at the tile size (the pixel shuffle is built for full tiles)
        axes = {
            "pixel_values": {0: "batch_size", 1: "num_images"},
            "pixel_attention_mask": {0: "batch_size", 1: "num_images"},
            "image_features": {0: "batch_num_images"},
        }
    elif bundle.family == "llava_onevision":
        vision = OnevisionVisionEncoder(model).eval()
        pv = sample["pixel_values"]  # [1, crops, 3, H, W]
        ref = model.model.get_image_features(
            pixel_values=pv, image_sizes=sample["image_sizes"], vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
            vision_aspect_ratio=model.config.vision_aspect_ratio, batch_num_images=sample["batch_num_images"],
        ).pooler_output[0]
        feats, newline = vision(pv[0])
        packed, _ = model.model.pack_image_features([feats], sample["image_sizes"], image_newline=newline,
                                                    vision_aspect_ratio=model.config.vision_aspect_ratio)
        _assert_close("llava_onevision vision + pack vs get_image_features", packed[0], ref)
        args = (pv[0, :2],)
        names = ["pixel_values"]
        axes = {"pixel_values": {0: "num_patches"}, "image_features": {0: "num_patches"}}
        _export(vision, args, onnx_dir / "vision_encoder.onnx", names, ["image_features", "image_newline"], axes,
                fixed_out_dims={"image_features": {1: bundle.extra["image_seq_len"]}})
    else:
        vision = LlavaVisionEncoder(model).eval()
        pv = sample["pixel_values"]  # [1, 3, H, W]
        ref = model.model.get_image_features(
            pixel_values=pv,
            vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        ).pooler_output
        ref = torch.cat(list(ref), dim=0)
        got = vision(pv)
        _assert_close("llava vision vs get_image_features", got.reshape(-1, got.shape[-1]), ref)
        args = (torch.cat([pv, pv.flip(-1)], dim=0),)
        names = ["pixel_values"]
        axes = {"pixel_values": {0: "batch_size"}, "image_features": {0: "batch_size"}}
    if bundle.family != "llava_onevision":
        tokens = bundle.extra["image_seq_len"]  # image tokens per tile (idefics3) / per image (llava)
        _export(vision, args, onnx_dir / "vision_encoder.onnx", names, ["image_features"], axes,
                fixed_out_dims={"image_features": {1: tokens}})

    # ---- embed_tokens
    embed = EmbedTokens(model).eval()
    ids = sample["input_ids"][:, :7]
    ids2 = torch.cat([ids, ids.flip(-1)], dim=0)
    _export(
        embed, (ids2,), onnx_dir / "embed_tokens.onnx", ["input_ids"], ["inputs_embeds"],
        {"input_ids": {0: "batch_size", 1: "sequence_length"}, "inputs_embeds": {0: "batch_size", 1: "sequence_length"}},
    )

    # ---- decoder: check the wrapper against the model (prefill + one step), then trace with batch 2, past 3, seq 4
    decoder = Decoder(model).eval()
    _check_decoder_wrapper(bundle, decoder, sample)
    b, past_len, seq = 2, 3, 4
    hidden = model.config.text_config.hidden_size
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(b, seq, hidden, generator=g)
    mask = torch.ones(b, past_len + seq, dtype=torch.int64)
    pos = torch.arange(past_len, past_len + seq)[None].repeat(b, 1)
    past = []
    for _ in range(n_layers):
        past += [torch.randn(b, kv_heads, past_len, head_dim, generator=g) for _ in range(2)]
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
    _export(decoder, (emb, mask, pos, *past), onnx_dir / "decoder_model_merged.onnx", in_names, out_names, axes)


def _check_decoder_wrapper(bundle, decoder: Decoder, sample) -> None:
    model = bundle.model
    n_layers, kv_heads, head_dim = kv_shape(model)
    ids = sample["input_ids"]
    emb = model.model.get_input_embeddings()(ids)
    # text-only check (image splicing is checked end to end by the greedy loop)
    ref = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    empty = [torch.zeros(1, kv_heads, 0, head_dim) for _ in range(2 * n_layers)]
    pos = torch.arange(ids.shape[1])[None]
    out = decoder(emb, torch.ones_like(ids), pos, *empty)
    _assert_close("decoder prefill logits", out[0], ref.logits)
    nxt = ref.logits[:, -1:].argmax(-1)
    ref2 = model(input_ids=nxt, attention_mask=torch.ones(1, ids.shape[1] + 1, dtype=torch.int64),
                 cache=ref.cache, use_cache=True)
    out2 = decoder(model.model.get_input_embeddings()(nxt), torch.ones(1, ids.shape[1] + 1, dtype=torch.int64),
                   torch.tensor([[ids.shape[1]]]), *out[1:])
    _assert_close("decoder step logits", out2[0], ref2.logits)
