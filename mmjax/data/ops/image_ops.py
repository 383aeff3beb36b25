"""Image ops: decode, resize, crops, flips, RandAugment and normalize (Pillow; uint8 `[H, W, C]` until `normalize`)."""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Any

import numpy as np

from mmjax.data.core import is_int
from mmjax.data.ops.op_base import Op, RandomOp, describe, positive_arg, register


def _hw(op: str, size: Any) -> tuple[int, int]:
    """`size` as (height, width): an int (square) or a pair of ints."""
    if isinstance(size, (tuple, list)):
        if len(size) != 2:
            raise ValueError(f"{op}: size must be an int or (height, width), got {size!r}")
        return positive_arg(op, "size", size[0]), positive_arg(op, "size", size[1])
    side = positive_arg(op, "size", size)
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
        raise ValueError(f"{op} expects an image [H, W, C] (decode it first), got {describe(value)}")
    return image


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
    if not is_int(pad) or pad < 0:
        raise ValueError(f"{op}: pad must be an int >= 0, got {pad!r}")


def _check_crop(op: str, image: np.ndarray, height: int, width: int) -> None:
    if image.shape[0] < height or image.shape[1] < width:
        raise ValueError(
            f"{op}: image of {image.shape[0]}x{image.shape[1]} is smaller than the crop {height}x{width} "
            "(resize it first, e.g. resize_small)"
        )


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
        positive_arg("resize_small", "size", self.size)
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
        positive_arg("random_resized_crop", "size", self.size)
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
        if not is_int(self.num_ops) or self.num_ops < 0:
            raise ValueError(f"randaugment: num_ops must be an int >= 0, got {self.num_ops!r}")
        if isinstance(self.magnitude, bool) or not isinstance(self.magnitude, (int, float)) or not (
                0 <= self.magnitude <= 10):
            raise ValueError(f"randaugment: magnitude must be in [0, 10], got {self.magnitude!r}")

    def __call__(self, value, rng):
        from PIL import Image

        image = _image(value, "randaugment")
        if image.dtype != np.uint8 or image.shape[2] not in (1, 3):
            raise ValueError(f"randaugment expects a uint8 image of 1 or 3 channels (before normalize), "
                             f"got {describe(value)}")
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
