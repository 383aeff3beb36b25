"""One raw input of a modality -> what a model trained on a dataset takes: that dataset's evaluation preprocessing.

Every dataset that can be used on your own files declares `Dataset.inputs = {modality: RawInput(...)}`; prediction,
search and export (`mmjax.predict`, `mmjax.search`, `mmjax.export`) turn images, audio clips and texts into model
inputs with it, so that a prediction on a training file equals the model's output during evaluation.

Raw values (what `read_cell` reads from a manifest cell, or what a notebook passes in memory):

    image  the file's bytes (any format Pillow reads), or a uint8 array [H, W] / [H, W, C]
    audio  `RawAudio(rate, samples)` (float32 mono in [-1, 1], as `mmjax.data.build.read_audio` reads a WAV file),
           or a 1-D float array taken to be at the dataset's sample rate
    text   a str

A `RawInput` is an op chain (`mmjax.data.ops`, evaluation version: random ops replaced by their deterministic
counterparts) applied to that value, e.g. `decode|resize(32)|normalize`; audio at another sample rate than the
chain's is resampled first (polyphase, as `mmjax.data.build --resample` does); text is either a chain
(`tokenize(...)`) or encoded directly with the dataset's tokenizer and `max_len` (`mmjax.data.tokenization`).
Documented behaviour, reported once per run by the callers through `notes`: an image of another size is resized
by the chain; audio at another rate is resampled; a text longer than the context is truncated (its begin/end
tokens kept).

`spec()` is the JSON description `mmjax.export` writes (with the tokenizer saved beside it), and `from_spec`
rebuilds the same preprocessing from it without any model code.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from mmjax.data.ops import Context, KeyPlan, Preprocess, plan
from mmjax.data.ops.text_ops import Tokenize
from mmjax.data.tokenization import TokenizerSource, as_text, encode_texts, tokenizer_from

KINDS = ("image", "audio", "text")


class RawAudio(NamedTuple):
    """A mono waveform (float32 in [-1, 1]) and its sample rate in Hz."""

    rate: int
    samples: np.ndarray


def read_cell(modality: str, value: Any, root: str, *, text_files: bool = False) -> Any:
    """The raw value of one manifest cell (module docstring): an image file's bytes (checked decodable), a WAV
    file's `RawAudio`, or the text (a text file's contents with `text_files`). Relative paths start at `root`.
    Raises ValueError with the builder's wording ("missing file: image 'x.png' (...)", "unreadable image ...")."""
    from mmjax.data.build import read_audio, read_image  # The builder's readers: the same bytes and samples.

    if modality == "text" and not text_files:
        text = as_text(value)
        if not text.strip():
            raise ValueError("empty text")
        return text.strip()
    if not isinstance(value, str):
        raise ValueError(f"{modality} cell {value!r} is not a file path")
    path = os.path.expanduser(value)
    path = path if os.path.isabs(path) else os.path.join(root, path)
    if not os.path.isfile(path):
        raise ValueError(f"missing file: {modality} {value!r} ({path})")
    if modality == "image":
        try:
            return read_image(path)[0]
        except Exception as error:  # Pillow raises many types for broken files.
            raise ValueError(f"unreadable image {value!r} ({type(error).__name__}: {error})") from None
    if modality == "audio":
        try:
            rate, samples = read_audio(path)
        except Exception as error:  # scipy raises ValueError / EOFError / OSError for broken files.
            raise ValueError(f"unreadable audio {value!r} (not a readable WAV file: {type(error).__name__}: "
                             f"{error})") from None
        if samples.size == 0 or not np.all(np.isfinite(samples)):
            raise ValueError(f"unreadable audio {value!r} (empty, NaN or infinite samples)")
        return RawAudio(rate, samples)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"unreadable text file {value!r} ({type(error).__name__}: {error})") from None
    if not text.strip():
        raise ValueError(f"empty text in {value!r}")
    return text.strip()


@functools.lru_cache(maxsize=8)
def _counting_tokenizer(source: TokenizerSource):
    """A tokenizer of `source` without truncation or padding: to count a text's tokens."""
    tokenizer = tokenizer_from(source)
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def count_tokens(source: TokenizerSource, text: str) -> int:
    """Tokens of `text` with the tokenizer's begin/end tokens, before any truncation."""
    return len(_counting_tokenizer(source).encode(as_text(text)).ids)


@dataclasses.dataclass(frozen=True)
class RawInput:
    """The evaluation preprocessing of one modality of a dataset, applied to a raw value (module docstring).

    `chain`: ops joined by `|` (may be empty for text encoded with `tokenizer` and `max_len`); `sample_rate`: the
    rate the audio chain expects (raw audio at another rate is resampled to it); `tokenizer`: the dataset's own
    tokenizer (a tokenizer.json path, "minilm", or a function returning a `tokenizers.Tokenizer`), what `tokenize`
    uses by default, or what encodes the text when `max_len` is set and `chain` is empty.
    """

    modality: str
    chain: str = ""
    sample_rate: int | None = None
    tokenizer: TokenizerSource | None = None
    max_len: int | None = None

    def __post_init__(self):
        if self.modality not in KINDS:
            raise ValueError(f"RawInput: modality {self.modality!r} is not one of {KINDS}")
        if self.modality == "text" and not self.chain and not (self.tokenizer and self.max_len):
            raise ValueError("RawInput: text needs a chain (e.g. 'tokenize(max_len=32)') or a tokenizer and max_len")
        if self.modality != "text" and not self.chain:
            raise ValueError(f"RawInput: {self.modality} needs a chain of ops")

    @functools.cached_property
    def plan(self) -> KeyPlan | None:
        """The bound chain (ops looked up and checked once); None for directly encoded text."""
        if not self.chain:
            return None
        tokenizer = self.tokenizer if isinstance(self.tokenizer, str) else None
        return plan(self.chain, Context(key=self.modality, sample_rate=self.sample_rate, tokenizer=tokenizer))

    def _tokenize_op(self) -> Tokenize | None:
        ops = (*self.plan.prefix, *self.plan.eval_suffix) if self.plan else ()
        return next((op for op in ops if isinstance(op, Tokenize)), None)

    def context_length(self) -> int | None:
        """Token ids per text (text inputs), else None."""
        if self.modality != "text":
            return None
        op = self._tokenize_op()
        return op.max_len if op is not None else self.max_len

    def tokenizer_source(self) -> TokenizerSource | None:
        """What encodes the text (text inputs): the chain's `tokenize` tokenizer, else `tokenizer`; None otherwise.
        A text decoder's ids are read back into words with it (`mmjax.evaluate.captioning`)."""
        if self.modality != "text":
            return None
        op = self._tokenize_op()
        return op.tokenizer if op is not None else self.tokenizer

    def vocab_size(self) -> int | None:
        """The size of the text tokenizer's vocabulary (text inputs), else None: token ids are below it."""
        source = self.tokenizer_source()
        return None if source is None else _counting_tokenizer(source).get_vocab_size()

    def _value(self, value: Any) -> Any:
        if self.modality == "audio":
            if isinstance(value, RawAudio):
                samples = np.asarray(value.samples, np.float32)
                if self.sample_rate and value.rate != self.sample_rate:
                    from mmjax.data.audio_features import resample  # scipy.signal: only when resampling.

                    samples = resample(samples, value.rate, self.sample_rate)
                return samples
            samples = np.asarray(value)
            if samples.ndim != 1:
                raise ValueError(f"audio must be a 1-D waveform or RawAudio(rate, samples), got shape {samples.shape}")
            return samples.astype(np.float32) if samples.dtype.kind == "f" else samples
        if self.modality == "text":
            if not isinstance(value, (str, bytes, np.str_, np.bytes_)):
                raise ValueError(f"text must be a str, got {type(value).__name__}")
            return as_text(value)
        if isinstance(value, (bytes, bytearray, np.bytes_)):
            return bytes(value)
        image = np.asarray(value)
        if image.ndim not in (2, 3) or image.dtype == object:
            raise ValueError(f"image must be encoded bytes or an array [H, W(, C)], got shape {image.shape}")
        return image

    def __call__(self, value: Any) -> np.ndarray:
        """The model input of one raw value (the evaluation preprocessing)."""
        value = self._value(value)
        if self.plan is None:
            return encode_texts(self.tokenizer, [value], self.max_len)[0]
        # The pipeline's own runner (evaluation version of the chain); errors name the key and the op.
        return np.asarray(Preprocess((self.plan,), keep=())({self.modality: value})[self.modality])

    def notes(self, value: Any) -> list[str]:
        """What preprocessing does to this value that a user should hear about once: audio resampled, text
        truncated to the context (module docstring)."""
        notes = []
        if self.modality == "audio" and isinstance(value, RawAudio) and self.sample_rate \
                and value.rate != self.sample_rate:
            notes.append(f"audio at {value.rate} Hz is resampled to the model's {self.sample_rate} Hz")
        if self.modality == "text":
            op = self._tokenize_op()
            source, length = (op.tokenizer, op.max_len) if op is not None else (self.tokenizer, self.max_len)
            if source is not None and length and count_tokens(source, value) > length:
                notes.append(f"text longer than the model's context of {length} tokens is truncated (its first "
                             f"{length} tokens kept, with the end token)")
        return notes

    def spec(self, tokenizer_file: str | None = None) -> dict[str, Any]:
        """JSON description: `from_spec(spec, directory)` rebuilds this preprocessing when the tokenizer (if any)
        is saved as `directory/tokenizer_file` (`save_tokenizer`)."""
        evaluation = "|".join(str(op) for op in (*self.plan.prefix, *self.plan.eval_suffix)) if self.plan else ""
        return {"modality": self.modality, "chain": self.chain, "evaluation_chain": evaluation,
                "sample_rate": self.sample_rate, "tokenizer": tokenizer_file if self.tokenizer is not None else None,
                "max_len": self.max_len, "context_length": self.context_length()}

    def save_tokenizer(self, path: str) -> bool:
        """Writes the dataset's tokenizer as tokenizer.json at `path` (False when this input has none)."""
        if self.tokenizer is None:
            return False
        tokenizer_from(self.tokenizer).save(path)
        return True


def from_spec(spec: Mapping[str, Any], directory: str = "") -> RawInput:
    """The `RawInput` a `spec()` describes (its tokenizer file relative to `directory`)."""
    tokenizer = spec.get("tokenizer")
    if tokenizer and tokenizer != "minilm" and not os.path.isabs(tokenizer):
        tokenizer = os.path.join(directory, tokenizer)
    return RawInput(spec["modality"], spec.get("chain") or "", spec.get("sample_rate"), tokenizer, spec.get("max_len"))


def decode_image(value: Any) -> np.ndarray:
    """An image value (bytes or array) as uint8 RGB `[H, W, 3]`, for pictures of results (contact sheets)."""
    from PIL import Image

    if isinstance(value, (bytes, bytearray, np.bytes_)):
        with Image.open(io.BytesIO(bytes(value))) as pil:
            return np.asarray(pil.convert("RGB"))
    image = np.asarray(value)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return np.asarray(image[..., :3], np.uint8)
