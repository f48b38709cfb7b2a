"""``quantize`` conversions: fp16, 8-bit dynamic (int8 / uint8 / quantized), 4-bit MatMulNBits (q4, q4f16), and
the ONNX helpers they need (op counts, topological sort, saving with or without external data)."""

from __future__ import annotations

import collections
import heapq
from pathlib import Path

import onnx
from onnx.external_data_helper import uses_external_data

from ..common import ExportError

MODES = ("fp16", "int8", "uint8", "quantized", "q4", "q4f16")
DEFAULT_PARTS = ("vision_encoder", "embed_tokens", "decoder_model_merged")
PROTOBUF_LIMIT = 2**31 - 1
# transformers.js float16.py adds these to onnxruntime's float16 DEFAULT_OP_BLOCK_LIST.
EXTRA_FP16_BLOCK = ("Resize", "RandomNormalLike", "Cast")
# transformers.js QUINT8_OPS: a model holding one of these gets QUInt8 weights in the default ("quantized") mode.
QUINT8_OPS = ("Conv", "GroupQueryAttention", "MultiHeadAttention")
Q4_BLOCK = 32


# ----------------------------------------------------------------------------------------------------------- helpers
def op_types(model) -> dict[str, int]:
    """Op type counts over the graph and its subgraphs; non-default domains are prefixed (``com.microsoft.X``)."""
    counts: collections.Counter = collections.Counter()

    def walk(graph):
        for n in graph.node:
            counts[f"{n.domain}.{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type] += 1
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for g in a.graphs:
                        walk(g)

    walk(model.graph)
    return dict(sorted(counts.items()))


def _proto_too_big(model) -> bool:
    try:
        return model.ByteSize() >= PROTOBUF_LIMIT
    except Exception:  # noqa: BLE001  (protobuf refuses to size it at all)
        return True


def _remove_variant(path: Path) -> None:
    for p in [path, *path.parent.glob(path.name + "_data*")]:
        if p.exists():
            p.unlink()


def save_model(model, path: Path, external: str = "auto") -> list[Path]:
    """Save inline when it fits in a protobuf (< 2 GB), else (or with external='always') with ``<file>.onnx_data``."""
    _remove_variant(path)
    use_ext = external == "always" or _proto_too_big(model)
    if use_ext:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + "_data", size_threshold=1024, convert_attribute=False)
        return [path, path.parent / (path.name + "_data")]
    onnx.save_model(model, str(path))
    return [path]


def file_bytes(files: list[Path]) -> int:
    return sum(p.stat().st_size for p in files if p.exists())


def has_external_data(path: Path) -> bool:
    m = onnx.load(str(path), load_external_data=False)
    return any(uses_external_data(t) for t in m.graph.initializer)


def _subgraph_inputs(node) -> set[str]:
    """Names a node's subgraphs read (outer-scope references included: they are dependencies of the node)."""
    names: set[str] = set()
    for a in node.attribute:
        gs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else []
        for g in gs:
            for n in g.node:
                names.update(i for i in n.input if i)
                names |= _subgraph_inputs(n)
    return names


def toposort(graph) -> None:
    """Stable topological sort of ``graph.node`` (and of every subgraph), in place.

    onnxruntime's float16 converter appends its Cast nodes at the end of the node list; ONNX requires topological
    order (onnx.checker and other runtimes reject the graph). transformers.js sorts with onnx-graphsurgeon."""
    nodes = list(graph.node)
    for n in nodes:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                toposort(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    toposort(g)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    deps = []
    users: list[list[int]] = [[] for _ in nodes]
    for i, n in enumerate(nodes):
        d = {producer[x] for x in [*n.input, *_subgraph_inputs(n)] if x in producer and producer[x] != i}
        deps.append(len(d))
        for j in d:
            users[j].append(i)
    ready = [i for i, k in enumerate(deps) if k == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            deps[u] -= 1
            if deps[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        raise ExportError(f"graph {graph.name!r} has a cycle ({len(nodes) - len(order)} nodes unsorted)")
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)


# -------------------------------------------------------------------------------------------------------- converters
def to_fp16(model):
    from onnxruntime.transformers import float16

    block = list(dict.fromkeys([*float16.DEFAULT_OP_BLOCK_LIST, *EXTRA_FP16_BLOCK]))
    out = float16.convert_float_to_float16(model, keep_io_types=True, op_block_list=block,
                                           disable_shape_infer=_proto_too_big(model))
    toposort(out.graph)
    return out


def to_q4(model):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(model, bits=4, block_size=Q4_BLOCK, is_symmetric=True, accuracy_level=None)
    q.process()
    return q.model.model


def weight_type_for(mode: str, model) -> str:
    if mode == "int8":
        return "QInt8"
    if mode == "uint8":
        return "QUInt8"
    return "QUInt8" if any(op in QUINT8_OPS for op in op_types(model)) else "QInt8"


def to_q8(src: Path, weight_type: str, workdir: Path):
    """quantize_dynamic into a scratch file (it only writes to paths), then load the result back."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = workdir / (src.stem + f"_{weight_type}.onnx")
    big = src.stat().st_size >= PROTOBUF_LIMIT or has_external_data(src)
    quantize_dynamic(str(src), str(out), per_channel=False, reduce_range=False,
                     weight_type=getattr(QuantType, weight_type), use_external_data_format=big,
                     extra_options={"EnableSubgraph": True, "MatMulConstBOnly": True})
    return onnx.load(str(out))


def convert(src: Path, mode: str, workdir: Path, like: Path | None = None):
    """Returns (model, notes). ``like``: the file whose ops choose the ``quantized`` weight type (default ``src``;
    a stage file takes its ``vision_encoder``'s, so that it gets the same conversion)."""
    if mode in ("int8", "uint8", "quantized"):
        wt = weight_type_for(mode, onnx.load(str(like or src), load_external_data=False))
        return to_q8(src, wt, workdir), {"weight_type": wt}
    model = onnx.load(str(src))
    if mode == "fp16":
        return to_fp16(model), {}
    q4 = to_q4(model)
    if mode == "q4":
        return q4, {"block_size": Q4_BLOCK, "symmetric": True}
    return to_fp16(q4), {"block_size": Q4_BLOCK, "symmetric": True}
