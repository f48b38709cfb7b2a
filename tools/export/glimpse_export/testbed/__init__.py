"""Accuracy testbeds: small Idefics3 (SmolVLM-style) and LLaVA models trained on synthetic scenes.

Build (real transformers classes, small configs) -> stage 1: vision encoder alone with dense per-patch supervision
(colour / shape / digit / object-centre / own coordinates of every patch, plus image-level presence on CLIP's CLS)
-> stage 2: connector + decoder (encoder frozen at first, then fine-tuned with the auxiliary loss kept on) on
questions rendered exactly as at inference (chat template, one image, answer + EOS) -> save weights + export with the
same exporter as the tiny models. Auxiliary heads live outside the HF model and are never exported.

Modules: ``config`` (sizes, seeds, per-testbed view layout), ``model`` (build / load / save, initialisations,
auxiliary heads), ``data`` (fast preprocessing, prompts, scene batches, packed sequences, encoded pools),
``losses``, ``train`` (``train`` / ``snapshot``, stages 1 and 1b), ``stage2`` (the two stage-2 loops), ``eval``
(``evalset`` / ``hf-eval``), ``sequence`` (``scenestream``), ``export`` (``export-testbed``).
"""
