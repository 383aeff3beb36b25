"""Text tokenisation with HuggingFace `tokenizers`: train one on a dataset's own text, save/load it, encode to ids.

Tokenizers trained here lowercase the text and split it on whitespace and punctuation (BERT's pre-tokenizer), and
wrap every text in begin/end tokens. Their special-token ids are fixed:

    kind="wordpiece" (BERT-style):  [PAD]=0  [UNK]=1  [CLS]=2  [SEP]=3  [MASK]=4   text -> [CLS] ... [SEP]
    kind="bpe":                     <pad>=0  <unk>=1  <s>=2    </s>=3   <mask>=4   text -> <s> ... </s>

so the pad id is 0 (the `pad_id` default of `mmjax.nn.encoders.text.TextTransformer`), "cls" pooling reads the
begin token and "eot" pooling the end token. Pretrained tokenizers (e.g. all-MiniLM-L6-v2's `tokenizer.json`) load
with `load_tokenizer` and encode the same way.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterable, Iterator, Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

KINDS = ("wordpiece", "bpe")
SPECIAL_TOKENS = {
    "wordpiece": ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"),
    "bpe": ("<pad>", "<unk>", "<s>", "</s>", "<mask>"),
}
# Tokens recognised as padding in tokenizers that do not configure padding themselves.
PAD_TOKENS = ("[PAD]", "<pad>", "<|pad|>")


def train_tokenizer(
    texts: Iterable[str],
    kind: str = "wordpiece",
    vocab_size: int = 8000,
    min_frequency: int = 1,
    lowercase: bool = True,
) -> Tokenizer:
    """Trains a `kind` ("wordpiece" or "bpe") tokenizer with at most `vocab_size` tokens on `texts`.

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


class TextEncoderOp:
    """Picklable `text -> int32 [max_len]` ids for data pipelines (e.g. `grain.MapDataset.map`).

    Only the path travels to worker processes; each loads the tokenizer on first use and sets its fixed-length
    padding and truncation once, never changing them afterwards, so Grain's reader threads can share it
    (toggling them per call, as `encode_batch` does on a caller's tokenizer, races between threads).
    """

    def __init__(self, tokenizer_path: str, max_len: int, pad_token: str | None = None):
        self.tokenizer_path = tokenizer_path
        self.max_len = max_len
        self.pad_token = pad_token
        self._tokenizer: Tokenizer | None = None

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            tokenizer = load_tokenizer(self.tokenizer_path)
            _set_fixed_length(tokenizer, self.max_len, self.pad_token)
            self._tokenizer = tokenizer
        return self._tokenizer

    def __call__(self, text: str | bytes) -> np.ndarray:
        if isinstance(text, (bytes, np.bytes_)):
            text = text.decode("utf-8")
        return np.asarray(self.tokenizer.encode(str(text)).ids, np.int32)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_tokenizer"} | {"_tokenizer": None}

    def __repr__(self) -> str:
        return f"TextEncoderOp({self.tokenizer_path!r}, max_len={self.max_len})"
