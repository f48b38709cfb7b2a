"""``quantize``: onnx-community dtype variants of a model folder's ONNX parts (transformers.js ``scripts/quantize.py``).

For each part ``DIR/onnx/<part>.onnx`` (fp32) this writes ``DIR/onnx/<part>_<suffix>.onnx`` next to it:

* ``fp16``: ``onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=True)`` (graph I/O stays f32),
  op block list = onnxruntime's default (it keeps ``Range``, ``CumSum``, ``Min``, ``Max``, ``TopK``, ``Upsample``, ...
  in f32) plus transformers.js' additions ``Resize``, ``RandomNormalLike`` and ``Cast`` (transformers.js: "without it,
  the graphs produced are invalid").
* ``int8`` / ``uint8`` / ``quantized``: ``onnxruntime.quantization.quantize_dynamic`` with weight type QInt8 / QUInt8
  (per_channel False, reduce_range False, all of onnxruntime's IntegerOps op types: MatMul, Conv, Gather, ...,
  ``extra_options = {EnableSubgraph: True, MatMulConstBOnly: True}`` as transformers.js sets them, so only MatMuls
  with a constant weight are quantized, never Q @ K^T). ``quantized`` picks the weight type the way transformers.js
  does: QUInt8 when the part contains ``Conv`` / ``GroupQueryAttention`` / ``MultiHeadAttention`` (onnxruntime-web
  has no int8-weight ConvInteger), QInt8 otherwise.
* ``q4``: ``MatMulNBitsQuantizer`` (4 bits, block 32, symmetric, accuracy_level None) -> ``com.microsoft.MatMulNBits``
  for MatMuls with a constant weight; nothing else changes.
* ``q4f16``: ``q4`` and then the ``fp16`` conversion.

``embed_tokens`` is a single Gather on the embedding table. The variants are written for it too (like transformers.js,
which runs every mode on every file): int8/uint8/quantized quantize the table itself (onnxruntime's Gather quantizer:
an 8-bit table, per-tensor scale, Gather followed by DequantizeLinear); q4 leaves the graph as it is (MatMulNBits
covers MatMul only), so ``embed_tokens_q4`` is the fp32 part; fp16 / q4f16 hold an f16 table and a Cast to f32.

Files whose serialized size is 2 GB or more (the protobuf limit), or all with ``--external-data always``, are saved
with their tensors in ``<file>.onnx_data`` next to them (relative location, one file).

Every file written is loaded by onnxruntime (all graph optimizations and none) and run on a synthetic sample
(seeded); its outputs are compared with the fp32 part's (max abs diff, that divided by max |ref|, and for logits the
share of positions whose argmax agrees). The op types each variant contains are reported.
"""

from __future__ import annotations

import collections
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import ExportError, log

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
    import onnx

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
    import onnx

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
    import onnx
    from onnx.external_data_helper import uses_external_data

    m = onnx.load(str(path), load_external_data=False)
    return any(uses_external_data(t) for t in m.graph.initializer)


def _subgraph_inputs(node) -> set[str]:
    """Names a node's subgraphs read (outer-scope references included: they are dependencies of the node)."""
    import onnx

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
    import heapq

    import onnx

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
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = workdir / (src.stem + f"_{weight_type}.onnx")
    big = src.stat().st_size >= PROTOBUF_LIMIT or has_external_data(src)
    quantize_dynamic(str(src), str(out), per_channel=False, reduce_range=False,
                     weight_type=getattr(QuantType, weight_type), use_external_data_format=big,
                     extra_options={"EnableSubgraph": True, "MatMulConstBOnly": True})
    return onnx.load(str(out))


def convert(src: Path, mode: str, workdir: Path):
    """Returns (model, notes)."""
    import onnx

    if mode in ("int8", "uint8", "quantized"):
        wt = weight_type_for(mode, onnx.load(str(src), load_external_data=False))
        return to_q8(src, wt, workdir), {"weight_type": wt}
    model = onnx.load(str(src))
    if mode == "fp16":
        return to_fp16(model), {}
    q4 = to_q4(model)
    if mode == "q4":
        return q4, {"block_size": Q4_BLOCK, "symmetric": True}
    return to_fp16(q4), {"block_size": Q4_BLOCK, "symmetric": True}


# -------------------------------------------------------------------------------------------------------- self-check
_DIMS = {"batch_size": 1, "batch": 1, "num_images": 2, "sequence_length": 6, "seq": 6,
         "past_sequence_length": 4, "past": 4}


def _np_dtype(ort_type: str):
    return {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
            "tensor(int32)": np.int32, "tensor(bool)": np.bool_, "tensor(uint8)": np.uint8}[ort_type]


def _shape(inp, dims: dict) -> list[int]:
    out = []
    for d in inp.shape:
        if isinstance(d, int) and d >= 0:
            out.append(d)
        else:
            out.append(dims.get(str(d), 1))
    return out


def _session(path: Path, opt: str):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if opt == "all"
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def sample_inputs(sess, part: str, onnx_dir: Path, vocab: int, seed: int = 0) -> dict:
    """Seeded synthetic inputs from the session's input metadata (dims: batch 1, 2 tiles, seq 6, past 4)."""
    rng = np.random.default_rng(seed)
    dims = dict(_DIMS)
    dims["total_sequence_length"] = dims["sequence_length"] + dims["past_sequence_length"]
    feeds = {}
    for inp in sess.get_inputs():
        shape, dt, name = _shape(inp, dims), _np_dtype(inp.type), inp.name
        if name == "pixel_values":
            feeds[name] = rng.uniform(-1, 1, shape).astype(dt)
        elif name == "pixel_attention_mask" or name == "attention_mask":
            feeds[name] = np.ones(shape, dt)
        elif name == "input_ids":
            feeds[name] = rng.integers(0, vocab, shape).astype(dt)
        elif name == "position_ids":
            p, s = dims["past_sequence_length"], dims["sequence_length"]
            feeds[name] = np.broadcast_to(np.arange(p, p + s), shape).astype(dt).copy()
        elif name == "use_cache_branch":
            feeds[name] = np.ones(shape, dt)
        elif name == "inputs_embeds":
            embed = onnx_dir / "embed_tokens.onnx"
            if embed.exists():
                es = _session(embed, "all")
                ids = rng.integers(0, vocab, shape[:2]).astype(np.int64)
                feeds[name] = es.run(None, {es.get_inputs()[0].name: ids})[0].astype(dt)
            else:
                feeds[name] = rng.normal(0, 1, shape).astype(dt)
        elif dt in (np.float32, np.float16):
            feeds[name] = rng.normal(0, 1, shape).astype(dt)
        elif dt == np.bool_:
            feeds[name] = np.ones(shape, dt)
        else:
            feeds[name] = np.zeros(shape, dt)
    return feeds


def compare(ref: dict, got: dict) -> dict:
    res = {}
    for k, r in ref.items():
        g = got[k]
        if r.shape != g.shape:
            res[k] = {"error": f"shape {g.shape} != {r.shape}"}
            continue
        r64, g64 = r.astype(np.float64), g.astype(np.float64)
        d = float(np.max(np.abs(r64 - g64))) if r.size else 0.0
        scale = float(np.max(np.abs(r64))) if r.size else 0.0
        e = {"max_abs": d, "rel": d / scale if scale else d, "finite": bool(np.isfinite(g64).all())}
        if k == "logits" and r.ndim >= 2 and r.size:
            e["argmax_agree"] = float(np.mean(np.argmax(r, -1) == np.argmax(g, -1)))
        res[k] = e
    return res


def _vocab(model_dir: Path) -> int:
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
        return int((cfg.get("text_config") or {}).get("vocab_size") or cfg.get("vocab_size"))
    except Exception:  # noqa: BLE001
        return 100


def self_check(ref_path: Path, var_path: Path, part: str, vocab: int) -> dict:
    ref_sess = _session(ref_path, "all")
    feeds = sample_inputs(ref_sess, part, ref_path.parent, vocab)
    names = [o.name for o in ref_sess.get_outputs()]
    ref = dict(zip(names, ref_sess.run(None, feeds)))
    out = {}
    for opt in ("all", "none"):
        try:
            s = _session(var_path, opt)
            out[f"ort_opt_{opt}"] = compare(ref, dict(zip(names, s.run(names, feeds))))
        except Exception as e:  # noqa: BLE001  (report what onnxruntime refused)
            out[f"ort_opt_{opt}"] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
    return out


def summarize(check: dict) -> str:
    parts = []
    for opt, c in check.items():
        if "error" in c:
            parts.append(f"{opt}: ERROR {c['error'][:120]}")
            continue
        worst = max(c.items(), key=lambda kv: kv[1].get("rel", float("inf")))
        s = f"{opt}: worst {worst[0]} max_abs {worst[1].get('max_abs', float('nan')):.3g} rel {worst[1].get('rel', float('nan')):.3g}"
        if "logits" in c and "argmax_agree" in c["logits"]:
            s += f", logits max_abs {c['logits']['max_abs']:.3g} argmax {c['logits']['argmax_agree']:.2f}"
        parts.append(s)
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------------------------- run
def _quiet_ort_logging() -> None:
    """onnxruntime.quantization sets the root logger to INFO and logs every node; keep warnings only."""
    import logging

    import onnxruntime.quantization  # noqa: F401  (its import configures logging)
    from onnxruntime.quantization import matmul_nbits_quantizer  # noqa: F401

    logging.getLogger().setLevel(logging.WARNING)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("onnxruntime"):
            logging.getLogger(name).setLevel(logging.WARNING)


def run_quantize(model_dir: Path, modes: list[str], parts: list[str] | None, external: str = "auto",
                 check: bool = True) -> dict:
    import onnx

    _quiet_ort_logging()

    onnx_dir = model_dir / "onnx"
    if not onnx_dir.is_dir():
        raise ExportError(f"{onnx_dir} does not exist")
    parts = list(parts or [p for p in DEFAULT_PARTS if (onnx_dir / f"{p}.onnx").exists()])
    vocab = _vocab(model_dir)
    report = {"model": str(model_dir), "modes": modes, "parts": parts, "results": []}
    failures = []
    with tempfile.TemporaryDirectory(prefix="glimpse-quant-") as td:
        for part in parts:
            src = onnx_dir / f"{part}.onnx"
            if not src.exists():
                raise ExportError(f"{src} does not exist")
            src_files = [src, *sorted(onnx_dir.glob(src.name + "_data*"))]
            src_ops = op_types(onnx.load(str(src), load_external_data=False))
            for mode in modes:
                t0 = time.perf_counter()
                dst = onnx_dir / f"{part}_{mode}.onnx"
                log(f"quantize: {src.name} -> {dst.name}")
                model, notes = convert(src, mode, Path(td))
                ops = op_types(model)
                files = save_model(model, dst, external)
                del model
                convert_s = time.perf_counter() - t0
                entry = {"part": part, "mode": mode, "file": dst.name, "files": [f.name for f in files],
                         "bytes": file_bytes(files), "fp32_bytes": file_bytes(src_files), **notes,
                         "convert_s": round(convert_s, 2),
                         "ops_added": sorted(set(ops) - set(src_ops)), "ops_removed": sorted(set(src_ops) - set(ops)),
                         "ops": ops}
                try:
                    onnx.checker.check_model(str(dst))
                    entry["onnx_checker"] = "ok"
                except Exception as e:  # noqa: BLE001
                    entry["onnx_checker"] = f"{type(e).__name__}: {str(e)[:300]}"
                    failures.append(f"{dst.name} (onnx.checker)")
                if check:
                    t1 = time.perf_counter()
                    entry["check"] = self_check(src, dst, part, vocab)
                    entry["check_s"] = round(time.perf_counter() - t1, 2)
                    log(f"  {entry['bytes']} bytes, +ops {entry['ops_added']}; {summarize(entry['check'])}")
                    for opt, c in entry["check"].items():
                        if "error" in c or not all(v.get("finite", False) for v in c.values()):
                            failures.append(f"{dst.name} ({opt})")
                # ORT's quantizers leave scratch files around; keep the temp dir small.
                for p in Path(td).iterdir():
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
                report["results"].append(entry)
    report["failures"] = failures
    return report


def print_table(report: dict) -> None:
    log(f"{'file':44s} {'bytes':>12s} {'fp32':>12s}  self-check")
    for e in report["results"]:
        chk = summarize(e["check"]) if "check" in e else "-"
        log(f"{e['file']:44s} {e['bytes']:12d} {e['fp32_bytes']:12d}  {chk}")
    if report["failures"]:
        log(f"FAILED: {', '.join(report['failures'])}")


def main(model: Path, to: list[str], parts: list[str] | None, external: str, check: bool, json_out: Path | None) -> int:
    t0 = time.perf_counter()
    report = run_quantize(model, to, parts, external, check)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    print_table(report)
    text = json.dumps(report, indent=1)
    if json_out:
        json_out.write_text(text)
    else:
        print(text)
    return 2 if report["failures"] else 0


__all__ = ["MODES", "DEFAULT_PARTS", "run_quantize", "main", "op_types", "save_model"]
