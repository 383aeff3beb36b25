"""Audio encoders over log-mel spectrograms `[B, frames, mels]` (computed by the pipeline: mmjax.data.audio_features).

* `spectrogram_cnn`: a small 2-D CNN.
* `ast`: an Audio Spectrogram Transformer (Gong et al. 2021, "AST: Audio Spectrogram Transformer", Interspeech).
* `LogMelFrontend` (not an encoder): the pipeline's log-mel spectrogram in JAX, for waveforms `[B, samples]`.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange

from mmjax.data.audio_features import hann_window, mel_filterbank
from mmjax.nn.common import Dtype, EncoderOutput, check_rank, to_dtype
from mmjax.nn.encoders.conditioning import Film, FilmConvReluPool, check_film
from mmjax.nn.layers import ConvReluPool
from mmjax.nn.transformer import Transformer, masked_mean, maybe_remat
from mmjax.registry import ENCODERS


@ENCODERS.register("spectrogram_cnn")
class SpectrogramCNN(nn.Module):
    """2-D CNN over time x frequency: 3x3 conv + ReLU + 2x2 max-pool per stage.

    Tokens are the time steps of the last map (frequency folded into channels) projected to `width`; the pooled
    feature is a dense layer over the flattened map. `remat` ("none" / "full" / "dots") rematerialises each
    stage (conv + ReLU + pool) in the backward pass; the parameter names do not depend on it. `dtype` is the
    compute dtype (parameters stay float32). FiLM (`film=`, `mmjax.nn.encoders.conditioning`) scales and shifts
    each conv's output channels before its ReLU; `film_channels()` = `features`.
    """

    features: Sequence[int] = (16, 32, 64)
    width: int = 128
    dropout: float = 0.0
    conv_impl: str = "auto"
    remat: str = "none"
    dtype: Dtype | None = None

    def film_channels(self) -> tuple[int, ...]:
        return tuple(self.features)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, film: Film = None) -> EncoderOutput:
        check_rank("spectrogram_cnn", x, 3, "[B, frames, mels]")
        check_film("spectrogram_cnn", film, self.film_channels(), x.shape[0])
        x = to_dtype(x, self.dtype)[..., None]
        stage = maybe_remat(ConvReluPool if film is None else FilmConvReluPool, self.remat, static_argnums=())
        for i, features in enumerate(self.features):
            layer = stage(features, (3, 3), impl=self.conv_impl, dtype=self.dtype, name=f"Conv_{i}")
            x = layer(x) if film is None else layer(x, *film[i])
        tokens = nn.Dense(self.width, dtype=self.dtype, name="token_proj")(rearrange(x, "b t f c -> b t (f c)"))
        pooled = nn.relu(nn.Dense(self.width, dtype=self.dtype, name="pool_proj")(rearrange(x, "b t f c -> b (t f c)")))
        pooled = nn.Dropout(self.dropout, deterministic=not train)(pooled)
        return EncoderOutput(tokens=tokens, pooled=pooled)


def patch_grid(frames: int, mels: int, patch: tuple[int, int], stride: tuple[int, int]) -> tuple[int, int]:
    """Number of patches along time and frequency: `(frames - patch_time) // stride_time + 1` (and likewise for
    mels). Patches that would run past the end are dropped (no padding)."""
    return (frames - patch[0]) // stride[0] + 1, (mels - patch[1]) // stride[1] + 1


def extract_patches(x: jax.Array, patch: tuple[int, int], stride: tuple[int, int]) -> jax.Array:
    """`[B, frames, mels]` -> `[B, grid_time, grid_freq, patch_time * patch_freq]`.

    Each patch is flattened time-major: element `(t, f)` of the patch (t-th frame, f-th mel bin counted from the
    patch's corner) lands at index `t * patch_freq + f`. Non-overlapping patches (stride == patch) are a reshape;
    overlapping or gapped ones a gather.
    """
    (pt, pf), (st, sf) = patch, stride
    nt, nf = patch_grid(x.shape[1], x.shape[2], patch, stride)
    if (pt, pf) == (st, sf):
        x = x[:, : nt * pt, : nf * pf]
        return rearrange(x, "b (nt pt) (nf pf) -> b nt nf (pt pf)", pt=pt, pf=pf)
    rows = (np.arange(nt) * st)[:, None] + np.arange(pt)  # [nt, pt]
    cols = (np.arange(nf) * sf)[:, None] + np.arange(pf)  # [nf, pf]
    x = x[:, rows[:, :, None, None], cols[None, None, :, :]]  # [B, nt, pt, nf, pf]
    return rearrange(x, "b nt pt nf pf -> b nt nf (pt pf)")


@ENCODERS.register("ast")
class AudioSpectrogramTransformer(nn.Module):
    """AST: a ViT over time x frequency patches of a log-mel spectrogram `[B, frames, mels]`.

    * Patches: `patch_time x patch_freq` windows every `stride_time` frames / `stride_freq` mel bins (stride
      None = the patch size, i.e. non-overlapping; smaller strides overlap, as in the AST paper's 16x16 patches
      with stride 10). Patches past the spectrogram's end are dropped. Grid order is time-major: patch token
      `i * grid_freq + j` covers frames from `i * stride_time` and mel bins from `j * stride_freq`.
    * Patch embedding `patch_embed`: a Dense over each patch flattened time-major (see `extract_patches`), so
      its kernel `[patch_time * patch_freq, width]` reshapes to a `[patch_time, patch_freq, 1, width]` conv kernel.
    * Position embeddings `pos_embed`: one learned vector per grid position, `[grid_time, grid_freq, width]`,
      sized from the input at init (normal, std 0.02). Applying the parameters to a spectrogram with a different
      patch grid raises an error naming both grids (fix the input length, e.g. `fit_length` in the pipeline).
    * `pool="cls"` prepends a learned `cls_token` (normal, std 0.02; no position embedding; not zeros, whose
      LayerNorm has a ~1/sqrt(eps) gradient) and pools its output; `pool="mean"`
      averages the patch tokens and has no CLS token.
    * Encoder: the shared pre-LN `Transformer` (`depth` blocks, final LayerNorm); `mlp_dim` None = 4 * width.
      Dropout `dropout` also applies to the embedded patches.

    Returns tokens = the `[B, grid_time * grid_freq, width]` patch tokens (without CLS) and pooled `[B, width]`.
    `dtype` is the compute dtype (parameters stay float32); `remat` ("none" / "full" / "dots") rematerialises
    each transformer block.
    """

    patch_time: int = 16
    patch_freq: int = 16
    stride_time: int | None = None
    stride_freq: int | None = None
    width: int = 192
    depth: int = 4
    num_heads: int = 3
    mlp_dim: int | None = None
    pool: str = "cls"
    dropout: float = 0.0
    attention_dropout: float = 0.0
    remat: str = "none"
    attention_impl: str = "auto"  # "auto": "fused" on GPU in 16-bit, else "packed"; or "flax" (see transformer.py)
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> EncoderOutput:
        check_rank("ast", x, 3, "[B, frames, mels]")
        patch = (self.patch_time, self.patch_freq)
        stride = (self.stride_time or self.patch_time, self.stride_freq or self.patch_freq)
        self._check_config(patch, stride)
        frames, mels = x.shape[1:]
        if frames < patch[0] or mels < patch[1]:
            raise ValueError(
                f"ast: spectrogram of shape {tuple(x.shape)} [B, frames, mels] is smaller than one patch "
                f"(patch_time x patch_freq = {patch[0]} x {patch[1]}); lower the patch size or lengthen the input"
            )
        grid = patch_grid(frames, mels, patch, stride)
        if self.has_variable("params", "pos_embed"):
            initialised = tuple(self.get_variable("params", "pos_embed").shape[:2])
            if initialised != grid:
                raise ValueError(
                    f"ast: pos_embed was initialised for a {initialised[0]} x {initialised[1]} (time x frequency) "
                    f"patch grid, but input of shape {tuple(x.shape)} [B, frames, mels] with patch {patch} and "
                    f"stride {stride} gives {grid[0]} x {grid[1]}; feed spectrograms of the initialisation's size"
                )

        x = to_dtype(x, self.dtype)
        x = nn.Dense(self.width, dtype=self.dtype, name="patch_embed")(extract_patches(x, patch, stride))
        pos = self.param("pos_embed", nn.initializers.normal(0.02), (*grid, self.width), jnp.float32)
        x = rearrange(x + pos.astype(x.dtype), "b nt nf d -> b (nt nf) d")
        if self.pool == "cls":
            cls = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, self.width), jnp.float32)
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, self.width)), x], axis=1)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = Transformer(
            num_layers=self.depth,
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim or 4 * self.width,
            dropout=self.dropout,
            attention_dropout=self.attention_dropout,
            pre_norm=True,
            remat=self.remat,
            attention_impl=self.attention_impl,
            dtype=self.dtype,
            name="transformer",
        )(x, train=train)
        if self.pool == "cls":
            return EncoderOutput(tokens=x[:, 1:], pooled=x[:, 0])
        return EncoderOutput(tokens=x, pooled=masked_mean(x, None))

    def _check_config(self, patch: tuple[int, int], stride: tuple[int, int]) -> None:
        names = ("patch_time", "patch_freq", "stride_time", "stride_freq")
        for name, value in zip(names, (*patch, *stride)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"ast: {name} must be a positive int, got {value!r}")
        if self.pool not in ("cls", "mean"):
            raise ValueError(f"ast: pool must be 'cls' or 'mean', got {self.pool!r}")
        if self.width % self.num_heads:
            raise ValueError(f"ast: width {self.width} is not divisible by num_heads {self.num_heads}")


class LogMelFrontend(nn.Module):
    """`audio_features.log_mel_spectrogram` in JAX: waveforms `[..., samples]` -> float32 `[..., frames, n_mels]`.

    Same analysis as the NumPy pipeline (periodic Hann frames of `n_fft` samples every `hop_length`, no centre
    padding, `|rfft|**2` through the same HTK mel filterbank, `log(max(mel, log_floor))`); it matches it to
    float32 tolerance. Integer waveforms are scaled to [-1, 1) as there. `normalize=True` then standardises each
    example over frames x mels, as `AvDigitsPreprocess` does (`(mel - mean) / (std + 1e-5)`). Always computed in
    float32 (no parameters); put it before an encoder to feed it waveforms, e.g.
    `encoder(LogMelFrontend(16000, 400, 160, 64)(waveform), train=train)`.
    """

    sample_rate: int = 16000
    n_fft: int = 400
    hop_length: int = 160
    n_mels: int = 64
    fmin: float = 0.0
    fmax: float | None = None
    log_floor: float = 1e-6
    normalize: bool = False

    @nn.compact
    def __call__(self, waveform: jax.Array, *, train: bool = False) -> jax.Array:
        del train
        filters = mel_filterbank(self.sample_rate, self.n_fft, self.n_mels, self.fmin, self.fmax)
        if not self.hop_length >= 1:
            raise ValueError(f"LogMelFrontend: hop_length must be a positive int, got {self.hop_length!r}")
        if not self.log_floor > 0:
            raise ValueError(f"LogMelFrontend: log_floor must be > 0, got {self.log_floor!r}")
        if waveform.ndim == 0 or waveform.shape[-1] < self.n_fft:
            raise ValueError(
                f"LogMelFrontend: waveform of shape {tuple(waveform.shape)} is shorter than one frame "
                f"(n_fft={self.n_fft})"
            )
        if jnp.issubdtype(waveform.dtype, jnp.integer):
            audio = waveform.astype(jnp.float32) / np.float32(-np.iinfo(waveform.dtype).min)
        else:
            audio = waveform.astype(jnp.float32)
        num_frames = 1 + (audio.shape[-1] - self.n_fft) // self.hop_length
        index = (np.arange(num_frames) * self.hop_length)[:, None] + np.arange(self.n_fft)
        frames = audio[..., index] * jnp.asarray(hann_window(self.n_fft))
        spectrum = jnp.fft.rfft(frames, axis=-1)
        power = spectrum.real**2 + spectrum.imag**2
        mel = jnp.matmul(power, jnp.asarray(filters), precision=jax.lax.Precision.HIGHEST)
        mel = jnp.log(jnp.maximum(mel, np.float32(self.log_floor)))
        if self.normalize:
            mean = mel.mean(axis=(-2, -1), keepdims=True)
            std = mel.std(axis=(-2, -1), keepdims=True)
            mel = (mel - mean) / (std + 1e-5)
        return mel
