"""Offline tokenizers with the real special-token ids: a byte-level BPE trained on the built-in corpus, re-numbered
so that the special tokens have the real ids; free ids below the real tokenizer length are filled with
never-produced placeholder tokens ``<|glimpse_unused_N|>``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from ..common import ExportError
from ..families import FamilySpec
from ..tokenizer import CORPUS, wrap_tokenizer

QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _smollm2(tok: Tokenizer) -> None:
    """SmolLM2: individual digits, then GPT-2 byte-level split."""
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])


def _qwen2(tok: Tokenizer) -> None:
    """Qwen2: NFC, regex split, byte-level without its own regex."""
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


@dataclass(frozen=True)
class RealTokenizer:
    special: dict[str, int]  # special token -> real id
    length: int  # tokenizer length (may be below the model's vocab)
    pre_tokenize: Callable[[Tokenizer], None]  # sets the normalizer / pre-tokenizer
    wrap_kwargs: dict = field(default_factory=dict)  # PreTrainedTokenizerFast arguments


# SmolLM2 / SmolVLM special tokens at their real ids (tokenizer.json added_tokens)
SMOLLM2 = RealTokenizer(
    special={
        "<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2,
        "<global-img>": 49152,
        **{f"<row_{r}_col_{c}>": 49153 + (r - 1) * 6 + (c - 1) for r in range(1, 7) for c in range(1, 7)},
        "<fake_token_around_image>": 49189,
        "<image>": 49190,
        **{f"<|reserved_special_token_{i}|>": 49191 + i for i in range(88)},
        "<end_of_utterance>": 49279,
    },
    length=49280,
    pre_tokenize=_smollm2,
    wrap_kwargs=dict(bos_token="<|im_start|>", eos_token="<end_of_utterance>", pad_token="<|im_end|>",
                     unk_token="<|endoftext|>", model_max_length=8192,
                     additional_special_tokens=["<fake_token_around_image>", "<image>", "<end_of_utterance>"]),
)
# Qwen2 special tokens + the two llava-hf added ones; the model's vocab (152000) is larger: ids above are never produced
QWEN2 = RealTokenizer(
    special={"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<image>": 151646,
             "<video>": 151647},
    length=151648,
    pre_tokenize=_qwen2,
    wrap_kwargs=dict(eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=32768,
                     additional_special_tokens=["<|im_start|>", "<|im_end|>", "<image>", "<video>"]),
)


def build_tokenizer(real: RealTokenizer) -> Tokenizer:
    """Byte-level BPE trained on the built-in corpus, re-numbered so that the special tokens have the real ids."""
    special, length = real.special, real.length
    tok = Tokenizer(models.BPE())
    real.pre_tokenize(tok)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, min_frequency=2, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    lines = [line for line in CORPUS.splitlines() if line]
    tok.train_from_iterator(lines * 3, trainer=trainer)

    spec = json.loads(tok.to_str())
    trained = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    taken = set(special.values())
    vocab = dict(special)
    free = (i for i in range(length) if i not in taken)
    for token, _ in trained:
        vocab[token] = next(free)
    for i in free:
        vocab[f"<|glimpse_unused_{i}|>"] = i
    assert len(vocab) == length and sorted(vocab.values()) == list(range(length))
    spec["model"]["vocab"] = vocab
    spec["added_tokens"] = []
    out = Tokenizer.from_str(json.dumps(spec))
    out.post_processor = processors.ByteLevel(trim_offsets=False)
    out.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    for t, i in special.items():
        if out.token_to_id(t) != i:
            raise ExportError(f"tokenizer: {t} has id {out.token_to_id(t)}, expected {i}")
    if out.get_vocab_size(with_added_tokens=True) != length:
        raise ExportError(f"tokenizer: {out.get_vocab_size(with_added_tokens=True)} tokens, expected {length}")
    return out


def real_tokenizer(family: FamilySpec, real: RealTokenizer):
    """The wrapped tokenizer (the family's chat template and tokenizer attributes)."""
    return wrap_tokenizer(build_tokenizer(real), family.chat_template, family.tokenizer_attrs, **real.wrap_kwargs)
