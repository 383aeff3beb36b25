"""Preprocessing ops found by name and composed from the config, one chain per example key (big_vision's `pp`).

`config.data.preprocess` maps an example key (a modality, or `label`) to a chain of ops joined by `|`:

    config.data.preprocess = {
        "image": "decode|resize(40)|random_crop(32)|flip_lr|normalize",
        "audio": "resample(16000)|crop_or_pad(16000)|log_mel(n_mels=40)|standardize|spec_augment",
        "text": "tokenize(max_len=32)",
        "label": "one_hot(10)",
    }

Syntax: an op is `name` or `name(arg, ..., key=value, ...)`; arguments are Python literals (numbers, strings,
tuples, lists, True/False/None), read with `ast.literal_eval` (nothing is evaluated). The chain is parsed as a
Python expression of `|`-joined names and calls, so a `|` inside a quoted string argument is fine. An unknown op
fails with the closest valid name and the list of ops; a bad argument names the op, the key and its signature.

Deterministic and random ops: each chain is split at its first random op. The ops before it run in
`Dataset.preprocess` (cacheable with `data.cache_in_memory`); the rest run in `Dataset.augment(example, rng)`
on the training stream only, drawing from the Grain-seeded `rng` (seed + position in the stream, so a resumed
run reproduces its batches). Evaluation runs the same chain with every random op replaced by its deterministic
counterpart: `random_crop(s)` -> `center_crop(s)`, `random_resized_crop(s)` -> `resize_small(s)|center_crop(s)`,
`random_crop_or_pad(n)` -> `crop_or_pad(n, align="center")`, `flip_lr`, `flip_ud`, `randaugment`,
`spec_augment` -> nothing. When that changes the value (e.g. `center_crop`), `preprocess` returns the evaluation
value under the key and the value before the first random op under `_pre_augment/<key>`, which `augment`
consumes and removes (training batches never hold it; evaluation batches carry it unused).

Missing modalities: when an example holds `<key>_mask` == 0, the chain still runs (on the stored zero
placeholder, so shapes agree) and its output is replaced by zeros.

Ops (`PREPROCESS_OPS` in mmjax.registry; R = random, applied in `augment`):

    image  decode(channels=3)  resize(size, method="bilinear")  resize_small(size, method="bilinear")
           center_crop(size, pad=0)  random_crop(size, pad=0) R  random_resized_crop(size, scale, ratio) R
           flip_lr(p=0.5) R  flip_ud(p=0.5) R  randaugment(num_ops=2, magnitude=9) R  normalize(mean=0.5, std=0.5)
    audio  resample(rate, from_rate=None)  crop_or_pad(length, align="start")  random_crop_or_pad(length) R
           log_mel(n_mels=40, n_fft=None, hop_length=None, fmin=0.0, fmax=None)
           spec_augment(freq_masks=2, freq_width=8, time_masks=2, time_width=10, fill="mean") R
    text   tokenize(max_len=32, tokenizer=None)  pad_or_truncate(length, value=0)
    label  one_hot(num_classes=None)  multi_hot(num_classes=None)
    any    standardize(eps=1e-5)  cast(dtype)

Images are uint8 `[H, W, C]` until `normalize` (integer input is divided by its dtype's maximum, then
`(x - mean) / std`; the defaults give [-1, 1]); geometric ops also accept float images. Audio is a 1-D waveform
(float in [-1, 1] or integer PCM) at the sample rate the dataset declares (`resample` changes it for the ops
after it), and `log_mel` gives float32 `[frames, n_mels]` (defaults: a 25 ms FFT rounded up to a power of two,
a 10 ms hop). `tokenize` uses `tokenizer` ("minilm", a tokenizer.json path) or the dataset's own tokenizer.
Ops are frozen dataclasses and the composed callables hold only them, so everything pickles (Grain workers).
"""

from __future__ import annotations

import abc
import ast
import dataclasses
import io
import math
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np

from mmjax.registry import PREPROCESS_OPS

PRIVATE_PREFIX = "_pre_augment/"  # Value before the first random op, carried from preprocess to augment.

__all__ = [
    "Augment",
    "Context",
    "KeyPlan",
    "Op",
    "PREPROCESS_OPS",
    "PRIVATE_PREFIX",
    "Preprocess",
    "PreprocessError",
    "RandomOp",
    "compose",
    "parse",
    "plan",
]


class PreprocessError(ValueError):
    """A preprocessing chain is invalid, or an op failed on an example; the message names the key and the op."""


@dataclasses.dataclass(frozen=True)
class Context:
    """What ops may need to know about their input besides the value: filled in by the dataset.

    `sample_rate` of the audio (updated by `resample` for the ops after it), `num_classes` (labels) and the
    dataset's own `tokenizer` (a tokenizer.json path).
    """

    key: str = ""
    sample_rate: int | None = None
    num_classes: int | None = None
    tokenizer: str | None = None


class Op(abc.ABC):
    """A deterministic op: `op(value) -> value`. Subclasses are frozen dataclasses registered by name."""

    name: ClassVar[str] = ""
    random: ClassVar[bool] = False

    def bind(self, context: Context) -> tuple["Op", Context]:
        """Fills defaults from the context and checks them; returns the bound op and the context after it."""
        return self, context

    @abc.abstractmethod
    def __call__(self, value):
        """The op applied to one example's value."""

    def __str__(self) -> str:
        parts = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.default is dataclasses.MISSING or value != field.default:
                parts.append(f"{field.name}={value!r}")
        return f"{self.name}({', '.join(parts)})"


class RandomOp(Op):
    """A random op: `op(value, rng) -> value`, with `rng` a `numpy.random.Generator`; training stream only."""

    random: ClassVar[bool] = True

    def eval_ops(self) -> tuple[Op, ...]:
        """The deterministic ops evaluation runs in its place (empty: the value is kept)."""
        return ()

    @abc.abstractmethod
    def __call__(self, value, rng: np.random.Generator):
        """The op applied to one example's value, drawing from `rng`."""


def register(name: str) -> Callable[[type], type]:
    """Class decorator: a frozen dataclass op registered in PREPROCESS_OPS under `name`."""

    def decorator(cls: type) -> type:
        cls.name = name
        return PREPROCESS_OPS.register(name)(cls)

    return decorator


# ------------------------------------------------------------------------------------------------ helpers


def _positive_int(op: str, field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{op}: {field} must be a positive int, got {value!r}")
    return int(value)


def _hw(op: str, size: Any) -> tuple[int, int]:
    """`size` as (height, width): an int (square) or a pair of ints."""
    if isinstance(size, (tuple, list)):
        if len(size) != 2:
            raise ValueError(f"{op}: size must be an int or (height, width), got {size!r}")
        return _positive_int(op, "size", size[0]), _positive_int(op, "size", size[1])
    side = _positive_int(op, "size", size)
    return side, side


def _probability(op: str, p: Any) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"{op}: p must be a probability in [0, 1], got {p!r}")
    return float(p)


def _image(value, op: str) -> np.ndarray:
    """An image as a 3-D `[H, W, C]` array (a 2-D one gets a channel axis)."""
    image = np.asarray(value)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.dtype == object:
        raise ValueError(f"{op} expects an image [H, W, C] (decode it first), got {_describe(value)}")
    return image


def _describe(value) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        return f"{len(value)} bytes"
    if isinstance(value, str):
        return f"text {value[:40]!r}"
    array = np.asarray(value)
    return f"array of shape {array.shape} and dtype {array.dtype}"


_METHODS = {"nearest": 0, "box": 4, "bilinear": 2, "hamming": 5, "bicubic": 3, "lanczos": 1}  # PIL's codes.


def _method(op: str, method: str) -> int:
    if method not in _METHODS:
        raise ValueError(f"{op}: method={method!r}; valid: {', '.join(_METHODS)}")
    return _METHODS[method]


def _resize(image: np.ndarray, height: int, width: int, method: str) -> np.ndarray:
    """Resizes `[H, W, C]` with Pillow (antialiased when shrinking); uint8 stays uint8, floats stay float32."""
    from PIL import Image

    if image.shape[:2] == (height, width):
        return image
    resample = _METHODS[method]
    if image.dtype == np.uint8 and image.shape[2] in (1, 3):
        pil = Image.fromarray(image[..., 0] if image.shape[2] == 1 else image)
        out = np.asarray(pil.resize((width, height), resample))
        return out[..., None] if out.ndim == 2 else out
    channels = [  # Per channel in Pillow's 32-bit float mode ("F", what a float32 2-D array becomes).
        np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c], np.float32)).resize((width, height), resample))
        for c in range(image.shape[2])
    ]
    out = np.stack(channels, axis=-1)
    if image.dtype == np.uint8:  # E.g. RGBA: bicubic / lanczos overshoot, so round and clip back to 0..255.
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out.astype(np.float32)


def _pad_image(image: np.ndarray, pad: int) -> np.ndarray:
    return np.pad(image, ((pad, pad), (pad, pad), (0, 0))) if pad else image


def _check_crop_args(op: str, size: Any, pad: Any) -> None:
    _hw(op, size)
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise ValueError(f"{op}: pad must be an int >= 0, got {pad!r}")


def _check_crop(op: str, image: np.ndarray, height: int, width: int) -> None:
    if image.shape[0] < height or image.shape[1] < width:
        raise ValueError(
            f"{op}: image of {image.shape[0]}x{image.shape[1]} is smaller than the crop {height}x{width} "
            "(resize it first, e.g. resize_small)"
        )


# -------------------------------------------------------------------------------------------------- image


@register("decode")
@dataclasses.dataclass(frozen=True)
class Decode(Op):
    """PNG/JPEG/... bytes (Pillow; EXIF orientation applied) -> uint8 `[H, W, channels]` (1: grey, 3: RGB,
    4: RGBA); arrays pass through, converted to `channels`."""

    channels: int = 3

    def __post_init__(self):
        if self.channels not in (1, 3, 4):
            raise ValueError(f"decode: channels must be 1, 3 or 4, got {self.channels!r}")

    def __call__(self, value):
        from PIL import Image, ImageOps

        mode = {1: "L", 3: "RGB", 4: "RGBA"}[self.channels]
        if isinstance(value, np.ndarray) and value.dtype == object and value.ndim == 0:
            value = value.item()
        if isinstance(value, (bytes, np.bytes_, bytearray)):
            if not value:
                raise ValueError("decode: empty image bytes")
            with Image.open(io.BytesIO(bytes(value))) as pil:
                out = np.asarray(ImageOps.exif_transpose(pil).convert(mode))  # Photos: upright as shot.
        else:
            image = _image(value, "decode").astype(np.uint8, copy=False)
            if image.shape[2] == self.channels:
                return image
            if image.shape[2] not in (1, 3, 4):
                raise ValueError(f"decode: cannot convert an image of {image.shape[2]} channels to {self.channels}")
            out = np.asarray(Image.fromarray(image[..., 0] if image.shape[2] == 1 else image).convert(mode))
        return out[..., None] if out.ndim == 2 else out


@register("resize")
@dataclasses.dataclass(frozen=True)
class Resize(Op):
    """Image -> `[size, size, C]` (or `size=(height, width)`), aspect ratio not kept."""

    size: Any
    method: str = "bilinear"

    def __post_init__(self):
        _hw("resize", self.size)
        _method("resize", self.method)

    def __call__(self, value):
        return _resize(_image(value, "resize"), *_hw("resize", self.size), self.method)


@register("resize_small")
@dataclasses.dataclass(frozen=True)
class ResizeSmall(Op):
    """Image -> its shorter side resized to `size`, aspect ratio kept (then usually `center_crop(size)`)."""

    size: int
    method: str = "bilinear"

    def __post_init__(self):
        _positive_int("resize_small", "size", self.size)
        _method("resize_small", self.method)

    def __call__(self, value):
        image = _image(value, "resize_small")
        height, width = image.shape[:2]
        scale = self.size / min(height, width)
        new = (max(self.size, round(height * scale)), max(self.size, round(width * scale)))
        return _resize(image, *new, self.method)


@register("center_crop")
@dataclasses.dataclass(frozen=True)
class CenterCrop(Op):
    """Image -> its central `[size, size, C]` (or `size=(height, width)`), after zero-padding `pad` pixels."""

    size: Any
    pad: int = 0

    def __post_init__(self):
        _check_crop_args("center_crop", self.size, self.pad)

    def __call__(self, value):
        image = _pad_image(_image(value, "center_crop"), self.pad)
        height, width = _hw("center_crop", self.size)
        _check_crop("center_crop", image, height, width)
        top, left = (image.shape[0] - height) // 2, (image.shape[1] - width) // 2
        return image[top : top + height, left : left + width]


@register("random_crop")
@dataclasses.dataclass(frozen=True)
class RandomCrop(RandomOp):
    """Image -> a random `[size, size, C]` window, after zero-padding `pad` pixels (CIFAR-style with pad > 0).
    Evaluation: `center_crop(size, pad)`."""

    size: Any
    pad: int = 0

    def __post_init__(self):
        _check_crop_args("random_crop", self.size, self.pad)

    def eval_ops(self) -> tuple[Op, ...]:
        return (CenterCrop(self.size, self.pad),)

    def __call__(self, value, rng):
        image = _pad_image(_image(value, "random_crop"), self.pad)
        height, width = _hw("random_crop", self.size)
        _check_crop("random_crop", image, height, width)
        top = int(rng.integers(0, image.shape[0] - height + 1))
        left = int(rng.integers(0, image.shape[1] - width + 1))
        return image[top : top + height, left : left + width]


@register("random_resized_crop")
@dataclasses.dataclass(frozen=True)
class RandomResizedCrop(RandomOp):
    """Inception crop: a window of random area fraction `scale` and aspect ratio `ratio` (log-uniform), resized to
    `[size, size, C]`. Evaluation: `resize_small(size)|center_crop(size)`."""

    size: int
    scale: tuple = (0.08, 1.0)
    ratio: tuple = (3 / 4, 4 / 3)
    method: str = "bilinear"

    def __post_init__(self):
        _positive_int("random_resized_crop", "size", self.size)
        _method("random_resized_crop", self.method)
        for field, bounds, top in (("scale", self.scale, 1.0), ("ratio", self.ratio, math.inf)):
            if (not isinstance(bounds, (tuple, list)) or len(bounds) != 2
                    or not 0 < float(bounds[0]) <= float(bounds[1]) <= top):
                raise ValueError(
                    f"random_resized_crop: {field} must be (low, high) with 0 < low <= high, got {bounds!r}")

    def eval_ops(self) -> tuple[Op, ...]:
        return (ResizeSmall(self.size, self.method), CenterCrop(self.size))

    def __call__(self, value, rng):
        image = _image(value, "random_resized_crop")
        height, width = image.shape[:2]
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                break
        else:  # Fallback: the largest central window within the ratio bounds.
            aspect = min(max(width / height, self.ratio[0]), self.ratio[1])
            if width / height < aspect:
                w, h = width, int(round(width / aspect))
            else:
                w, h = int(round(height * aspect)), height
            w, h = max(1, min(w, width)), max(1, min(h, height))
            top, left = (height - h) // 2, (width - w) // 2
        return _resize(image[top : top + h, left : left + w], self.size, self.size, self.method)


@register("flip_lr")
@dataclasses.dataclass(frozen=True)
class FlipLR(RandomOp):
    """Image mirrored left-right with probability `p`. Evaluation: unchanged."""

    p: float = 0.5

    def __post_init__(self):
        _probability("flip_lr", self.p)

    def __call__(self, value, rng):
        image = _image(value, "flip_lr")
        return image[:, ::-1] if rng.random() < self.p else image


@register("flip_ud")
@dataclasses.dataclass(frozen=True)
class FlipUD(RandomOp):
    """Image flipped upside down with probability `p`. Evaluation: unchanged."""

    p: float = 0.5

    def __post_init__(self):
        _probability("flip_ud", self.p)

    def __call__(self, value, rng):
        image = _image(value, "flip_ud")
        return image[::-1] if rng.random() < self.p else image


RANDAUGMENT_OPS = (
    "identity", "autocontrast", "equalize", "rotate", "solarize", "color", "posterize", "contrast",
    "brightness", "sharpness", "shear_x", "shear_y", "translate_x", "translate_y",
)


def _randaugment_one(pil, name: str, level: float, sign: float):
    """One RandAugment op on a Pillow image at strength `level` in [0, 1] (Cubuk et al. 2020's ranges)."""
    from PIL import Image, ImageEnhance, ImageOps

    fill = 128 if pil.mode == "L" else (128,) * len(pil.getbands())
    affine = lambda matrix: pil.transform(pil.size, Image.Transform.AFFINE, matrix,  # noqa: E731
                                          resample=Image.Resampling.BILINEAR, fillcolor=fill)
    width, height = pil.size
    if name == "identity":
        return pil
    if name == "autocontrast":
        return ImageOps.autocontrast(pil)
    if name == "equalize":
        return ImageOps.equalize(pil)
    if name == "rotate":
        return pil.rotate(sign * 30.0 * level, resample=Image.Resampling.BILINEAR, fillcolor=fill)
    if name == "solarize":
        return ImageOps.solarize(pil, threshold=256 - int(round(256 * level)))
    if name == "posterize":
        return ImageOps.posterize(pil, bits=8 - int(round(4 * level)))
    if name in ("color", "contrast", "brightness", "sharpness"):
        enhancer = {"color": ImageEnhance.Color, "contrast": ImageEnhance.Contrast,
                    "brightness": ImageEnhance.Brightness, "sharpness": ImageEnhance.Sharpness}[name]
        return enhancer(pil).enhance(1.0 + sign * 0.9 * level)
    if name == "shear_x":
        return affine((1.0, sign * 0.3 * level, 0.0, 0.0, 1.0, 0.0))
    if name == "shear_y":
        return affine((1.0, 0.0, 0.0, sign * 0.3 * level, 1.0, 0.0))
    if name == "translate_x":
        return affine((1.0, 0.0, sign * 0.3 * level * width, 0.0, 1.0, 0.0))
    return affine((1.0, 0.0, 0.0, 0.0, 1.0, sign * 0.3 * level * height))  # translate_y


@register("randaugment")
@dataclasses.dataclass(frozen=True)
class RandAugment(RandomOp):
    """RandAugment-lite (Cubuk et al. 2020): `num_ops` ops drawn uniformly from RANDAUGMENT_OPS (photometric:
    autocontrast, equalize, solarize, posterize, colour, contrast, brightness, sharpness; geometric: rotate up to
    30 deg, shear up to 0.3, translate up to 30%), each at `magnitude` / 10 of its range with a random sign, on
    uint8 images of 1 or 3 channels (before `normalize`). Evaluation: unchanged."""

    num_ops: int = 2
    magnitude: float = 9

    def __post_init__(self):
        if isinstance(self.num_ops, bool) or not isinstance(self.num_ops, int) or self.num_ops < 0:
            raise ValueError(f"randaugment: num_ops must be an int >= 0, got {self.num_ops!r}")
        if isinstance(self.magnitude, bool) or not isinstance(self.magnitude, (int, float)) or not (
                0 <= self.magnitude <= 10):
            raise ValueError(f"randaugment: magnitude must be in [0, 10], got {self.magnitude!r}")

    def __call__(self, value, rng):
        from PIL import Image

        image = _image(value, "randaugment")
        if image.dtype != np.uint8 or image.shape[2] not in (1, 3):
            raise ValueError(f"randaugment expects a uint8 image of 1 or 3 channels (before normalize), "
                             f"got {_describe(value)}")
        pil = Image.fromarray(image[..., 0] if image.shape[2] == 1 else image)
        level = self.magnitude / 10.0
        for _ in range(self.num_ops):
            name = RANDAUGMENT_OPS[int(rng.integers(len(RANDAUGMENT_OPS)))]
            sign = 1.0 if rng.random() < 0.5 else -1.0
            pil = _randaugment_one(pil, name, level, sign)
        out = np.asarray(pil)
        return out[..., None] if out.ndim == 2 else out


@register("normalize")
@dataclasses.dataclass(frozen=True)
class Normalize(Op):
    """Image -> float32 `(x - mean) / std` per channel, with integer images first divided by their dtype's
    maximum (255 for uint8) and float images taken as [0, 1]. Defaults map uint8 to [-1, 1]; ImageNet's:
    `normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))`."""

    mean: Any = 0.5
    std: Any = 0.5

    def __post_init__(self):
        std = np.asarray(self.std, np.float64)
        if np.asarray(self.mean).ndim > 1 or std.ndim > 1 or np.any(std <= 0):
            raise ValueError(f"normalize: mean and std must be numbers or per-channel tuples, std > 0; got "
                             f"mean={self.mean!r}, std={self.std!r}")

    def __call__(self, value):
        image = np.asarray(value)
        x = image.astype(np.float32)
        if np.issubdtype(image.dtype, np.integer):
            x /= np.float32(np.iinfo(image.dtype).max)
        mean, std = np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)
        for name, stat in (("mean", mean), ("std", std)):
            if stat.ndim == 1 and (image.ndim == 0 or stat.shape[0] != image.shape[-1]):
                raise ValueError(f"normalize: {name} has {stat.shape[0]} values but the input has shape "
                                 f"{image.shape} (the last axis is the channels)")
        return (x - mean) / std


# -------------------------------------------------------------------------------------------------- audio


def _waveform(value, op: str) -> np.ndarray:
    audio = np.asarray(value)
    if audio.ndim != 1 or not (np.issubdtype(audio.dtype, np.floating) or np.issubdtype(audio.dtype, np.integer)):
        raise ValueError(f"{op} expects a 1-D waveform, got {_describe(value)}")
    return audio


@register("resample")
@dataclasses.dataclass(frozen=True)
class Resample(Op):
    """Waveform at the dataset's sample rate (or `from_rate`) -> float32 at `rate` (polyphase, scipy); the ops
    after it see `rate`."""

    rate: int
    from_rate: int | None = None

    def __post_init__(self):
        _positive_int("resample", "rate", self.rate)
        if self.from_rate is not None:
            _positive_int("resample", "from_rate", self.from_rate)

    def bind(self, context):
        source = self.from_rate or context.sample_rate
        if source is None:
            raise ValueError(
                "resample: the input sample rate is unknown here; give it as resample(RATE, from_rate=...)")
        return dataclasses.replace(self, from_rate=source), dataclasses.replace(context, sample_rate=self.rate)

    def __call__(self, value):
        from mmjax.data.audio_features import resample

        return resample(_waveform(value, "resample"), self.from_rate, self.rate)


def _align_offset(length: int, n: int, align: str) -> int:
    if align == "start":
        return 0
    if align == "end":
        return n - length
    return (n - length) // 2


@register("crop_or_pad")
@dataclasses.dataclass(frozen=True)
class CropOrPad(Op):
    """Waveform (last axis) -> exactly `length` samples: cut, or zero-padded, keeping the `align` = "start",
    "center" or "end" of the clip."""

    length: int
    align: str = "start"

    def __post_init__(self):
        _positive_int("crop_or_pad", "length", self.length)
        if self.align not in ("start", "center", "end"):
            raise ValueError(f"crop_or_pad: align={self.align!r}; valid: start, center, end")

    def __call__(self, value):
        from mmjax.data.audio_features import fit_length

        audio = np.asarray(value)
        if audio.ndim == 0:
            raise ValueError(f"crop_or_pad expects an array with a time axis, got {_describe(value)}")
        return fit_length(audio, self.length, offset=_align_offset(audio.shape[-1], self.length, self.align))


@register("random_crop_or_pad")
@dataclasses.dataclass(frozen=True)
class RandomCropOrPad(RandomOp):
    """Waveform -> exactly `length` samples: a random window of a longer clip, or a shorter clip zero-padded at a
    random position. Evaluation: `crop_or_pad(length, align="center")`."""

    length: int

    def __post_init__(self):
        _positive_int("random_crop_or_pad", "length", self.length)

    def eval_ops(self) -> tuple[Op, ...]:
        return (CropOrPad(self.length, "center"),)

    def __call__(self, value, rng):
        from mmjax.data.audio_features import fit_length

        audio = np.asarray(value)
        if audio.ndim == 0:
            raise ValueError(f"random_crop_or_pad expects an array with a time axis, got {_describe(value)}")
        slack = self.length - audio.shape[-1]
        offset = int(rng.integers(min(0, slack), max(0, slack) + 1))
        return fit_length(audio, self.length, offset=offset)


@register("log_mel")
@dataclasses.dataclass(frozen=True)
class LogMel(Op):
    """Waveform -> float32 log-mel spectrogram `[frames, n_mels]` (mmjax.data.audio_features.log_mel_spectrogram) at the
    sample rate in effect; `n_fft` defaults to 25 ms rounded up to a power of two, `hop_length` to 10 ms."""

    n_mels: int = 40
    n_fft: int | None = None
    hop_length: int | None = None
    fmin: float = 0.0
    fmax: float | None = None
    sample_rate: int | None = None

    def __post_init__(self):
        _positive_int("log_mel", "n_mels", self.n_mels)
        for field in ("n_fft", "hop_length", "sample_rate"):
            if getattr(self, field) is not None:
                _positive_int("log_mel", field, getattr(self, field))

    def bind(self, context):
        rate = self.sample_rate or context.sample_rate
        if rate is None:
            raise ValueError("log_mel: the sample rate is unknown here; give it as log_mel(sample_rate=...)")
        n_fft = self.n_fft or 2 ** math.ceil(math.log2(0.025 * rate))
        hop = self.hop_length or max(1, rate // 100)
        from mmjax.data.audio_features import mel_filterbank

        mel_filterbank(rate, n_fft, self.n_mels, float(self.fmin), self.fmax)  # Checks fmin/fmax now, not per example.
        return dataclasses.replace(self, sample_rate=rate, n_fft=n_fft, hop_length=hop), context

    def __call__(self, value):
        from mmjax.data.audio_features import log_mel_spectrogram

        return log_mel_spectrogram(_waveform(value, "log_mel"), self.sample_rate, n_fft=self.n_fft,
                                   hop_length=self.hop_length, n_mels=self.n_mels, fmin=float(self.fmin),
                                   fmax=self.fmax)


@register("spec_augment")
@dataclasses.dataclass(frozen=True)
class SpecAugment(RandomOp):
    """SpecAugment's masks (Park et al. 2019) on a spectrogram `[frames, bins]`: `freq_masks` bands of 0..
    `freq_width` bins and `time_masks` spans of 0..`time_width` frames set to `fill` ("mean" of the spectrogram,
    or a number). Evaluation: unchanged."""

    freq_masks: int = 2
    freq_width: int = 8
    time_masks: int = 2
    time_width: int = 10
    fill: Any = "mean"

    def __post_init__(self):
        for field in ("freq_masks", "freq_width", "time_masks", "time_width"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"spec_augment: {field} must be an int >= 0, got {value!r}")
        if self.fill != "mean" and (isinstance(self.fill, bool) or not isinstance(self.fill, (int, float))):
            raise ValueError(f"spec_augment: fill must be 'mean' or a number, got {self.fill!r}")

    def __call__(self, value, rng):
        spec = np.array(value, dtype=np.float32)  # A copy: the cached input is never written.
        if spec.ndim != 2:
            raise ValueError(
                f"spec_augment expects a spectrogram [frames, bins] (after log_mel), got {_describe(value)}")
        fill = spec.mean() if self.fill == "mean" else np.float32(self.fill)
        frames, bins = spec.shape
        for count, width, size, axis in ((self.freq_masks, self.freq_width, bins, 1),
                                         (self.time_masks, self.time_width, frames, 0)):
            for _ in range(count):
                w = int(rng.integers(0, min(width, size) + 1))
                start = int(rng.integers(0, size - w + 1))
                if axis == 1:
                    spec[:, start : start + w] = fill
                else:
                    spec[start : start + w] = fill
        return spec


# --------------------------------------------------------------------------------------------------- text


@register("tokenize")
@dataclasses.dataclass(frozen=True)
class Tokenize(Op):
    """Text (str or UTF-8 bytes; or a list of texts -> `[N, max_len]`) -> int32 token ids `[max_len]`, with the
    tokenizer's begin/end tokens, truncated and right-padded with its pad id. `tokenizer`: "minilm", a
    tokenizer.json path, or None for the dataset's own."""

    max_len: int = 32
    tokenizer: str | None = None

    def __post_init__(self):
        _positive_int("tokenize", "max_len", self.max_len)

    def bind(self, context):
        spec = self.tokenizer or context.tokenizer
        if not spec:
            raise ValueError("tokenize: this dataset has no tokenizer of its own; give one as "
                             "tokenize(tokenizer='minilm') or tokenize(tokenizer='/path/to/tokenizer.json')")
        from mmjax.data.intents import tokenizer_path

        return dataclasses.replace(self, tokenizer=tokenizer_path(spec)), context

    def __call__(self, value):
        from mmjax.data.catalog import encode_texts  # Thread-safe: one fixed-length tokenizer per (path, max_len).

        if isinstance(value, (str, bytes, np.bytes_, np.str_)):
            return encode_texts(self.tokenizer, [value], self.max_len)[0]
        texts = list(np.asarray(value, dtype=object).reshape(-1))
        if not all(isinstance(t, (str, bytes, np.bytes_, np.str_)) for t in texts):
            raise ValueError(f"tokenize expects text, got {_describe(value)}")
        return encode_texts(self.tokenizer, texts, self.max_len)


@register("pad_or_truncate")
@dataclasses.dataclass(frozen=True)
class PadOrTruncate(Op):
    """A sequence (e.g. token ids) -> exactly `length` items along its first axis: cut at the end, or padded at
    the end with `value`."""

    length: int
    value: Any = 0

    def __post_init__(self):
        _positive_int("pad_or_truncate", "length", self.length)

    def __call__(self, value):
        array = np.asarray(value)
        if array.ndim == 0:
            raise ValueError(f"pad_or_truncate expects a sequence, got {_describe(value)}")
        array = array[: self.length]
        missing = self.length - array.shape[0]
        if missing:
            pad = np.full((missing, *array.shape[1:]), self.value, array.dtype)
            array = np.concatenate([array, pad])
        return array


# -------------------------------------------------------------------------------------------------- label


def _num_classes(op: Op, context: Context) -> Op:
    count = op.num_classes or context.num_classes
    if count is None:
        raise ValueError(f"{op.name}: the number of classes is unknown here; give it as {op.name}(NUM_CLASSES)")
    _positive_int(op.name, "num_classes", count)
    return dataclasses.replace(op, num_classes=int(count))


@register("one_hot")
@dataclasses.dataclass(frozen=True)
class OneHot(Op):
    """Class id -> float32 one-hot `[num_classes]` (default: the dataset's class count)."""

    num_classes: int | None = None

    def bind(self, context):
        return _num_classes(self, context), context

    def __call__(self, value):
        label = np.asarray(value)
        if label.ndim != 0 or not np.issubdtype(label.dtype, np.integer):
            raise ValueError(f"one_hot expects one integer class id, got {_describe(value)}")
        if not 0 <= int(label) < self.num_classes:
            raise ValueError(f"one_hot: class id {int(label)} is outside [0, {self.num_classes})")
        out = np.zeros(self.num_classes, np.float32)
        out[int(label)] = 1.0
        return out


@register("multi_hot")
@dataclasses.dataclass(frozen=True)
class MultiHot(Op):
    """Class ids (any number, possibly none) -> float32 multi-hot `[num_classes]`."""

    num_classes: int | None = None

    def bind(self, context):
        return _num_classes(self, context), context

    def __call__(self, value):
        ids = np.asarray(value).reshape(-1)
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"multi_hot expects integer class ids, got {_describe(value)}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_classes):
            raise ValueError(f"multi_hot: class ids {ids.tolist()} are not all in [0, {self.num_classes})")
        out = np.zeros(self.num_classes, np.float32)
        out[ids.astype(np.int64)] = 1.0
        return out


# -------------------------------------------------------------------------------------------------- generic


@register("standardize")
@dataclasses.dataclass(frozen=True)
class Standardize(Op):
    """float32 `(x - mean(x)) / (std(x) + eps)` over the whole value (e.g. a per-utterance normalised log-mel)."""

    eps: float = 1e-5

    def __call__(self, value):
        x = np.asarray(value, np.float32)
        return (x - x.mean()) / (x.std() + np.float32(self.eps))


@register("cast")
@dataclasses.dataclass(frozen=True)
class Cast(Op):
    """The value as a numpy array of `dtype` (e.g. `cast("int32")` for class ids)."""

    dtype: str

    def __post_init__(self):
        try:
            np.dtype(self.dtype)
        except TypeError:
            raise ValueError(f"cast: {self.dtype!r} is not a numpy dtype") from None

    def __call__(self, value):
        return np.asarray(value).astype(self.dtype)


# ------------------------------------------------------------------------------------------ parse, compose


@dataclasses.dataclass(frozen=True)
class OpCall:
    """One parsed op: its name, literal arguments and source text."""

    name: str
    args: tuple
    kwargs: tuple[tuple[str, Any], ...]
    text: str


def parse(spec: str, key: str = "") -> list[OpCall]:
    """`"decode|resize(40)|flip_lr"` -> the ops' names and literal arguments (no name is looked up yet)."""
    where = f"config data.preprocess[{key!r}]" if key else "preprocessing chain"
    if not isinstance(spec, str):
        raise PreprocessError(f"{where} must be a string of ops joined by '|', got {spec!r}")
    text = spec.strip()
    if not text:
        return []
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError as error:
        raise PreprocessError(
            f"{where}: cannot parse {spec!r} ({error.msg}, column {error.offset}); expected ops joined by '|', "
            "e.g. 'decode|resize(32)|normalize'"
        ) from None
    nodes: list[ast.AST] = []

    def flatten(node: ast.AST) -> None:
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            flatten(node.left)
            flatten(node.right)
        else:
            nodes.append(node)

    flatten(tree)
    calls = []
    for node in nodes:
        source = ast.get_source_segment(text, node) or "?"
        if isinstance(node, ast.Name):
            calls.append(OpCall(node.id, (), (), source))
            continue
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
            raise PreprocessError(f"{where}: {source!r} is not an op; each op is NAME or NAME(arguments)")
        try:
            if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
                raise ValueError("* and ** are not allowed")
            args = tuple(_literal(a, text) for a in node.args)
            kwargs = tuple((k.arg, _literal(k.value, text)) for k in node.keywords)
        except ValueError as error:
            raise PreprocessError(
                f"{where}: op {source!r}: {error}; arguments must be Python literals (numbers, strings in quotes, "
                "tuples, True/False/None)"
            ) from None
        calls.append(OpCall(node.func.id, args, kwargs, source))
    return calls


def _signature(cls: type) -> str:
    """`resize(size, method='bilinear')`: the op's arguments as a config string takes them."""
    parts = [f.name if f.default is dataclasses.MISSING else f"{f.name}={f.default!r}" for f in dataclasses.fields(cls)]
    return f"{cls.name}({', '.join(parts)})"


def _literal(node: ast.AST, text: str):
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise ValueError(f"{ast.get_source_segment(text, node)!r} is not a literal") from None


def instantiate(call: OpCall, where: str) -> Op:
    """The op object of a parsed call; unknown names and bad arguments raise a PreprocessError."""
    if call.name not in PREPROCESS_OPS:
        raise PreprocessError(f"{where}: {PREPROCESS_OPS.unknown_message(call.name)}")
    cls = PREPROCESS_OPS.get(call.name)
    try:
        return cls(*call.args, **dict(call.kwargs))
    except TypeError as error:
        message = str(error).replace(f"{cls.__name__}.__init__()", call.name).replace(cls.__name__, call.name)
        raise PreprocessError(f"{where}: op {call.text!r}: {message}; signature: {_signature(cls)}") from None
    except ValueError as error:
        raise PreprocessError(f"{where}: op {call.text!r}: {error}") from None


@dataclasses.dataclass(frozen=True)
class KeyPlan:
    """One key's chain, split at its first random op (see the module docstring)."""

    key: str
    spec: str
    prefix: tuple[Op, ...]  # Deterministic ops before the first random op: `preprocess`.
    suffix: tuple[Op, ...]  # From the first random op on: `augment` (training stream).
    eval_suffix: tuple[Op, ...]  # `suffix` with random ops replaced by their deterministic counterparts.

    @property
    def private_key(self) -> str | None:
        """Where `preprocess` leaves the value before the random ops, when evaluation changes it."""
        return PRIVATE_PREFIX + self.key if self.suffix and self.eval_suffix else None


def plan(spec: str, context: Context | None = None) -> KeyPlan:
    """Parses, looks up, instantiates and binds one key's chain (all errors happen here, before any data)."""
    context = context or Context()
    where = f"config data.preprocess[{context.key!r}]" if context.key else "preprocessing chain"
    prefix: list[Op] = []
    suffix: list[Op] = []
    eval_suffix: list[Op] = []
    for call in parse(spec, context.key):
        op = instantiate(call, where)
        try:
            bound, after = op.bind(context)
            if op.random or suffix:
                suffix.append(bound)
                if op.random:
                    for counterpart in bound.eval_ops():
                        eval_suffix.append(counterpart.bind(context)[0])
                else:
                    eval_suffix.append(bound)
            else:
                prefix.append(bound)
        except (ValueError, OSError) as error:  # OSError: e.g. a tokenizer file that is not there.
            raise PreprocessError(f"{where}: op {call.text!r}: {error}") from None
        context = after
    return KeyPlan(context.key, spec, tuple(prefix), tuple(suffix), tuple(eval_suffix))


def _run(ops: Sequence[Op], value, key: str, rng: np.random.Generator | None = None):
    for op in ops:
        try:
            value = op(value, rng) if op.random else op(value)
        except PreprocessError:
            raise
        except Exception as error:  # Name the key, the op and the input; keep the original as the cause.
            raise PreprocessError(
                f"preprocess[{key!r}]: op {op} failed on {_describe(value)}: {type(error).__name__}: {error}"
            ) from error
    return value


def _absent(example: Mapping[str, Any], key: str) -> bool:
    """True when the example marks `key` missing (`<key>_mask` == 0)."""
    mask = example.get(f"{key}_mask")
    return mask is not None and float(np.asarray(mask)) == 0.0


def _zeros_like(value) -> np.ndarray:
    return np.zeros_like(np.asarray(value))


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """The deterministic part of every key's chain (`Dataset.preprocess`): the evaluation value under the key,
    and the value before the random ops under `_pre_augment/<key>` when `augment` needs it.

    Keys without a chain are passed through: all of them (`keep=None`) or only those in `keep`.
    """

    plans: tuple[KeyPlan, ...]
    keep: tuple[str, ...] | None = None

    def __call__(self, example: Mapping[str, Any]) -> dict[str, Any]:
        names = example.keys() if self.keep is None else [k for k in self.keep if k in example]
        out = {k: example[k] for k in names}
        for p in self.plans:
            if p.key not in example:
                raise PreprocessError(f"preprocess[{p.key!r}]: the example has no key {p.key!r} "
                                      f"(keys: {sorted(example)})")
            value = _run(p.prefix, example[p.key], p.key)
            absent = _absent(example, p.key)
            if p.private_key:
                out[p.private_key] = value
            result = _run(p.eval_suffix, value, p.key)
            out[p.key] = _zeros_like(result) if absent else result
        return out


@dataclasses.dataclass(frozen=True)
class Augment:
    """The random part of every key's chain (`Dataset.augment`, training stream), in sorted key order."""

    plans: tuple[KeyPlan, ...]

    def __call__(self, example: Mapping[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        out = dict(example)
        for p in self.plans:
            value = out.pop(p.private_key) if p.private_key else out[p.key]
            result = _run(p.suffix, value, p.key, rng)
            out[p.key] = _zeros_like(result) if _absent(example, p.key) else result
        return out


def compose(
    preprocess: Mapping[str, str],
    context: Mapping[str, Context] | Context | None = None,
    keep: Sequence[str] | None = None,
) -> tuple[Preprocess, Augment | None]:
    """Per-key chains -> (`preprocess`, `augment` or None when no chain has a random op), for a `Dataset`.

    `context`: one Context for every key or one per key (its `key` is set here). `keep`: keys without a chain
    that `preprocess` passes through (None: all).
    """
    plans = []
    for key in sorted(preprocess):
        base = context.get(key, Context()) if isinstance(context, Mapping) else (context or Context())
        plans.append(plan(preprocess[key], dataclasses.replace(base, key=key)))
    random_plans = tuple(p for p in plans if p.suffix)
    return (Preprocess(tuple(plans), None if keep is None else tuple(keep)),
            Augment(random_plans) if random_plans else None)
