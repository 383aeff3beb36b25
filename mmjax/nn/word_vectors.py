"""Pretrained word vectors for text encoders' embedding tables: train Word2Vec on a dataset's own text with gensim,
or read any word2vec / GloVe file, and align the vectors to a tokenizer's vocabulary.

* `train_word2vec(texts, tokenizer, path)`: Word2Vec (Mikolov, Chen, Corrado, Dean, "Efficient Estimation of Word
  Representations in Vector Space", ICLR 2013 workshop; skip-gram with negative sampling by default) trained with
  `gensim.models.Word2Vec` on the texts as the tokenizer splits them (its tokens, without the special ones), so
  every vocabulary entry that occurs `min_count` times gets a vector. One worker thread and a seed: the same
  texts give the same vectors. Saved in the word2vec text format.
* `load_word_vectors(path)`: a word2vec text file (header "count dim"), a GloVe text file (no header; Pennington,
  Socher, Manning, EMNLP 2014) or a word2vec binary file (`.bin`), read with gensim's `KeyedVectors`.
* `aligned_embedding(vectors, tokenizer, initial)`: the `[vocab, dim]` table for the tokenizer's ids. A token is
  looked up as itself, then case-insensitively (the file's most frequent casing first), then (BPE end-of-word
  tokens "word</w>") without the suffix. Special
  tokens ([PAD], [UNK], [CLS], ...) and tokens not found keep the model's own initial rows, rescaled to the
  standard deviation of the vectors found (the usual treatment of unknown words, e.g. Kim, "Convolutional Neural
  Networks for Sentence Classification", EMNLP 2014, draws them with the pretrained vectors' variance). The
  coverage (share of the non-special vocabulary found) is reported; none found is an error (a vocabulary that
  does not match the file, e.g. WordPiece pieces against whole words).

`config.train.init_from = {"encoders_text/embed": "word_vectors:/path/vectors.txt"}` (the `rnn` encoder's table;
`encoders_text/token_embed` for `text_transformer`) uses these with the tokenizer of `config.data.tokenizer`.
gensim is an optional dependency (`pip install -e ".[word2vec]"`), imported only here, when vectors are used.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, NamedTuple

import numpy as np

from mmjax.data.tokenization import PAD_TOKENS, SPECIAL_TOKENS, as_text, load_tokenizer

GENSIM_PIP = 'pip install -e ".[word2vec]"  (or: pip install "gensim>=4.4,<4.5")'


def _gensim():
    """gensim, imported on first use (an optional dependency: only word-vector features need it)."""
    try:
        import gensim
    except ImportError as e:
        raise ImportError(f"word vectors need gensim: {GENSIM_PIP}") from e
    return gensim


def _tokenizer(tokenizer: Any):
    return load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer


def _specials(tokenizer) -> set[str]:
    vocab = tokenizer.get_vocab()
    known = {t for kind in SPECIAL_TOKENS.values() for t in kind} | set(PAD_TOKENS)
    added = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    return {t for t in known | added if t in vocab}


def tokenized_texts(texts: Iterable[Any], tokenizer: Any) -> list[list[str]]:
    """Each text (str or UTF-8 bytes) as the tokenizer's tokens, without special tokens."""
    tokenizer = _tokenizer(tokenizer)
    specials = _specials(tokenizer)
    encodings = tokenizer.encode_batch([as_text(t) for t in texts], add_special_tokens=False)
    return [[t for t in e.tokens if t not in specials] for e in encodings]


def train_word2vec(texts: Iterable[Any], tokenizer: Any, path: str, *, vector_size: int = 100, window: int = 5,
                   min_count: int = 1, epochs: int = 20, skip_gram: bool = True, seed: int = 0) -> str:
    """Trains Word2Vec on `texts` split by `tokenizer` (a tokenizer.json path or a `Tokenizer`) and writes the
    vectors to `path` (word2vec text format); returns `path`. See the module docstring."""
    sentences = [s for s in tokenized_texts(texts, tokenizer) if s]
    if not sentences:
        raise ValueError("train_word2vec: no tokens in the texts")
    model = _gensim().models.Word2Vec(sentences, vector_size=vector_size, window=window, min_count=min_count,
                                      sg=int(skip_gram), epochs=epochs, seed=seed, workers=1)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    model.wv.save_word2vec_format(path, binary=False)
    return path


def load_word_vectors(path: str):
    """gensim `KeyedVectors` from a word2vec text file, a GloVe text file (no header) or a `.bin` word2vec file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no word-vector file at {path!r}")
    keyed = _gensim().models.KeyedVectors
    if path.endswith(".bin"):
        return keyed.load_word2vec_format(path, binary=True)
    with open(path, encoding="utf-8") as f:
        first = f.readline().split()
    header = len(first) == 2 and all(part.isdigit() for part in first)
    return keyed.load_word2vec_format(path, binary=False, no_header=not header)


class Coverage(NamedTuple):
    """How much of a vocabulary a set of word vectors covers."""

    found: int
    total: int  # Vocabulary entries looked up (special tokens excluded).
    special: int

    @property
    def share(self) -> float:
        return self.found / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (f"coverage {100 * self.share:.1f}% ({self.found:,} of {self.total:,} vocabulary tokens found; "
                f"{self.special} special tokens kept at their initial values)")


def _lookup(token: str, vectors, lowercase: dict[str, str]) -> str | None:
    """The key of `token` in `vectors`: itself, else case-insensitively, else without a BPE "</w>" suffix."""
    bare = token[: -len("</w>")] if token.endswith("</w>") else token
    for candidate in dict.fromkeys((token, bare)):
        if candidate in vectors.key_to_index:
            return candidate
        if candidate.lower() in lowercase:
            return lowercase[candidate.lower()]
    return None


def aligned_embedding(vectors, tokenizer: Any, initial: np.ndarray) -> tuple[np.ndarray, Coverage]:
    """The embedding table `[vocab, dim]` for the tokenizer's ids from `vectors` (gensim `KeyedVectors`), with
    the rows of tokens not found (and of special tokens) taken from `initial` (the model's own initialisation)
    rescaled to the found vectors' standard deviation; and the coverage. See the module docstring."""
    tokenizer = _tokenizer(tokenizer)
    initial = np.asarray(initial, np.float32)
    vocab = tokenizer.get_vocab()
    if initial.ndim != 2 or initial.shape[0] < len(vocab):
        raise ValueError(f"word vectors: the embedding table has shape {initial.shape}, but the tokenizer has "
                         f"{len(vocab)} tokens (the encoder's vocab_size must be at least that)")
    if vectors.vector_size != initial.shape[1]:
        raise ValueError(f"word vectors have {vectors.vector_size} dimensions but the embedding table is "
                         f"{initial.shape} [vocab, dim]; set the text encoder's embedding width (embed_dim) to "
                         f"{vectors.vector_size}")
    specials = _specials(tokenizer)
    lowercase: dict[str, str] = {}
    for key in vectors.index_to_key:  # Files list words by frequency: the first casing is the most frequent.
        lowercase.setdefault(str(key).lower(), key)
    table = initial.copy()
    found = np.zeros(initial.shape[0], bool)
    for token, index in vocab.items():
        key = None if token in specials else _lookup(token, vectors, lowercase)
        if key is not None:
            table[index] = vectors[key]
            found[index] = True
    coverage = Coverage(int(found.sum()), len(vocab) - len(specials), len(specials))
    if not coverage.found:
        raise ValueError(f"word vectors: no token of the tokenizer's vocabulary ({len(vocab)} tokens, e.g. "
                         f"{sorted(vocab)[:5]}) is in the vector file; the vocabularies do not match")
    scale = table[found].std() / max(float(initial[~found].std()), 1e-12) if (~found).any() else 1.0
    table[~found] = initial[~found] * scale
    return table, coverage


def word_vector_params(path: str, tokenizer: Any, initial: Any) -> tuple[dict, Coverage]:
    """`{"embedding": table}` for an `nn.Embed` subtree whose current (initial) params are `initial`."""
    if not isinstance(initial, dict) or set(initial) != {"embedding"}:
        keys = sorted(initial) if isinstance(initial, dict) else type(initial).__name__
        raise ValueError(f"word vectors initialise an embedding table (an nn.Embed subtree holding 'embedding'), "
                         f"but the subtree holds {keys}; name the embedding, e.g. 'encoders_text/embed' (rnn) or "
                         "'encoders_text/token_embed' (text_transformer)")
    table, coverage = aligned_embedding(load_word_vectors(path), tokenizer, np.asarray(initial["embedding"]))
    return {"embedding": table}, coverage
