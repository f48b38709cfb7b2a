"""A small byte-level BPE tokenizer trained offline on a fixed built-in corpus.

Byte-level BPE (GPT-2 style pre-tokenizer and decoder) so that every string is encodable with no unknown token,
the same kind of ``tokenizer.json`` the real SmolVLM tokenizer is. Training is deterministic for a fixed corpus and
vocabulary size.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

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

SMOLVLM_SPECIAL_TOKENS = (
    ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>", "<global-img>"]
    + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
)
LLAVA_SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<image>"]
# Qwen2 / LLaVA-OneVision: no BOS; <|im_end|> ends a turn.
ONEVISION_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
SPECIAL_TOKENS = {"idefics3": SMOLVLM_SPECIAL_TOKENS, "llava": LLAVA_SPECIAL_TOKENS,
                  "llava_onevision": ONEVISION_SPECIAL_TOKENS}

VOCAB_SIZE = {"idefics3": 512, "llava": 480, "llava_onevision": 480}


def train_tokenizer(family: str, corpus: list[str] | None = None, vocab_size: int | None = None) -> Tokenizer:
    """Train the byte-level BPE for ``family`` ("idefics3" or "llava"); special tokens get the lowest ids.

    ``corpus`` / ``vocab_size`` override the built-in corpus and size (the testbeds train on their question and
    answer vocabulary); the defaults reproduce the tiny models' tokenizers exactly."""
    special = SPECIAL_TOKENS[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size or VOCAB_SIZE[family],
        min_frequency=2,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = corpus if corpus is not None else [line for line in CORPUS.splitlines() if line]
    # Repeat the corpus so that pair counts are well above min_frequency; order is fixed -> deterministic merges.
    tok.train_from_iterator(lines * 3, trainer=trainer)
    if family in ("idefics3", "llava_onevision"):
        # GPT-2 / SmolLM2 / Qwen2 style: no BOS/EOS is added; the chat template writes <|im_start|> itself.
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    else:
        # Llama style (LLaVA-1.5): the tokenizer prepends <s>.
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
        )
    return tok


def wrap_tokenizer(family: str, tok: Tokenizer, chat_template: str):
    from transformers import PreTrainedTokenizerFast

    if family == "idefics3":
        kwargs = dict(
            bos_token="<|im_start|>",
            eos_token="<end_of_utterance>",
            pad_token="<|endoftext|>",
            unk_token="<|endoftext|>",
            additional_special_tokens=[t for t in SMOLVLM_SPECIAL_TOKENS if t not in ("<|endoftext|>", "<|im_start|>")],
        )
    elif family == "llava_onevision":
        kwargs = dict(
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            additional_special_tokens=["<|im_start|>", "<|im_end|>", "<image>", "<video>"],
        )
    else:
        kwargs = dict(
            bos_token="<s>",
            eos_token="</s>",
            pad_token="<pad>",
            additional_special_tokens=["<image>"],
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, chat_template=chat_template, model_max_length=512, clean_up_tokenization_spaces=False,
        **kwargs,
    )
    if family in ("llava", "llava_onevision"):
        fast.image_token = "<image>"
    if family == "llava_onevision":
        fast.video_token = "<video>"
    return fast
