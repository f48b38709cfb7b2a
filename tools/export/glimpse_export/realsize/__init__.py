"""The ``realsize`` command: real-size random-weight models for timing (no download).

Builds the exact architecture of SmolVLM-256M-Instruct, SmolVLM-500M-Instruct or LLaVA-OneVision-0.5B
(llava-hf/llava-onevision-qwen2-0.5b-ov-hf) from configs written in ``archs`` (values of the published
``config.json`` / ``preprocessor_config.json`` / ``processor_config.json`` files), with seeded random weights, an
offline byte-level BPE tokenizer whose special tokens sit at the real ids (``tokenizer``), and exports the three
onnx-community parts (fp32) with the families' wrappers (``export``). Weights of a part above the 2 GiB protobuf
limit go to ``<file>.onnx_data`` next to the ``.onnx``; smaller parts keep them inside.

Self-check (``check``): onnxruntime runs every part once on a real-size input and must match the torch model within
1e-3 (vision features, token embeddings, decoder logits of a prefill with empty past and of one decode step).
"""
