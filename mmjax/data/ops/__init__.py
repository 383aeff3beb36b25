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

Ops (`PREPROCESS_OPS` in mmjax.registry, one module per modality in this package: image_ops, audio_ops,
text_ops, label_ops, array_ops; R = random, applied in `augment`):

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

from mmjax.data.ops import array_ops, audio_ops, image_ops, label_ops, text_ops  # noqa: F401  (register the ops)
from mmjax.data.ops.chains import PRIVATE_PREFIX, Augment, KeyPlan, Preprocess, compose, parse, plan
from mmjax.data.ops.op_base import Context, Op, PreprocessError, RandomOp
from mmjax.registry import PREPROCESS_OPS

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
