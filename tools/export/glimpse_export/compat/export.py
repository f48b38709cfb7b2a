"""The compat exporters: the wrappers other tools would export and how each style writes its files.

* ``LlavaVision``: vision tower + projector with transformers' feature selection (one layer or a list of layers,
  concatenated; CLS dropped for strategy ``default``); LLaVA-OneVision uses it too (SigLIP, ``full``): no
  ``image_newline`` output.
* ``Idefics3DynamicHW``: Glimpse's Idefics3 wrapper with the patch grid taken from the input's height and width
  (symbolic in the graph) instead of the tile size.
* ``PlainDecoder``: the Hugging Face text model called with the 2-D ``attention_mask``: transformers builds the causal
  mask itself (inside the graph), unlike ``onnx_parts.Decoder`` which passes a ready 4-D bias.
"""

from __future__ import annotations

import inspect
import shutil
import tempfile
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn
from transformers import DynamicCache

from ..common import OPSET, ExportError, log
from ..families.smolvlm import Idefics3VisionEncoder
from ..onnx_parts import (EMBED_AXES, Decoder, EmbedTokens, assert_close, check_decoder_wrapper, decoder_io,
                          decoder_trace_inputs, export_onnx, kv_shape)
from ..quantize.convert import convert
from .styles import Style


# ----------------------------------------------------------------------------------------------------------- wrappers
class LlavaVision(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.tower = model.model.vision_tower
        self.projector = model.model.multi_modal_projector
        layer = model.config.vision_feature_layer
        self.layers = [layer] if isinstance(layer, int) else list(layer)
        self.drop_cls = model.config.vision_feature_select_strategy == "default"

    def forward(self, pixel_values):
        hs = self.tower(pixel_values, output_hidden_states=True, return_dict=True).hidden_states
        feats = [hs[i][:, 1:] if self.drop_cls else hs[i] for i in self.layers]
        return self.projector(torch.cat(feats, dim=-1) if len(feats) > 1 else feats[0])


class Idefics3DynamicHW(Idefics3VisionEncoder):
    def forward(self, pixel_values, pixel_attention_mask):
        x, bias = self.embed(pixel_values, pixel_attention_mask)
        x = self.encoder(inputs_embeds=x, attention_mask=bias).last_hidden_state
        x = self.post_layernorm(x)
        hp, wp = pixel_values.shape[3] // self.patch, pixel_values.shape[4] // self.patch
        s, d = self.scale, self.dim
        # Idefics3Connector.pixel_shuffle with the grid (hp, wp) from the input instead of sqrt(seq) of a full tile
        x = x.reshape(-1, hp, wp, d)
        x = x.reshape(-1, hp, wp // s, d * s)
        x = x.permute(0, 2, 1, 3)
        x = x.reshape(-1, wp // s, hp // s, d * s * s)
        x = x.permute(0, 2, 1, 3)
        return self.projection(x.reshape(-1, (hp // s) * (wp // s), d * s * s))


class HFIdefics3Vision(nn.Module):
    """transformers' own ``Idefics3Model.get_image_features`` (all-zero padding tiles dropped in the graph), the
    features as ``[tiles, tokens, hidden]``."""

    def __init__(self, model):
        super().__init__()
        self.model = model.model
        vc = model.config.vision_config
        self.tokens = (vc.image_size // vc.patch_size) ** 2 // model.config.scale_factor**2

    def forward(self, pixel_values, pixel_attention_mask):
        feats = self.model.get_image_features(pixel_values, pixel_attention_mask).pooler_output
        return torch.cat(list(feats), dim=0).reshape(-1, self.tokens, feats[0].shape[-1])


class PlainDecoder(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.lm = model.model.get_decoder() if hasattr(model.model, "get_decoder") else model.get_decoder()
        self.lm_head = model.lm_head
        self.num_layers = model.config.text_config.num_hidden_layers

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)])
        out = self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                      cache=cache, use_cache=True)
        presents = []
        for layer in cache.layers:
            presents += [layer.keys, layer.values]
        return (self.lm_head(out.last_hidden_state), *presents)


# ---------------------------------------------------------------------------------------------------------- exporters
def _drop_stack_traces(graph) -> None:
    """The one node annotation that depends on where the code lives (absolute paths, line numbers): removed, so the
    files do not change with the checkout. The exporter's other annotations (namespace, fx_node, ...) stay."""
    for n in graph.node:
        keep = [p for p in n.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
        del n.metadata_props[:]
        n.metadata_props.extend(keep)
        for a in n.attribute:
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                _drop_stack_traces(g)


def export_dynamo(module, args, path: Path, in_names, out_names, dynamic) -> None:
    """``torch.onnx.export(dynamo=True)`` with its defaults (opset, onnxscript optimizer), weights inside.
    ``dynamic``: per input, the dynamic axes (``Dim.DYNAMIC``: torch.export names them and finds the relations,
    e.g. total = past + sequence)."""
    shapes = tuple({a: torch.export.Dim.DYNAMIC for a in axes} for axes in dynamic)
    params = inspect.signature(module.forward).parameters.values()
    if any(p.kind is p.VAR_POSITIONAL for p in params):  # forward(a, b, c, *past): the varargs are one entry
        k = sum(p.kind is p.POSITIONAL_OR_KEYWORD for p in params)
        shapes = (*shapes[:k], tuple(shapes[k:]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), input_names=list(in_names), output_names=list(out_names),
                          dynamic_shapes=shapes, dynamo=True, external_data=False)
    m = onnx.load(str(path))
    _drop_stack_traces(m.graph)
    onnx.save_model(m, str(path))
    onnx.checker.check_model(m)
    if [i.name for i in m.graph.input] != list(in_names) or [o.name for o in m.graph.output] != list(out_names):
        raise ExportError(f"{path.name}: dynamo I/O {[i.name for i in m.graph.input]} -> "
                          f"{[o.name for o in m.graph.output]}")
    log(f"  wrote {path.name} ({path.stat().st_size} bytes, dynamo, opset "
        f"{next(o.version for o in m.opset_import if o.domain in ('', 'ai.onnx'))})")


def export_plain(module, args, path: Path, in_names, out_names, axes) -> None:
    """What a user's script does: torch.onnx.export(dynamo=False), no renaming or pinning afterwards."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), input_names=list(in_names), output_names=list(out_names),
                          dynamic_axes=axes or None, opset_version=OPSET, do_constant_folding=True, dynamo=False)
    m = onnx.load(str(path))
    onnx.checker.check_model(m)
    if [i.name for i in m.graph.input] != list(in_names) or [o.name for o in m.graph.output] != list(out_names):
        raise ExportError(f"{path.name}: I/O names changed by the exporter")
    log(f"  wrote {path.name} ({path.stat().st_size} bytes, plain legacy export)")


def _error_text(e: Exception) -> str:
    root = e
    while root.__cause__ is not None:  # the exporter wraps the torch.export error: report the root cause
        root = root.__cause__
    lines = [ln.strip() for ln in str(root).strip().splitlines() if ln.strip()][:2]
    return f"{type(e).__name__} <- {type(root).__name__}: {' '.join(lines)}"[:500]


def _dynamo_part(path: Path, names, outs, fallback, attempts) -> list[str]:
    """Try each dynamo attempt in turn; if all fail, the legacy exporter on ``fallback``. Returns what happened."""
    log_lines = []
    for label, module, args, dyn in attempts:
        try:
            export_dynamo(module, args, path, names, outs, dyn)
            return log_lines + [f"dynamo: {label}"]
        except Exception as e:  # noqa: BLE001  (recorded in the README)
            msg = _error_text(e)
            log(f"  {path.name}: dynamo failed ({label}): {msg}")
            log_lines.append(f"dynamo failed ({label}): `{msg}`")
            for p in path.parent.glob(f"{path.name}*"):
                p.unlink()
    module, args, axes = fallback
    export_onnx(module, args, path, names, outs, axes)
    return log_lines + ["legacy exporter (fallback for this part only): glimpse_export's wrapper, dynamic_axes"]


def to_external_data(path: Path) -> None:
    """Re-save with every initializer in ``<part>.onnx_data`` (onnx-community naming), relative location."""
    m = onnx.load(str(path))
    data = path.with_name(path.stem + ".onnx_data")
    if data.exists():
        data.unlink()
    onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
                    size_threshold=0, convert_attribute=False)
    inline = [t.name for t in onnx.load(str(path), load_external_data=False).graph.initializer
              if t.data_location != onnx.TensorProto.EXTERNAL]
    if inline:
        raise ExportError(f"{path.name}: initializers left inline: {inline[:5]}")
    log(f"  {path.name}: {path.stat().st_size} bytes + {data.name} {data.stat().st_size} bytes")


# ------------------------------------------------------------------------------------------------------------ vision
def _vision(bundle, style: Style, sample):
    """(wrapper, trace args, input names, dynamic axes or per-input dynamo axes)."""
    model, spec = bundle.model, bundle.spec
    if spec.name == "smolvlm":
        vision = (Idefics3DynamicHW if style.exporter == "dynamic_hw" else Idefics3VisionEncoder)(model).eval()
        args = spec.vision_trace_args(sample)
        names = ["pixel_values", "pixel_attention_mask"]
        axes = {"pixel_values": {0: "batch_size", 1: "num_images"},
                "pixel_attention_mask": {0: "batch_size", 1: "num_images"},
                "image_features": {0: "batch_num_images"}}
        if style.exporter == "dynamic_hw":
            axes["pixel_values"].update({3: "height", 4: "width"})
            axes["pixel_attention_mask"].update({2: "height", 3: "width"})
            axes["image_features"][1] = "num_tokens"
        ref = spec.image_features(model, sample)
        got = vision(*spec.vision_args(sample))
    else:
        vision = LlavaVision(model).eval()
        pv = spec.vision_args(sample)[0]
        if style.exporter == "plain":
            args, axes = (pv,), {}  # monolithic: exactly one image, every dim fixed
        else:
            args = spec.vision_trace_args(sample)  # 2 images / crops: the batch axis stays symbolic
            axis = spec.vision_batch_axis
            axes = {"pixel_values": {0: axis}, "image_features": {0: axis}}
        names = ["pixel_values"]
        ref = spec.image_features(model, sample)  # what transformers splices (LLaVA-OneVision: packed)
        got = vision(pv)
        if spec.name == "llava_onevision":  # pack the crop features with the newline as the runtime must
            got = torch.from_numpy(spec.packer(model, sample["image_sizes"])(
                got.numpy(), model.model.image_newline.detach().numpy()))
    assert_close(f"{style.name} vision wrapper vs transformers", got.reshape(-1, got.shape[-1]),
                 ref.reshape(-1, ref.shape[-1]))
    return vision, args, names, axes


# ------------------------------------------------------------------------------------------------------------- parts
@torch.no_grad()
def export_style(bundle, style: Style, onnx_dir: Path, sample) -> dict:
    """Writes the style's fp32 parts into ``onnx_dir``; returns notes for the README / export_info."""
    model = bundle.model
    onnx_dir.mkdir(parents=True, exist_ok=True)
    notes: dict = {}
    vision, vargs, vnames, vaxes = _vision(bundle, style, sample)
    embed = EmbedTokens(model).eval()
    ids = sample["input_ids"][:, :7]
    ids2 = torch.cat([ids, ids.flip(-1)], dim=0)
    decoder = (PlainDecoder if style.exporter in ("plain", "dynamo") else Decoder)(model).eval()
    check_decoder_wrapper(model, decoder, sample)
    in_names, out_names, dec_axes = decoder_io(kv_shape(model)[0])
    dargs = decoder_trace_inputs(model, torch.Generator().manual_seed(0))

    if style.exporter == "dynamo":
        hf_vision = HFIdefics3Vision(model).eval()
        one = bundle.spec.vision_args(sample)  # batch 1, all tiles of the sample
        dec_dyn = [(0, 1), (0, 1), (0, 1)] + [(0, 2)] * (len(in_names) - 3)
        jobs = [  # (stem, names, outputs, legacy fallback (module, args, axes), attempts (label, module, args, dyn))
            ("vision_encoder", vnames, ["image_features"], (vision, vargs, vaxes), [
                ("transformers get_image_features, batch and num_images dynamic", hf_vision, vargs, [(0, 1), (0, 1)]),
                ("transformers get_image_features, batch fixed to 1, num_images dynamic", hf_vision, one,
                 [(1,), (1,)]),
            ]),
            ("embed_tokens", ["input_ids"], ["inputs_embeds"], (embed, (ids2,), EMBED_AXES),
             [("embedding, batch and sequence dynamic", embed, (ids2,), [(0, 1)])]),
            ("decoder_model_merged", in_names, out_names, (decoder, dargs, dec_axes),
             [("HF text model with a 2-D attention_mask, batch / sequence / past dynamic", decoder, dargs, dec_dyn)]),
        ]
        notes["dynamo"] = {stem: _dynamo_part(onnx_dir / f"{stem}.onnx", names, outs, fallback, attempts)
                           for stem, names, outs, fallback, attempts in jobs}
        return notes

    plain = style.exporter == "plain"
    if plain:
        export_plain(vision, vargs, onnx_dir / "vision_encoder.onnx", vnames, ["image_features"], vaxes)
        export_plain(embed, (ids2,), onnx_dir / "embed_tokens.onnx", ["input_ids"], ["inputs_embeds"], EMBED_AXES)
        export_plain(decoder, dargs, onnx_dir / "decoder_model_merged.onnx", in_names, out_names, dec_axes)
        return notes
    pin = None if style.exporter == "dynamic_hw" else {"image_features": {1: bundle.extra["image_seq_len"]}}
    export_onnx(vision, vargs, onnx_dir / "vision_encoder.onnx", vnames, ["image_features"], vaxes,
                fixed_out_dims=pin)
    export_onnx(embed, (ids2,), onnx_dir / "embed_tokens.onnx", ["input_ids"], ["inputs_embeds"], EMBED_AXES)
    export_onnx(decoder, dargs, onnx_dir / "decoder_model_merged.onnx", in_names, out_names, dec_axes)
    return notes


def finalize_style(style: Style, onnx_dir: Path) -> dict:
    """After the fp32 parts passed: external data, or the decoder's dtype variants replacing the fp32 decoder."""
    notes: dict = {}
    if style.exporter == "external":
        for stem in ("vision_encoder", "embed_tokens", "decoder_model_merged"):
            to_external_data(onnx_dir / f"{stem}.onnx")
    if style.exporter == "decoder_variants":
        src = onnx_dir / "decoder_model_merged.onnx"
        with tempfile.TemporaryDirectory() as tmp:
            for stem, _ in style.decoders:
                mode = stem.rsplit("_", 1)[1]
                model, info = convert(src, mode, Path(tmp))
                onnx.checker.check_model(model)
                onnx.save_model(model, str(onnx_dir / f"{stem}.onnx"))
                notes[stem] = {"mode": mode, **info}
                log(f"  wrote {stem}.onnx ({(onnx_dir / f'{stem}.onnx').stat().st_size} bytes, {mode})")
        src.unlink()
    return notes


def copy_tree(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
