"""The tiny compressors' tokenizers, trained offline with ``tokenizers`` on a fixed built-in corpus (deterministic).

* ``xlm-roberta``: a Unigram (SentencePiece-style) model with XLM-R's special tokens in XLM-R's order
  (``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3, then ``<mask>``), NFKC + ``[\\t\\r\\n]`` -> space + runs of
  spaces -> one space (what XLM-R's precompiled ``nmt_nfkc`` charsmap does to whitespace), ``Metaspace`` pre-tokenizer
  and decoder (``▁``, prepend always), ``RobertaProcessing`` post-processor. No byte fallback: a character the
  model has never seen becomes ``<unk>``.
* ``bert``: a WordPiece model (``##`` continuation prefix) with BERT's special tokens (``[PAD]`` 0, ``[UNK]`` 1,
  ``[CLS]`` 2, ``[SEP]`` 3, ``[MASK]`` 4), ``BertNormalizer(lowercase=False)`` (cased, like
  bert-base-multilingual-cased), ``BertPreTokenizer``, ``WordPiece`` decoder (cleanup on), ``[CLS] $A [SEP]``.

Both then get ``[NEW0]`` .. ``[NEW99]`` as extra special tokens at the end of the vocabulary: these are the tokens
``llmlingua``'s ``init_llmlingua2`` adds (``max_force_token`` = 100). Because the saved tokenizer already has them,
llmlingua adds nothing and its ``resize_token_embeddings`` is a no-op, so the model llmlingua runs is exactly the one
in ``onnx/model.onnx`` and the vocabulary size of the model equals the tokenizer's (``len(tokenizer)``).
"""

from __future__ import annotations

import re

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from ..tokenizer import CORPUS as VLM_CORPUS

N_FORCE_TOKENS = 100  # llmlingua2_config["max_force_token"] default
FORCE_TOKEN_NAMES = [f"[NEW{i}]" for i in range(N_FORCE_TOKENS)]

XLMR_SPECIAL = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
BERT_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

# Meeting-transcript style text (LLMLingua-2 was distilled on MeetingBank) plus the VLM corpus. Deliberately small:
# many words of the fixture prompts are split into several pieces, which is what the word merging must handle.
CORPUS = VLM_CORPUS + """\
Good evening, everyone. The meeting of the city council is now called to order.
Item number 12 on the agenda is the budget for the next fiscal year, about 4.5 million dollars.
Council member Smith moved to approve the report; council member Lee seconded the motion.
All those in favour say aye. Those opposed? The motion carries 7 to 2.
We will now hear public comment. Please state your name and keep your remarks to three minutes.
The committee recommends that the council adopt the resolution and direct the manager to report back in June.
Speaker 1: I think we should compress the prompt before we send it to the model.
Speaker 2: Yes, the compressor keeps the important words and drops the filler words.
The prompt compressor reads each word, predicts a probability to keep it, and keeps the top share of the words.
Question: What was the vote on item 12? Answer: The motion passed 7 to 2.
Please summarise the discussion in two sentences and list the action items.
The total cost is $1,250 and the deadline is March 3rd, 2024 at 10:30 a.m.
"""

SUFFIXES = ["s", "es", "ed", "ing", "er", "ers", "ly", "ion", "tion", "ment", "al", "ity", "ate", "ive", "ous"]
MAX_WORDS = 260  # most frequent corpus words that become single tokens


def _lines(corpus: str) -> list[str]:
    return [line for line in corpus.splitlines() if line]


def _count(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


def _top(counts: dict[str, int], n: int) -> list[str]:
    return [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]


def _add_force_tokens(tok: Tokenizer) -> None:
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in FORCE_TOKEN_NAMES])


# The vocabularies are built by counting, not by the ``tokenizers`` trainers: the Unigram and WordPiece trainers are
# not deterministic run to run (float sums and hash-map order), and `export-compressor` must rebuild the same folder.
def build_xlmr_tokenizer(pad_to: int | None = None) -> Tokenizer:
    """``pad_to``: total vocabulary size ([NEWi] included) reached with filler pieces that no text matches
    (``\ue000`` + number, private-use code point, score -99): real-size shapes for timing only.

    Unigram pieces: the specials (score 0), every corpus character and ``▁`` + character, the MAX_WORDS most
    frequent words as ``▁word``, and the suffixes; score = ln(count / total) of the piece's corpus count (words:
    word count, characters: character count, suffixes: words ending with it), rounded to 4 decimals."""
    import math

    norm = normalizers.Sequence([
        normalizers.NFKC(),
        normalizers.Replace(Regex("[\t\r\n]"), " "),
        normalizers.Replace(Regex(" {2,}"), " "),
    ])
    pre = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    words: list[str] = []
    for line in _lines(CORPUS):
        words += [w for w, _ in pre.pre_tokenize_str(norm.normalize_str(line))]
    # the Metaspace split keeps punctuation glued to the word ("▁image?"): split it off like SentencePiece pieces do
    pieces: list[str] = []
    for w in words:
        pieces += [x for x in re.findall(r"▁?[A-Za-z]+|▁?[0-9]+|▁?[^A-Za-z0-9▁]|▁", w) if x]
    word_counts = _count(p for p in pieces if len(p) > 2)
    char_counts = _count(c for line in _lines(CORPUS) for c in norm.normalize_str(line) if c != " ")
    chosen: dict[str, int] = {}
    for c, n in char_counts.items():
        chosen[c] = n
        chosen.setdefault("▁" + c, max(1, n // 4))
    chosen["▁"] = len(words)
    for w in _top(word_counts, MAX_WORDS):
        chosen[w] = word_counts[w]
    for suf in SUFFIXES:
        chosen[suf] = max(1, sum(1 for p in pieces if p.endswith(suf)))
    total = sum(chosen.values())
    vocab = [(t, 0.0) for t in XLMR_SPECIAL]
    vocab += [(t, round(math.log(n / total), 4)) for t, n in sorted(chosen.items(), key=lambda kv: (-kv[1], kv[0]))]
    if pad_to is not None:
        fill = pad_to - len(vocab) - len(FORCE_TOKEN_NAMES)
        if fill < 0:
            raise ValueError(f"pad_to {pad_to} is below the vocabulary's {len(vocab) + len(FORCE_TOKEN_NAMES)}")
        vocab += [(f"\ue000{i}", -99.0) for i in range(fill)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=XLMR_SPECIAL.index("<unk>"), byte_fallback=False))
    tok.normalizer = norm
    tok.pre_tokenizer = pre
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.add_special_tokens([AddedToken(t, special=True) for t in XLMR_SPECIAL])
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.RobertaProcessing(("</s>", eos), ("<s>", bos), trim_offsets=True,
                                                      add_prefix_space=True)
    _add_force_tokens(tok)
    return tok


def build_bert_tokenizer() -> Tokenizer:
    """WordPiece vocabulary: the specials, every corpus character alone and as ``##`` + character, the MAX_WORDS
    most frequent words (BertPreTokenizer words of the normalized corpus), ``##`` + each suffix; in that order."""
    norm = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=False,
                                      lowercase=False)
    pre = pre_tokenizers.BertPreTokenizer()
    words: list[str] = []
    for line in _lines(CORPUS):
        words += [w for w, _ in pre.pre_tokenize_str(norm.normalize_str(line))]
    chars = sorted({c for w in words for c in w})
    vocab_list = list(BERT_SPECIAL) + chars + ["##" + c for c in chars]
    for w in _top(_count(w for w in words if len(w) > 1), MAX_WORDS) + ["##" + s for s in SUFFIXES]:
        if w not in vocab_list:
            vocab_list.append(w)
    vocab = {t: i for i, t in enumerate(vocab_list)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##",
                                     max_input_chars_per_word=100))
    tok.normalizer = norm
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens([AddedToken(t, special=True) for t in BERT_SPECIAL])
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    _add_force_tokens(tok)
    return tok


BUILDERS = {"xlm-roberta": build_xlmr_tokenizer, "bert": build_bert_tokenizer}
