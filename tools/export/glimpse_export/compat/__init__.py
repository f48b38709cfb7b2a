"""``compat``: a corpus of small random-weight model folders exported the way OTHER tools export them (plain
``torch.onnx.export`` with transformers' own masks, the dynamo exporter, external data, dtype-only decoders, a
LLaVA-OneVision encoder without ``image_newline``, ...), each with transformers fixtures, under ``models/compat/``.

``styles.py``: the styles (configs, exporter, notes); ``build.py``: models, processors and the HF files;
``export.py``: the exporters; ``verify.py``: the onnxruntime greedy loop over each folder's files;
``pipeline.py``: ``run_compat`` (build, export, verify, fixtures, README, size table).
"""
