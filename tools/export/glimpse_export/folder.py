"""The Hugging Face files of a model folder (config, generation config, processor, tokenizer, chat template) and
``export_info.json``, written the same way for every product."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import onnxruntime
import tokenizers
import torch
import transformers

from . import __version__
from .common import MAX_NEW_TOKENS, OPSET
from .families import Bundle


def save_folder(bundle: Bundle, out: Path) -> None:
    proc = bundle.processor
    proc.save_pretrained(str(out))
    # transformers 5 nests the image processor in processor_config.json; also write the classic standalone file
    proc.image_processor.save_pretrained(str(out))
    cfg = bundle.model.config
    cfg.architectures = [type(bundle.model).__name__]
    cfg.save_pretrained(str(out))
    bundle.model.generation_config.save_pretrained(str(out))
    # A Rust reader can always find the template in tokenizer_config.json
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text(encoding="utf-8"))
    tc["chat_template"] = bundle.chat_template
    tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")
    if (out / "model.safetensors").exists():
        (out / "model.safetensors").unlink()


def library_versions() -> dict:
    """The versions of the libraries every export depends on, for ``export_info.json``."""
    return {
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def write_export_info(out: Path, bundle: Bundle) -> None:
    info = {
        "tool": f"glimpse_export {__version__}",
        "family": bundle.family,
        "seed": bundle.seed,
        "opset": OPSET,
        "exporter": "torch.onnx.export(dynamo=False, dynamic_axes)",
        "max_new_tokens": MAX_NEW_TOKENS,
        "versions": library_versions(),
    }
    (out / "export_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
