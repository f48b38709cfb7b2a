"""The staged vision encoder: ``vision_embed.onnx``, ``vision_blocks_{k}.onnx``, ``vision_head.onnx`` next to the
monolithic ``vision_encoder.onnx`` (which stays as it is), and the manifest's ``stages`` entry (docs/stages.md).

Files (inputs -> outputs):
  vision_embed       the monolithic encoder's inputs (same names, dtypes, dynamic axes) -> hidden_states f32
                     [views, tokens, d]: the residual stream entering encoder layer 0 (patch + position embeddings;
                     CLIP/LLaVA: with the CLS token and ``pre_layrnorm``)
  vision_blocks_{k}  hidden_states f32 [views, tokens, d], attention_bias f32 [views, tokens] -> hidden_states_out
                     f32 [views, tokens, d] after the group's last layer (ONNX names a value once: an output cannot
                     be called like the input), keys f32 [views, tokens, head_dim] (that
                     layer's k_proj of layer_norm1 of its input, split into heads and averaged over them). Every
                     layer of the group adds attention_bias[:, None, None, :] to every attention logit (the bias of
                     the key token; 0 = plain attention, log(size) = ToMe proportional attention). ``tokens`` is
                     symbolic: the blocks run on any subset of the tokens.
  vision_head        hidden_states f32 [views, T, d] (the full grid after the last group; T static) -> the
                     monolithic encoder's outputs (``image_features``, LLaVA-OneVision also ``image_newline``), same
                     shapes and axes.

Groups: ``groups`` (default 2) runs of encoder layers, as even as possible, earlier groups one layer longer. The
layers are those the features come from: Idefics3 all of them; LLaVA / LLaVA-OneVision up to
``vision_feature_layer`` (hidden_states[f] = output of layer f - 1; later layers are not exported).

Idefics3: the monolithic wrapper turns ``pixel_attention_mask`` into a patch mask (position ids, and finfo.min on
the keys of padded patches); ``vision_embed`` keeps its position handling, but the blocks take no patch mask. With
every patch valid (full tiles: all of the tiny fixtures) the monolithic bias is all zeros and the chain equals it;
padded views are not supported by the staged form.

Checks (ExportError when one fails): in torch, the stages against transformers' own hidden states (embed output,
each group's output, the keys) and the chain against the monolithic wrapper; with onnxruntime, the chain
(attention_bias = 0) against ``vision_encoder.onnx`` on every sample (max abs diff <= 1e-5), and each blocks file on
``tokens - 3`` tokens with a non-zero bias against its torch module on that subset.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from .common import ExportError, log
from .families.llava import LlavaVisionEncoder
from .families.smolvlm import Idefics3VisionEncoder
from .onnx_parts import assert_close, export_onnx, pixel_shuffle
from .signals import _heads

DEFAULT_GROUPS = 2
EMBED_STEM = "vision_embed"
BLOCKS_STEM = "vision_blocks_{}"
HEAD_STEM = "vision_head"
CHAIN_TOL = 1e-5
FEWER = 3  # tokens dropped by the fewer-tokens check
STAGE_AXES = {0: "views", 1: "tokens"}
HIDDEN_IN = "hidden_states"  # the stream entering a stage (the embed's output, every blocks file's and the head's input)
HIDDEN_OUT = "hidden_states_out"  # a blocks file's stream output
BIAS = "attention_bias"
KEYS = "keys"


def split_layers(n_layers: int, groups: int) -> list[tuple[int, int]]:
    """[first, end) of ``groups`` runs covering ``n_layers`` layers, as even as possible, earlier ones longer."""
    if not 1 <= groups <= n_layers:
        raise ExportError(f"--stage-groups {groups}: expected 1..{n_layers} (the encoder layers exported)")
    base, extra = divmod(n_layers, groups)
    out, start = [], 0
    for k in range(groups):
        end = start + base + (1 if k < extra else 0)
        out.append((start, end))
        start = end
    return out


def stages_entry(ranges: list[tuple[int, int]], made_by: str = "export") -> dict:
    """The manifest's ``stages`` value for these layer groups (stems without a dtype suffix)."""
    return {"embed": EMBED_STEM,
            "blocks": [{"stem": BLOCKS_STEM.format(k), "layers": [a, b]} for k, (a, b) in enumerate(ranges)],
            "head": HEAD_STEM, "made_by": made_by}


# ------------------------------------------------------------------------------------------------------ the modules
class Embed(nn.Module):
    """The monolithic wrapper up to the input of encoder layer 0."""

    def __init__(self, vision: nn.Module):
        super().__init__()
        self.vision = vision
        self.idefics3 = isinstance(vision, Idefics3VisionEncoder)
        if not self.idefics3:
            self.pre = getattr(vision.tower, "pre_layrnorm", None)  # CLIP has one, SigLIP none

    def forward(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.idefics3:
            return self.vision.embed(pixel_values, pixel_attention_mask)[0]
        x = self.vision.tower.embeddings(pixel_values)
        return x if self.pre is None else self.pre(x)


class Blocks(nn.Module):
    """Encoder layers [first, end) with an additive per-key bias; also the last layer's head-averaged keys."""

    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, hidden_states: torch.Tensor, attention_bias: torch.Tensor):
        mask = attention_bias[:, None, None, :]
        x = hidden_states
        for layer in self.layers[:-1]:
            x = layer(x, mask)
        last = self.layers[-1]
        keys = _heads(last.self_attn.k_proj(last.layer_norm1(x)), last.self_attn).mean(dim=1)
        return last(x, mask), keys


class Head(nn.Module):
    """The monolithic wrapper after its feature layer: what it does to the encoder states."""

    def __init__(self, vision: nn.Module):
        super().__init__()
        self.vision = vision
        self.idefics3 = isinstance(vision, Idefics3VisionEncoder)
        self.newline = getattr(vision, "image_newline", None)  # LLaVA-OneVision

    def forward(self, hidden_states: torch.Tensor):
        v = self.vision
        if self.idefics3:
            x = v.post_layernorm(hidden_states)
            return v.projection(pixel_shuffle(x, v.nps, v.scale, v.dim))
        feats = hidden_states[:, 1:] if v.strategy == "default" else hidden_states  # drop CLS
        out = v.projector(feats)
        return out if self.newline is None else (out, self.newline)


def encoder_layers(vision: nn.Module) -> list:
    """The encoder layers the monolithic wrapper's features come from."""
    if isinstance(vision, Idefics3VisionEncoder):
        return list(vision.encoder.layers)
    if isinstance(vision, LlavaVisionEncoder):
        layers = list(vision.tower.encoder.layers)
        f = vision.layer % (len(layers) + 1)  # hidden_states[f] = output of layer f - 1
        if f == 0:
            raise ExportError("vision_feature_layer 0 (the embeddings): no encoder layer to stage")
        return layers[:f]
    raise ExportError(f"no staged form for {type(vision).__name__}")


def build_stages(spec, model, groups: int = DEFAULT_GROUPS):
    """(embed, [blocks per group], head, layer ranges) for a built model, from the family's monolithic wrapper."""
    vision = spec.vision_wrapper(model).eval()
    layers = encoder_layers(vision)
    ranges = split_layers(len(layers), groups)
    blocks = [Blocks(layers[a:b]).eval() for a, b in ranges]
    return Embed(vision).eval(), blocks, Head(vision).eval(), ranges


# ------------------------------------------------------------------------------------------------------ torch checks
def _tower_states(spec, model, args: tuple) -> tuple:
    """transformers' hidden states of the vision tower for the encoder inputs ``args`` (every view, no mask)."""
    pv = args[0].reshape(-1, *args[0].shape[-3:])
    tower = spec.vision_tower(model)
    if spec.family == "idefics3":
        return tower(pixel_values=pv, patch_attention_mask=None, output_hidden_states=True,
                     return_dict=True).hidden_states
    return tower(pv, output_hidden_states=True, return_dict=True).hidden_states


def _as_tuple(x) -> tuple:
    return x if isinstance(x, tuple) else (x,)


@torch.no_grad()
def check_torch(spec, model, embed, blocks, head, ranges, args: tuple, tol: float = CHAIN_TOL) -> None:
    """Stages vs transformers' hidden states (embed, each group, keys) and the chain vs the monolithic wrapper."""
    hs = _tower_states(spec, model, args)
    x = embed(*args)
    assert_close("stages: vision_embed vs hidden_states[0]", x, hs[0], tol)
    for k, (blk, (a, b)) in enumerate(zip(blocks, ranges)):
        x, keys = blk(x, torch.zeros(x.shape[:2]))
        assert_close(f"stages: vision_blocks_{k} vs hidden_states[{b}]", x, hs[b], tol)
        last = blk.layers[-1]
        ref = _heads(last.self_attn.k_proj(last.layer_norm1(hs[b - 1])), last.self_attn).mean(dim=1)
        assert_close(f"stages: vision_blocks_{k} keys vs layer {b - 1} keys", keys, ref, tol)
    got = _as_tuple(head(x))
    want = _as_tuple(embed.vision(*args))
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(f"stages: chain output {i} vs monolithic wrapper", g, w, tol)


# ---------------------------------------------------------------------------------------------------- onnxruntime
def _session(path: Path, threads: int = 1) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class Chain:
    """onnxruntime sessions of a folder's stage files (``suffix``: a dtype variant such as ``_fp16``)."""

    def __init__(self, onnx_dir: Path, stages: dict, suffix: str = "", threads: int = 1):
        self.embed = _session(onnx_dir / f"{stages['embed']}{suffix}.onnx", threads)
        self.blocks = [_session(onnx_dir / f"{b['stem']}{suffix}.onnx", threads) for b in stages["blocks"]]
        self.head = _session(onnx_dir / f"{stages['head']}{suffix}.onnx", threads)
        self.output_names = [o.name for o in self.head.get_outputs()]

    def run(self, feeds: dict) -> dict[str, np.ndarray]:
        """embed -> blocks_0 -> ... (attention_bias = 0) -> head: the head's outputs by name."""
        (h,) = self.embed.run([HIDDEN_IN], feeds)
        for s in self.blocks:
            (h,) = s.run([HIDDEN_OUT], {HIDDEN_IN: h, BIAS: np.zeros(h.shape[:2], np.float32)})
        return dict(zip(self.output_names, self.head.run(self.output_names, {HIDDEN_IN: h})))


def chain_vs_monolithic(onnx_dir: Path, stages: dict, feeds_list: list[dict], suffix: str = "",
                        threads: int = 1) -> list[dict[str, float]]:
    """Per sample: max abs diff of each head output against ``vision_encoder{suffix}.onnx``'s output of that name."""
    chain = Chain(onnx_dir, stages, suffix, threads)
    mono = _session(onnx_dir / f"vision_encoder{suffix}.onnx", threads)
    out = []
    for feeds in feeds_list:
        ref = dict(zip(chain.output_names, mono.run(chain.output_names, feeds)))
        got = chain.run(feeds)
        row = {}
        for name in chain.output_names:
            a, b = got[name], ref[name]
            row[name] = (float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()) if a.shape == b.shape
                         else float("inf"))
        out.append(row)
    return out


@torch.no_grad()
def check_fewer_tokens(onnx_dir: Path, stages: dict, blocks, feeds: dict, g: torch.Generator,
                       tol: float = CHAIN_TOL, threads: int = 1) -> list[dict]:
    """Each blocks file on its input minus ``FEWER`` tokens (dropped spread over the grid, token 0 kept) with a
    bias of log(random sizes 1..4) vs its torch module on the same subset."""
    chain = Chain(onnx_dir, stages, threads=threads)
    (h,) = chain.embed.run([HIDDEN_IN], feeds)
    report = []
    for k, (sess, blk) in enumerate(zip(chain.blocks, blocks)):
        t = h.shape[1]
        drop = set(np.linspace(1, t - 1, FEWER).round().astype(int).tolist())
        keep = [i for i in range(t) if i not in drop]
        sub = np.ascontiguousarray(h[:, keep])
        sizes = torch.randint(1, 5, sub.shape[:2], generator=g).to(torch.float32)
        bias = torch.log(sizes).numpy()
        got_h, got_k = sess.run([HIDDEN_OUT, KEYS], {HIDDEN_IN: sub, BIAS: bias})
        ref_h, ref_k = blk(torch.from_numpy(sub), torch.from_numpy(bias))
        d = max(float(np.abs(got_h - ref_h.numpy()).max()), float(np.abs(got_k - ref_k.numpy()).max()))
        if got_h.shape != tuple(ref_h.shape) or not d <= tol:
            raise ExportError(f"{stages['blocks'][k]['stem']}: {len(keep)} of {t} tokens: ORT vs torch {d:g} > {tol:g}")
        report.append({"stem": stages["blocks"][k]["stem"], "tokens": [t, len(keep)], "max_abs_diff": d})
        (h,) = sess.run([HIDDEN_OUT], {HIDDEN_IN: h, BIAS: np.zeros(h.shape[:2], np.float32)})
    return report


# --------------------------------------------------------------------------------------------------------- export
@torch.no_grad()
def export_stages(spec, model, onnx_dir: Path, trace_args: tuple, samples: list[tuple], tokens: int,
                  groups: int = DEFAULT_GROUPS, exporter=export_onnx, tol: float = CHAIN_TOL,
                  threads: int = 1, seed: int = 0) -> tuple[dict, dict]:
    """Export the stage files of a built model into ``onnx_dir`` (next to its ``vision_encoder.onnx``) and check them.

    ``trace_args``: the monolithic encoder's trace inputs (its symbolic axes stay symbolic); ``samples``: encoder
    inputs (tuples in ``spec.vision_inputs`` order) for the checks; ``tokens``: image tokens per view of
    ``image_features``; ``exporter``: ``onnx_parts.export_onnx`` or an exporter with its signature (real size).
    Returns (the manifest's ``stages`` entry, a report with the max abs diffs)."""
    embed, blocks, head, ranges = build_stages(spec, model, groups)
    stages = stages_entry(ranges)
    for args in samples[:1]:
        check_torch(spec, model, embed, blocks, head, ranges, args, tol)

    in_axes = spec.vision_axes(())  # the monolithic encoder's input axes
    x = embed(*trace_args)
    exporter(embed, trace_args, onnx_dir / f"{EMBED_STEM}.onnx", spec.vision_inputs, [HIDDEN_IN],
             {**in_axes, HIDDEN_IN: STAGE_AXES}, fixed_out_dims={HIDDEN_IN: {2: int(x.shape[-1])}})
    g = torch.Generator().manual_seed(seed)
    axes = {HIDDEN_IN: STAGE_AXES, BIAS: STAGE_AXES, HIDDEN_OUT: STAGE_AXES, KEYS: STAGE_AXES}
    for entry, blk in zip(stages["blocks"], blocks):
        bias = torch.log(torch.randint(1, 5, x.shape[:2], generator=g).to(torch.float32))
        exporter(blk, (x, bias), onnx_dir / f"{entry['stem']}.onnx", [HIDDEN_IN, BIAS], [HIDDEN_OUT, KEYS], axes)
        x = blk(x, torch.zeros(x.shape[:2]))[0]
    head_axes = {HIDDEN_IN: {0: "views"}, **{o: {0: spec.vision_batch_axis} for o in spec.vision_outputs[:1]}}
    exporter(head, (x,), onnx_dir / f"{HEAD_STEM}.onnx", [HIDDEN_IN], spec.vision_outputs, head_axes,
             fixed_out_dims={"image_features": {1: tokens}})

    feeds = [{n: a.numpy() for n, a in zip(spec.vision_inputs, args)} for args in samples]
    diffs = chain_vs_monolithic(onnx_dir, stages, feeds, threads=threads)
    worst = max(d for row in diffs for d in row.values())
    if not worst <= tol:
        raise ExportError(f"stages: chained ONNX vs vision_encoder.onnx max abs diff {worst:g} > {tol:g}")
    fewer = check_fewer_tokens(onnx_dir, stages, blocks, feeds[0], g, tol, threads)
    few = ", ".join(f"{r['stem']} {r['tokens'][1]}/{r['tokens'][0]} tokens {r['max_abs_diff']:.3g}" for r in fewer)
    log(f"  stages {[tuple(r) for r in ranges]}: chain vs monolithic max abs diff {worst:.3g} over {len(feeds)} "
        f"samples; fewer tokens: {few}")
    return stages, {"layers": [list(r) for r in ranges], "chain_vs_monolithic": diffs, "fewer_tokens": fewer}
