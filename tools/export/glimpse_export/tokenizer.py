"""A small byte-level BPE tokenizer trained offline on a fixed built-in corpus.

Byte-level BPE (GPT-2 style pre-tokenizer and decoder) so that every string is encodable with no unknown token,
the same kind of ``tokenizer.json`` the real SmolVLM tokenizer is. Training is deterministic for a fixed corpus and
vocabulary size. The special tokens, vocabulary sizes and wrapper arguments of each family are in its
``families/<name>.py``.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = """\
What is in the image? Describe the image in detail.
The image shows a red square, a yellow circle and a green triangle on a blue background.
There is a small picture with a few coloured shapes on a noisy background.
A wide picture with a red box, a yellow ball, a green triangle, a purple bar and a white line.
User: What is in the image? Assistant: The image contains shapes.
USER: What do you see? ASSISTANT: I see a cat sitting on a mat.
What colour is the circle? The circle is yellow.
How many shapes are there? There are three shapes in the picture.
Where is the triangle? The triangle is at the bottom left of the image.
Is there any text in the image? No, there is no text in the image.
A dog runs across the green grass in the park while children play.
The sky is blue and the clouds are white and fluffy.
A photo of a city street at night with bright lights and cars.
Two people are walking along the beach at sunset.
The kitchen table has a bowl of fruit: apples, bananas and oranges.
A close-up of a flower with pink petals and a yellow centre.
The chart shows the number of visitors per month in the year.
Read the text on the sign. The sign says: stop.
Answer the question about the picture in one word.
Can you tell me what the object on the left is?
The model looks at the image tiles and the global view before it answers.
Vision language models read pictures and write text about them.
The quick brown fox jumps over the lazy dog.
One, two, three, four, five, six, seven, eight, nine, ten.
0 1 2 3 4 5 6 7 8 9 10 11 12 16 20 32 64 100 256 512 1024
Hello! How are you today? I am fine, thank you.
This is a test of the tokenizer with some punctuation: (a), [b], {c}; "d" - 'e'.
"""

def train_tokenizer(special: list[str], vocab_size: int, corpus: list[str] | None = None,
                    bos_prefix: str | None = None) -> Tokenizer:
    """Train the byte-level BPE with the family's ``special`` tokens (they get the lowest ids).

    ``corpus`` overrides the built-in corpus (the testbeds train on their question and answer vocabulary); the
    defaults reproduce the tiny models' tokenizers exactly. ``bos_prefix``: a token the post-processor prepends
    (Llama / LLaVA-1.5 style ``<s>``); without one nothing is added (GPT-2 / SmolLM2 / Qwen2 style: the chat template
    writes ``<|im_start|>`` itself)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = corpus if corpus is not None else [line for line in CORPUS.splitlines() if line]
    # Repeat the corpus so that pair counts are well above min_frequency; order is fixed -> deterministic merges.
    tok.train_from_iterator(lines * 3, trainer=trainer)
    if bos_prefix is None:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    else:
        bos = tok.token_to_id(bos_prefix)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_prefix} $A", pair=f"{bos_prefix} $A {bos_prefix} $B", special_tokens=[(bos_prefix, bos)]
        )
    return tok


def wrap_tokenizer(tok: Tokenizer, chat_template: str, attrs: dict[str, str], **kwargs) -> PreTrainedTokenizerFast:
    """``PreTrainedTokenizerFast`` around ``tok``; ``kwargs``: its special tokens and ``model_max_length``;
    ``attrs``: attributes the processors read (``image_token``, ``video_token``), set in order."""
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, chat_template=chat_template, clean_up_tokenization_spaces=False, **kwargs,
    )
    for name, value in attrs.items():
        setattr(fast, name, value)
    return fast
