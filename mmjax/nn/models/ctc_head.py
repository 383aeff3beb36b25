"""A CTC head on an encoder's token sequence: per-frame logits over the vocabulary plus a blank, for speech-to-text
by Connectionist Temporal Classification (Graves, Fernández, Gomez, Schmidhuber 2006, "Connectionist Temporal
Classification: Labelling Unsegmented Sequence Data with Recurrent Neural Networks", ICML).

`CtcModel` encodes one modality (`modality`, e.g. the log-mel spectrogram of `audio`) and maps each of its T tokens
("frames") to `vocab_size + 1` logits: the tokenizer's ids 0 .. vocab_size - 1 and the blank, id `vocab_size`.
CTC reads such a sequence as a distribution over alignments pi (one symbol per frame) and collapses each alignment
to a label sequence B(pi) by merging repeated symbols and then removing blanks; the probability of a transcript y
is p(y | x) = sum over pi with B(pi) = y of prod_t p(pi_t | x). The loss (`mmjax.tasks.ctc`) is -log p(y | x);
greedy decoding (`ctc_greedy_decode`) takes the most likely symbol of every frame and collapses it, the best path
of Graves et al. (their eq. 11).

Frames: a token is real when the encoder's own mask says so (None = all) and, when the batch has the modality's
frame mask (`<modality>_frame_mask [B, frames]`, variable-length speech padded to one length), when it covers a real
input frame (`frames_to_token_mask`). Targets: the batch's `text` ids (the tokenizer's [BOS] words [EOS] [PAD]...),
without the ids in `strip_ids` (by default [PAD]=0, [CLS]=2, [SEP]=3), moved to the front of each row in order.

The model checks before anything compiles (at trace time) that every possible transcript fits: the text holds up
to L - 2 words ([BOS] and [EOS] are no targets), and CTC needs at least one frame per target, so the encoder must
give at least L - 2 frames (two repeated words need a blank between them, one more frame).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.data.core import frame_mask_key
from mmjax.nn.common import Dtype, config_context, frames_to_token_mask
from mmjax.nn.layers import MLP

TEXT_KEY = "text"


def ctc_targets(text: jax.Array, strip_ids: Sequence[int]) -> tuple[jax.Array, jax.Array]:
    """`text [B, L]` -> (`targets [B, L]`, `target_mask [B, L]` bool): the ids not in `strip_ids`, in their order,
    moved to the front of each row (a stable sort on "is stripped"); the rest of the row is masked."""
    keep = jnp.ones(text.shape, bool)
    for i in strip_ids:
        keep = keep & (text != i)
    order = jnp.argsort(~keep, axis=1, stable=True)
    return jnp.take_along_axis(text, order, axis=1), jnp.take_along_axis(keep, order, axis=1)


def ctc_greedy_decode(logits: jax.Array, mask: jax.Array, blank_id: int, pad: int = -1) -> jax.Array:
    """Best-path CTC decoding: `logits [B, T, V]`, `mask [B, T]` (real frames) -> `int32 [B, T]` label ids.

    The most likely symbol of every real frame; a frame that repeats the previous frame's symbol is merged into it
    and blanks are dropped (so "a a - a" gives "a a": a blank separates repeats); the labels are moved to the front
    of each row, the rest is `pad`."""
    best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    previous = jnp.concatenate([jnp.full_like(best[:, :1], -1), best[:, :-1]], axis=1)
    keep = (best != previous) & (best != blank_id) & jnp.asarray(mask, bool)
    order = jnp.argsort(~keep, axis=1, stable=True)
    labels = jnp.take_along_axis(best, order, axis=1)
    return jnp.where(jnp.take_along_axis(keep, order, axis=1), labels, pad)


class CtcModel(nn.Module):
    """`{modality: [B, ...], "text": [B, L] (, "<modality>_frame_mask": [B, frames])}` -> `ctc_logits [B, T, V + 1]`
    (float32; blank = `vocab_size`), `ctc_mask [B, T]`, `targets [B, L]`, `target_mask [B, L]` (module docstring).

    `hidden`: widths of an optional MLP on each token before the output layer (ReLU, `dropout`).
    """

    encoders: Mapping[str, nn.Module]
    modality: str = "audio"
    vocab_size: int = 16
    hidden: Sequence[int] = ()
    dropout: float = 0.0
    strip_ids: Sequence[int] = (0, 2, 3)
    dtype: Dtype | None = None

    @property
    def blank_id(self) -> int:
        """The blank symbol: one past the tokenizer's ids."""
        return self.vocab_size

    @property
    def extra_inputs(self) -> tuple[str, ...]:
        """Batch keys the model reads besides its encoder's modality (the train loop feeds them)."""
        return (TEXT_KEY,)

    def __call__(self, batch: Mapping[str, jax.Array], *, train: bool) -> dict[str, jax.Array]:
        if TEXT_KEY not in batch:
            raise KeyError(f"batch has no {TEXT_KEY!r} (the transcripts CTC learns); keys {sorted(batch)}")
        logits, mask = self.frames(batch, train=train)
        text = batch[TEXT_KEY]
        text = text[:, 0] if text.ndim == 3 else text
        most = text.shape[1] - 2
        if most > logits.shape[1]:
            raise ValueError(
                f"CTC: texts of {text.shape[1]} ids hold up to {most} target tokens, but the {self.modality} encoder "
                f"gives {logits.shape[1]} frames per example and CTC needs at least one frame per target token: "
                f"make the encoder keep more frames (a smaller time stride or patch) or shorten data.max_len")
        targets, target_mask = ctc_targets(text, self.strip_ids)
        return {"ctc_logits": logits, "ctc_mask": mask, "targets": targets, "target_mask": target_mask}

    @nn.compact
    def frames(self, batch: Mapping[str, jax.Array], *, train: bool = False) -> tuple[jax.Array, jax.Array]:
        """float32 per-frame logits `[B, T, vocab_size + 1]` and the `[B, T]` bool mask of real frames."""
        if self.modality not in batch:
            raise KeyError(f"batch is missing modality {self.modality!r} that the CTC head reads; batch keys "
                           f"{sorted(batch)}")
        with config_context(f"model.encoders.{self.modality}"):
            out = self.encoders[self.modality](batch[self.modality], train=train)
        tokens = out.tokens
        mask = jnp.ones(tokens.shape[:2], bool) if out.mask is None else jnp.asarray(out.mask, bool)
        frame_mask = batch.get(frame_mask_key(self.modality))
        if frame_mask is not None:
            mask = mask & frames_to_token_mask(frame_mask, tokens.shape[1])
        x = MLP(tuple(self.hidden), dropout=self.dropout, dtype=self.dtype, name="mlp")(tokens, train=train)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        logits = nn.Dense(self.vocab_size + 1, dtype=jnp.float32, name="output")(x)
        return logits, mask

    def greedy(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        """Best-path transcripts `int32 [B, T]` (label ids, then -1) of a batch (`ctc_greedy_decode`)."""
        logits, mask = self.frames(batch, train=False)
        return ctc_greedy_decode(logits, mask, self.blank_id)


def jit_greedy(model: CtcModel):
    """`(variables, batch, rng) -> {"tokens": best-path label ids [B, T]}` compiled (the generation functions'
    signature, `mmjax.nn.decoding.jit_generate`; `rng` is unused: best-path decoding is deterministic)."""
    return jax.jit(lambda variables, batch, rng: {"tokens": model.apply(variables, batch, method=CtcModel.greedy)})


# `config.model.ctc` fields.
FIELDS = ("modality", "vocab_size", "hidden", "dropout", "strip_ids")


def build_ctc(model_config, encoders: Mapping[str, nn.Module], dtype) -> CtcModel:
    """`CtcModel` from `config.model` (`encoders`, `ctc = dict(...)`), every field checked before tracing."""
    options = dict(model_config.get("ctc", None) or {})
    unknown = sorted(set(options) - set(FIELDS))
    if unknown:
        raise ValueError(f"config model.ctc: unknown field(s) {unknown}; valid: {sorted(FIELDS)}")
    modality = options.get("modality", CtcModel.modality)
    if sorted(encoders) != [modality]:
        raise ValueError(f"config model.ctc.modality={modality!r}: the CTC head reads one encoder, that modality's; "
                         f"model.encoders has {sorted(encoders)}")
    vocab_size = options.get("vocab_size", CtcModel.vocab_size)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
        raise ValueError(f"config model.ctc.vocab_size={vocab_size!r} must be a positive integer (the tokenizer's "
                         "tokens; the blank is one more)")
    hidden = tuple(options.get("hidden", ()))
    if any(isinstance(h, bool) or not isinstance(h, int) or h <= 0 for h in hidden):
        raise ValueError(f"config model.ctc.hidden={hidden!r} must hold positive integers (layer widths)")
    if not 0.0 <= options.get("dropout", 0.0) < 1.0:
        raise ValueError(f"config model.ctc.dropout={options['dropout']!r} must be in [0, 1)")
    strip = tuple(options.get("strip_ids", CtcModel.strip_ids))
    if any(not 0 <= i < vocab_size for i in strip):
        raise ValueError(f"config model.ctc.strip_ids={strip!r} must be ids of the vocabulary of {vocab_size}")
    options.update(hidden=hidden, strip_ids=strip)
    return CtcModel(encoders=dict(encoders), dtype=jnp.dtype(dtype) if dtype else None, **options)
