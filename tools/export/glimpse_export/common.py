"""Environment, determinism and small helpers shared by all commands.

Importing this module sets the offline / threading environment variables, so it must be imported before
``torch`` / ``transformers`` (``__main__`` does that).
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

# No network: nothing may be fetched from a hub. Set before transformers / huggingface_hub are imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Single-threaded BLAS / OpenMP: reproducible reductions (and the models are tiny anyway).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# Needed by torch.use_deterministic_algorithms for some CUDA paths; harmless on CPU.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
# x86-64: the same float kernels on AVX2 and AVX-512 machines. torch's own kernels (ATen) and oneDNN's pick their
# code path by CPU; on an AVX-512 CPU the committed fixtures (made on AVX2) came out ~1e-6 off (image_features,
# logits). Capping both at AVX2 reproduces them bit for bit there too (MKL's choice made no difference).
if platform.machine().lower() in ("x86_64", "amd64"):
    os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_SEED = 0
OPSET = 18
MAX_NEW_TOKENS = 20
PROMPT = "What is in the image?"


class ExportError(RuntimeError):
    """A self-check failed: the export is not trustworthy."""


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (can only be set once per process)
        pass
    torch.use_deterministic_algorithms(True)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Timer:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0
