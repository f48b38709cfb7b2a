"""The three onnx-community parts: the text wrappers, the family-independent export, and its helpers.

The vision encoder wrappers are the families' (``families/<name>.py``); this module traces whatever
``FamilySpec.vision_wrapper`` returns with the spec's input names and dynamic axes.

Parts (inputs -> outputs):
  vision_encoder.onnx         idefics3: pixel_values f32 [batch, n_tiles, 3, H, W], pixel_attention_mask bool
                              [batch, n_tiles, H, W] -> image_features f32 [batch*n_tiles, tokens_per_tile, hidden]
                              llava: pixel_values f32 [batch, 3, H, W] -> image_features f32 [batch, n_patches, hidden]
                              llava_onevision: pixel_values f32 [crops, 3, H, W] -> image_features f32
                              [crops, tokens_per_crop, hidden] (unpacked), image_newline f32 [hidden]
  embed_tokens.onnx           input_ids i64 [batch, seq] -> inputs_embeds f32 [batch, seq, hidden]
  decoder_model_merged.onnx   inputs_embeds, attention_mask i64 [batch, total_seq], position_ids i64 [batch, seq],
                              past_key_values.{i}.key/.value f32 [batch, kv_heads, past_seq, head_dim]
                              [, attention_bias f32 [batch, total_seq]: added to every query's logits for that key,
                              e.g. ln(n) for a token standing for n pooled ones (proportional attention); testbeds]
                              -> logits f32 [batch, seq, vocab], present.{i}.key/.value [batch, kv_heads, total_seq, head_dim]

Exporter: TorchScript-based ``torch.onnx.export(..., dynamo=False)`` with ``dynamic_axes``, opset 18. The wrappers
avoid the constructs that the tracer would freeze or cannot express:
  * Idefics3 vision (``families/smolvlm.py``): ``Tensor.unfold`` (patch mask) -> reshape + sum;
    ``torch.bucketize`` (position ids) -> comparison count; pixel shuffle with ``-1`` for the tile batch. Padding
    tiles (all-zero pixel_values) are NOT removed inside the graph: feed only real tiles (the processor only pads
    when batching images with different tile counts).
  * decoder: the 4-D additive attention mask (causal + padding, finfo.min, exactly what transformers' eager
    attention adds) is built in the wrapper from ``attention_mask`` and passed through, so the graph never depends
    on traced Python ints.
Every wrapper is checked against the transformers module it replaces before export.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch
from torch import nn
from transformers import DynamicCache

from .common import OPSET, ExportError, log


# ----------------------------------------------------------------------------------------------------------- vision
def pixel_shuffle(x: torch.Tensor, n: int, s: int, d: int | None = None) -> torch.Tensor:
    """Idefics3Connector.pixel_shuffle on [b, n*n, d] -> [b, n*n/s^2, d*s^2] (same op order as the model), with the
    batch left dynamic (-1) for the tracer. ``d``: the width as a Python int (a constant in the traced graph);
    default ``x.shape[-1]``."""
    d = x.shape[-1] if d is None else d
    x = x.reshape(-1, n, n, d)
    x = x.reshape(-1, n, n // s, d * s)
    x = x.permute(0, 2, 1, 3)
    x = x.reshape(-1, n // s, n // s, d * s * s)
    x = x.permute(0, 2, 1, 3)
    return x.reshape(-1, (n * n) // (s * s), d * s * s)


# ------------------------------------------------------------------------------------------------- embed / decoder
class EmbedTokens(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.embed = model.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)


class Decoder(nn.Module):
    """``decoder_model_merged``: with ``attention_bias=True`` the input after ``position_ids`` is an additive
    per-key attention bias ``[batch, total_seq]`` (0 = the plain decoder, exactly)."""

    def __init__(self, model, attention_bias: bool = False):
        super().__init__()
        self.text = model.model.get_decoder() if hasattr(model.model, "get_decoder") else model.get_decoder()
        self.lm_head = model.lm_head
        self.num_layers = model.config.text_config.num_hidden_layers
        self.attention_bias = attention_bias

    def forward(self, inputs_embeds, attention_mask, position_ids, *rest):
        if self.attention_bias:
            key_bias, past = rest[0], rest[1:]
        else:
            key_bias, past = None, rest
        seq = inputs_embeds.shape[1]
        total = attention_mask.shape[1]
        past_len = total - seq
        # causal (query i sits at absolute position past_len + i) AND padding
        q_pos = torch.arange(seq)[:, None] + past_len
        k_pos = torch.arange(total)[None, :]
        allowed = (k_pos <= q_pos)[None, None, :, :] & attention_mask.to(torch.bool)[:, None, None, :]
        allowed_value = torch.tensor(0.0) if key_bias is None else key_bias[:, None, None, :]
        bias = torch.where(allowed, allowed_value, torch.tensor(torch.finfo(torch.float32).min))

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


def decoder_io(n_layers: int, attention_bias: bool = False) -> tuple[list[str], list[str], dict]:
    """Input names, output names and dynamic axes of ``decoder_model_merged.onnx`` for ``n_layers`` KV layers."""
    in_names = ["inputs_embeds", "attention_mask", "position_ids"] + (["attention_bias"] if attention_bias else [])
    out_names = ["logits"]
    axes = {
        "inputs_embeds": {0: "batch_size", 1: "sequence_length"},
        "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
        "position_ids": {0: "batch_size", 1: "sequence_length"},
        "attention_bias": {0: "batch_size", 1: "total_sequence_length"},
        "logits": {0: "batch_size", 1: "sequence_length"},
    }
    for i in range(n_layers):
        for kv in ("key", "value"):
            in_names.append(f"past_key_values.{i}.{kv}")
            out_names.append(f"present.{i}.{kv}")
            axes[f"past_key_values.{i}.{kv}"] = {0: "batch_size", 2: "past_sequence_length"}
            axes[f"present.{i}.{kv}"] = {0: "batch_size", 2: "total_sequence_length"}
    return in_names, out_names, axes


EMBED_AXES = {"input_ids": {0: "batch_size", 1: "sequence_length"},
              "inputs_embeds": {0: "batch_size", 1: "sequence_length"}}


def decoder_trace_inputs(model, g: torch.Generator, embed_scale: float | None = None,
                         attention_bias: bool = False) -> tuple:
    """Decoder trace inputs: batch 2, past 3, seq 4 (random embeddings, times ``embed_scale`` if given, and KV;
    a random key bias after the positions when ``attention_bias``)."""
    n_layers, kv_heads, head_dim = kv_shape(model)
    b, past_len, seq = 2, 3, 4
    hidden = model.config.text_config.hidden_size
    emb = torch.randn(b, seq, hidden, generator=g)
    if embed_scale is not None:
        emb = emb * embed_scale
    mask = torch.ones(b, past_len + seq, dtype=torch.int64)
    pos = torch.arange(past_len, past_len + seq)[None].repeat(b, 1)
    past = [torch.randn(b, kv_heads, past_len, head_dim, generator=g) for _ in range(2 * n_layers)]
    extra = (torch.rand(b, past_len + seq, generator=g),) if attention_bias else ()
    return (emb, mask, pos, *extra, *past)


# ----------------------------------------------------------------------------------------------------------- export
def name_outputs(m, output_names) -> bool:
    """Gives every graph output its declared name. A constant output (LLaVA-OneVision's ``image_newline``) is folded
    into an initializer that keeps the tracer's name; an Identity node restores the declared one. True if changed."""
    changed = False
    for out, name in zip(m.graph.output, output_names):
        if out.name != name:
            m.graph.node.append(onnx.helper.make_node("Identity", [out.name], [name], name=f"{name}_identity"))
            out.name = name
            changed = True
    return changed


def pin_output_dims(m, fixed_out_dims: dict[str, dict[int, int]] | None) -> None:
    """The tracer leaves some static output dims symbolic (e.g. "MatMulimage_features_dim_1"): pin them."""
    for out in m.graph.output:
        for axis, value in (fixed_out_dims or {}).get(out.name, {}).items():
            dim = out.type.tensor_type.shape.dim[axis]
            dim.Clear()
            dim.dim_value = value


def trace(module: nn.Module, args: tuple, path: Path, input_names, output_names, dynamic_axes) -> None:
    """Legacy TorchScript ``torch.onnx.export`` (opset 18, constant folding) of ``module`` on ``args``."""
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


def export_onnx(module: nn.Module, args: tuple, path: Path, input_names, output_names, dynamic_axes,
                fixed_out_dims: dict[str, dict[int, int]] | None = None) -> None:
    """Trace ``module`` into ``path`` (weights inside), name and pin the outputs, and check the file."""
    trace(module, args, path, input_names, output_names, dynamic_axes)
    m = onnx.load(str(path), load_external_data=False)
    if name_outputs(m, output_names):
        onnx.save(m, str(path))
    if fixed_out_dims:
        pin_output_dims(m, fixed_out_dims)
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


def assert_close(name: str, a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    if a.shape != b.shape:
        raise ExportError(f"wrapper check {name}: shape {tuple(a.shape)} != {tuple(b.shape)}")
    d = (a - b).abs().max().item() if a.numel() else 0.0
    if not d <= tol:
        raise ExportError(f"wrapper check {name}: max abs diff {d:g} > {tol:g}")


@torch.no_grad()
def export_decoder(model, onnx_dir: Path, sample, attention_bias: bool = False) -> None:
    """``decoder_model_merged.onnx``: the wrapper checked against the model (prefill + one step; with a bias input
    also against eager attention given the same additive 4-D mask), then traced with batch 2, past 3, seq 4."""
    decoder = Decoder(model, attention_bias).eval()
    check_decoder_wrapper(model, decoder, sample)
    in_names, out_names, axes = decoder_io(kv_shape(model)[0], attention_bias)
    export_onnx(decoder, decoder_trace_inputs(model, torch.Generator().manual_seed(0), attention_bias=attention_bias),
                onnx_dir / "decoder_model_merged.onnx", in_names, out_names, axes)


@torch.no_grad()
def export_all(bundle, onnx_dir: Path, sample, attention_bias: bool = False) -> None:
    """Export the three parts. ``sample`` is a processor output (batch 1) used to build trace inputs."""
    model, spec = bundle.model, bundle.spec
    onnx_dir.mkdir(parents=True, exist_ok=True)

    # ---- vision: checked against transformers, then traced on inputs whose batch / tile axes stay symbolic
    vision = spec.vision_wrapper(model).eval()
    spec.check_vision_wrapper(model, vision, sample)
    tokens = bundle.extra["image_seq_len"]  # image tokens per tile (idefics3) / image (llava) / crop (onevision)
    export_onnx(vision, spec.vision_trace_args(sample), onnx_dir / "vision_encoder.onnx", spec.vision_inputs,
                spec.vision_outputs, spec.vision_axes(("image_features",)),
                fixed_out_dims={"image_features": {1: tokens}})

    # ---- embed_tokens
    embed = EmbedTokens(model).eval()
    ids = sample["input_ids"][:, :7]
    ids2 = torch.cat([ids, ids.flip(-1)], dim=0)
    export_onnx(embed, (ids2,), onnx_dir / "embed_tokens.onnx", ["input_ids"], ["inputs_embeds"], EMBED_AXES)

    export_decoder(model, onnx_dir, sample, attention_bias)


def check_decoder_wrapper(model, decoder: Decoder, sample) -> None:
    n_layers, kv_heads, head_dim = kv_shape(model)
    ids = sample["input_ids"]
    emb = model.model.get_input_embeddings()(ids)
    # text-only check (image splicing is checked end to end by the greedy loop)
    ref = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    empty = [torch.zeros(1, kv_heads, 0, head_dim) for _ in range(2 * n_layers)]
    pos = torch.arange(ids.shape[1])[None]
    zero = (torch.zeros(1, ids.shape[1]),) if decoder.attention_bias else ()
    out = decoder(emb, torch.ones_like(ids), pos, *zero, *empty)
    assert_close("decoder prefill logits", out[0], ref.logits)
    if decoder.attention_bias:
        # a key bias is what eager attention adds from a custom 4-D float mask (causal -inf elsewhere)
        key_bias = torch.linspace(-1.0, 2.0, ids.shape[1])[None]
        n = ids.shape[1]
        causal = torch.full((n, n), float("-inf")).triu(1)
        mask4 = (causal[None, None] + key_bias[:, None, None, :])
        ref_b = model(inputs_embeds=emb, attention_mask=mask4, position_ids=pos, use_cache=False)
        out_b = decoder(emb, torch.ones_like(ids), pos, key_bias, *empty)
        assert_close("decoder logits with a key bias", out_b[0], ref_b.logits, tol=1e-4)
    nxt = ref.logits[:, -1:].argmax(-1)
    ref2 = model(input_ids=nxt, attention_mask=torch.ones(1, ids.shape[1] + 1, dtype=torch.int64),
                 cache=ref.cache, use_cache=True)
    zero2 = (torch.zeros(1, ids.shape[1] + 1),) if decoder.attention_bias else ()
    out2 = decoder(model.model.get_input_embeddings()(nxt), torch.ones(1, ids.shape[1] + 1, dtype=torch.int64),
                   torch.tensor([[ids.shape[1]]]), *zero2, *out[1:])
    assert_close("decoder step logits", out2[0], ref2.logits)
