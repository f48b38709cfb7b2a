"""``FamilySpec``: everything that differs between the model families, and ``Bundle``, a built model with its
processor.

Each family (``smolvlm`` = Idefics3, ``llava``, ``llava_onevision``) is one subclass in ``families/<name>.py``. The
products (tiny fixtures, testbeds, real-size exports, signals) ask the spec instead of branching on the family name:
tokenizer and chat template, processor and model config builders (sizes come from the product), where the vision
tower / connector / text model sit, how image features are computed and checked, and the vision encoder's ONNX
wrapper, inputs and dynamic axes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoProcessor, GenerationConfig, LlamaConfig

from ..common import seed_everything
from ..tokenizer import train_tokenizer, wrap_tokenizer

# Tiny sizes of the text model, the same Llama-shaped model for every family.
TINY_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    initializer_range=0.1,  # larger than the usual 0.02: clear argmax margins for greedy decoding
    tie_word_embeddings=False,
)


@dataclass
class Bundle:
    spec: "FamilySpec"
    seed: int
    model: Any
    processor: Any
    tokenizer: Any
    chat_template: str
    image_token_id: int
    eos_token_ids: list[int]
    extra: dict = field(default_factory=dict)

    @property
    def family(self) -> str:
        """The model type ("idefics3", "llava", "llava_onevision"), as written to fixtures and export_info.json."""
        return self.spec.family

    @property
    def text_config(self):
        return self.model.config.text_config


def finish_model(model):
    """Inference mode for export: eval, eager attention, no gradients."""
    model.eval()
    model.set_attn_implementation("eager")
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class FamilySpec:
    """One model family. Class attributes are data; methods build or read the family's modules.

    ``sizes`` (a dict) is what a product chooses for a family: ``vision`` (the vision config's keyword arguments)
    and family-specific entries (Idefics3: ``scale_factor``, ``longest_edge``; LLaVA-OneVision: ``pinpoints``,
    ``tie_word_embeddings``)."""

    name = ""  # registry key and CLI name ("smolvlm")
    family = ""  # model type ("idefics3"), Bundle.family
    aliases: tuple[str, ...] = ()  # other names ``families.get`` accepts
    chat_template = ""
    # tokenizer
    special_tokens: list[str] = []
    tokenizer_vocab = 0
    bos_prefix: str | None = None  # token the tokenizer's post-processor prepends (None: nothing)
    tokenizer_kwargs: dict = {}  # PreTrainedTokenizerFast special-token arguments
    tokenizer_attrs: dict = {}  # attributes set on the wrapped tokenizer (image_token, ...)
    text_tokens: tuple[str | None, str, str] = (None, "", "")  # bos, eos, pad of the text config
    text_config_extra: dict = {}
    # model
    has_cls = False  # the vision tower has a CLS token in its hidden states
    packs_features = False  # the runtime arranges the encoder's per-crop features (LLaVA-OneVision)
    tiny_extra_images: tuple[str, ...] = ()  # committed models/images/<name>.png used as extra tiny cases
    tiny_sizes: dict = {}
    # vision_encoder.onnx
    vision_inputs: tuple[str, ...] = ("pixel_values",)
    vision_outputs: tuple[str, ...] = ("image_features",)
    vision_input_axes: dict = {}
    vision_batch_axis = ""  # dim-0 name of image_features (and of every signal output)
    signals: tuple[str, ...] = ()  # pruning signals its signals wrapper returns, in output order

    # ------------------------------------------------------------------------------------------------ tokenizer
    def tokenizer(self, corpus: list[str] | None = None, vocab_size: int | None = None):
        """The family's trained BPE, wrapped (defaults: the tiny models' corpus and size)."""
        tok = train_tokenizer(self.special_tokens, vocab_size or self.tokenizer_vocab, corpus, self.bos_prefix)
        return wrap_tokenizer(tok, self.chat_template, self.tokenizer_attrs, model_max_length=512,
                              **self.tokenizer_kwargs)

    # ----------------------------------------------------------------------------------------------- builders
    def model_class(self):
        raise NotImplementedError

    def text_config_class(self):
        return LlamaConfig

    def text_config(self, tok, sizes: dict):
        bos, eos, pad = self.text_tokens
        return self.text_config_class()(
            vocab_size=len(tok),
            bos_token_id=None if bos is None else tok.convert_tokens_to_ids(bos),
            eos_token_id=tok.convert_tokens_to_ids(eos),
            pad_token_id=tok.convert_tokens_to_ids(pad),
            **self.text_config_extra,
            **sizes,
        )

    def processor(self, tok, sizes: dict) -> tuple[Any, int]:
        """(processor, image tokens per view)."""
        raise NotImplementedError

    def model_config(self, text_config, image_token_id: int, tok, sizes: dict):
        raise NotImplementedError

    def generation_config(self, text_config, eos: list[int]):
        return GenerationConfig(bos_token_id=text_config.bos_token_id, eos_token_id=eos,
                                pad_token_id=text_config.pad_token_id)

    def build_tiny(self, seed: int) -> Bundle:
        """The tiny random-weight model of this family (``tiny`` / ``check``)."""
        tok = self.tokenizer()
        image_token_id = tok.convert_tokens_to_ids("<image>")
        eos = tok.convert_tokens_to_ids(self.text_tokens[1])
        processor, seq = self.processor(tok, self.tiny_sizes)
        config = self.model_config(self.text_config(tok, TINY_TEXT), image_token_id, tok, self.tiny_sizes)
        seed_everything(seed)
        model = finish_model(self.model_class()(config))
        model.generation_config = self.generation_config(config.text_config, [eos])
        return Bundle(self, seed, model, processor, tok, self.chat_template, image_token_id, [eos],
                      extra=dict(image_seq_len=seq))

    def load_processor(self, folder: Path):
        return AutoProcessor.from_pretrained(str(folder))

    def saved_image_seq_len(self, processor, config: dict) -> int:
        """Image tokens per view of a saved folder (its processor and config.json)."""
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------- model structure
    def vision_tower(self, model):
        raise NotImplementedError

    def connector(self, model):
        raise NotImplementedError

    def text_model(self, model):
        raise NotImplementedError

    def vision_hidden(self, model, pv: torch.Tensor):
        """(encoder states the features come from [views, patches(+CLS), D], pooled CLS or None)."""
        raise NotImplementedError

    def project(self, model, hid: torch.Tensor) -> torch.Tensor:
        """Connector on ``vision_hidden``'s states: [views, tokens, text hidden]."""
        raise NotImplementedError

    def patch_states(self, hid: torch.Tensor) -> torch.Tensor:
        """The per-patch rows of ``vision_hidden``'s states (CLS dropped)."""
        return hid

    def token_merge(self, config) -> int:
        """Patches per side merged into one LLM image token (the pixel shuffle's scale factor)."""
        return 1

    def center_connector(self, model, hid: torch.Tensor) -> None:
        """Re-initialise the connector so that its output on ``hid`` has zero mean over image tokens."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ image features
    def image_features(self, model, inputs) -> torch.Tensor:
        """[n_image_tokens, hidden]: exactly the rows transformers splices into the ``<image>`` positions."""
        raise NotImplementedError

    def view_features(self, model, inputs) -> torch.Tensor:
        """What ``vision_encoder.onnx`` returns as ``image_features``: [views, tokens, hidden]."""
        raise NotImplementedError

    def layout(self, processor, image) -> dict | None:
        """The tile layout recorded in the fixtures (None: the family has none)."""
        return None

    def encoder_pixels(self, pixel_values):
        """The processor's pixel_values as the vision encoder takes them."""
        return pixel_values

    def packer(self, model, image_sizes):
        """``pack(features, newline)`` arranging the ONNX encoder's outputs as the model does, or None."""
        return None

    # -------------------------------------------------------------------------------------- vision_encoder.onnx
    def vision_wrapper(self, model):
        raise NotImplementedError

    def signals_wrapper(self, model):
        raise NotImplementedError(f"{self.name}: no pruning-signal outputs")

    def vision_axes(self, outputs) -> dict:
        """dynamic_axes of the vision part: the inputs', then dim 0 of each of ``outputs``."""
        return {**self.vision_input_axes, **{o: {0: self.vision_batch_axis} for o in outputs}}

    def vision_args(self, sample) -> tuple:
        """The encoder's inputs from a processor output (batch 1)."""
        return (sample["pixel_values"],)

    def vision_trace_args(self, sample) -> tuple:
        """Trace inputs built from a processor output so that the dynamic axes stay symbolic."""
        raise NotImplementedError

    def vision_feeds(self, sample) -> dict:
        """onnxruntime feeds of the encoder for a processor output."""
        return {n: a.numpy() for n, a in zip(self.vision_inputs, self.vision_args(sample))}

    def random_vision_inputs(self, g: torch.Generator, shape: tuple[int, ...]) -> dict:
        """Seeded encoder inputs of ``shape`` (pixel_values in [-1, 1], an all-true pixel_attention_mask)."""
        inputs = {"pixel_values": torch.rand(*shape, generator=g) * 2 - 1}
        if "pixel_attention_mask" in self.vision_inputs:
            inputs["pixel_attention_mask"] = torch.ones(*shape[:-3], *shape[-2:], dtype=torch.bool)
        return inputs

    def check_vision_wrapper(self, model, vision, sample) -> None:
        """Raise ExportError unless ``vision`` reproduces transformers' image features on ``sample``."""
        raise NotImplementedError

    def reference_signals(self, model, sample) -> dict:
        """Signals from transformers' ``output_attentions`` (independent of the wrappers)."""
        raise NotImplementedError
