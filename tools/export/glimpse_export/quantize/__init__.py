"""``quantize``: onnx-community dtype variants of a model folder's ONNX parts (transformers.js ``scripts/quantize.py``).

For each part ``DIR/onnx/<part>.onnx`` (fp32) this writes ``DIR/onnx/<part>_<suffix>.onnx`` next to it. The parts
are, unless ``--parts`` names others, the three onnx-community parts and the staged vision encoder's files named by
``glimpse.json`` ``stages`` (``vision_embed``, ``vision_blocks_K``, ``vision_head``: the same conversion as the
parts, so ``vision_blocks_0_fp16`` goes with ``vision_encoder_fp16``):

* ``fp16``: ``onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=True)`` (graph I/O stays f32),
  op block list = onnxruntime's default (it keeps ``Range``, ``CumSum``, ``Min``, ``Max``, ``TopK``, ``Upsample``, ...
  in f32) plus transformers.js' additions ``Resize``, ``RandomNormalLike`` and ``Cast`` (transformers.js: "without it,
  the graphs produced are invalid").
* ``int8`` / ``uint8`` / ``quantized``: ``onnxruntime.quantization.quantize_dynamic`` with weight type QInt8 / QUInt8
  (per_channel False, reduce_range False, all of onnxruntime's IntegerOps op types: MatMul, Conv, Gather, ...,
  ``extra_options = {EnableSubgraph: True, MatMulConstBOnly: True}`` as transformers.js sets them, so only MatMuls
  with a constant weight are quantized, never Q @ K^T). ``quantized`` picks the weight type the way transformers.js
  does: QUInt8 when the part contains ``Conv`` / ``GroupQueryAttention`` / ``MultiHeadAttention`` (onnxruntime-web
  has no int8-weight ConvInteger), QInt8 otherwise. A stage file gets its ``vision_encoder``'s weight type (the
  same conversion as the part it comes from, whether or not the stage itself holds the patch Conv).
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

from .convert import DEFAULT_PARTS, MODES, op_types, save_model
from .run import main, run_quantize

__all__ = ["MODES", "DEFAULT_PARTS", "run_quantize", "main", "op_types", "save_model"]
