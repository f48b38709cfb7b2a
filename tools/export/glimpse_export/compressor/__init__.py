"""``export-compressor``: tiny random-weight LLMLingua-2 prompt compressors (token classifiers) for the Rust side.

``--arch xlm-roberta`` (XLMRobertaForTokenClassification, Unigram/``▁`` tokenizer, llmlingua's
``xlm-roberta-large`` rules) or ``--arch bert`` (BertForTokenClassification, WordPiece/``##``,
``bert-base-multilingual-cased`` rules); num_labels 2, label 1 = keep. Modules: ``tokenizer`` (offline
vocabularies), ``model`` (the classifier and its calibration), ``export`` (folder, ONNX, onnxruntime check,
``compressor.json``), ``cl100k`` (tiktoken's table offline), ``fixtures`` (llmlingua's own outputs), ``pipeline``.
The algorithm llmlingua runs is written down in ``ALGORITHM.md`` beside this file.
"""
