"""Tabular encoder over one float array `[B, F]`, plus the NumPy helpers its config and data pipeline need.

Categorical columns hold integer codes `0 .. cardinality - 1` stored as floats; every other column is numeric.
The encoder cannot see values at trace time, so it does not validate codes: run `check_categorical` in the data
pipeline. An invalid code (negative, >= cardinality, non-integer or NaN) is not clipped: its embedding is NaN, so
it shows up as a NaN loss instead of a silently wrong answer.

Numeric columns are standardised with fixed statistics from the training split: fill `numeric_mean` /
`numeric_std` in the config with `tabular_stats(train_array, categorical_columns)`.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.nn.common import Dtype, EncoderOutput, check_rank
from mmjax.nn.transformer import maybe_remat
from mmjax.registry import ENCODERS


def numeric_columns(num_features: int, categorical_columns: Sequence[int]) -> tuple[int, ...]:
    """Indices of the numeric columns: every column of `[B, num_features]` not in `categorical_columns`."""
    categorical = set(int(c) for c in categorical_columns)
    return tuple(c for c in range(num_features) if c not in categorical)


def tabular_stats(train_array, categorical_columns: Sequence[int] = ()) -> dict[str, tuple[float, ...]]:
    """`dict(numeric_mean=..., numeric_std=...)` of the numeric columns of the training split `[N, F]`, in column
    order, for the `tabular_mlp` config. Constant columns get std 1 (they are only centred). Raises on NaN/inf."""
    array = np.asarray(train_array, np.float64)
    if array.ndim != 2 or array.shape[0] == 0:
        raise ValueError(f"tabular_stats expects a non-empty [N, F] array, got shape {array.shape}")
    _check_columns("tabular_stats", array.shape[1], categorical_columns)
    numeric = array[:, list(numeric_columns(array.shape[1], categorical_columns))]
    bad = ~np.isfinite(numeric)
    if bad.any():
        row, j = np.argwhere(bad)[0]
        column = numeric_columns(array.shape[1], categorical_columns)[j]
        raise ValueError(f"tabular_stats: numeric column {column} has non-finite value {numeric[row, j]} (row {row})")
    std = numeric.std(axis=0)
    std = np.where(std > 1e-12, std, 1.0)
    return {"numeric_mean": tuple(map(float, numeric.mean(axis=0))), "numeric_std": tuple(map(float, std))}


def check_categorical(array, categorical_columns: Sequence[int], cardinalities: Sequence[int]) -> None:
    """Raises ValueError naming the column, row, value and cardinality of the first invalid categorical code
    (not an integer in `0 .. cardinality - 1`) of `array` `[N, F]` (or one row `[F]`)."""
    array = np.asarray(array)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2:
        raise ValueError(f"check_categorical expects an [N, F] array, got shape {array.shape}")
    _check_columns("check_categorical", array.shape[1], categorical_columns, cardinalities)
    for column, cardinality in zip(categorical_columns, cardinalities):
        codes = array[:, column]
        bad = ~((codes >= 0) & (codes < cardinality) & (np.floor(codes) == codes))  # NaN is bad too.
        if bad.any():
            row = int(np.argmax(bad))
            raise ValueError(
                f"categorical column {column} has invalid code {float(codes[row])} (row {row}); codes must be integers "
                f"in [0, {cardinality}) for cardinality {cardinality}"
            )


def _check_columns(
    where: str, num_features: int, categorical_columns: Sequence[int], cardinalities: Sequence[int] | None = None
) -> None:
    columns = [int(c) for c in categorical_columns]
    if len(set(columns)) != len(columns):
        raise ValueError(f"{where}: categorical_columns {tuple(columns)} has duplicates")
    outside = [c for c in columns if not 0 <= c < num_features]
    if outside:
        raise ValueError(
            f"{where}: categorical_columns {tuple(columns)} has column(s) {outside} outside an input of "
            f"{num_features} columns"
        )
    if cardinalities is not None:
        if len(cardinalities) != len(columns):
            raise ValueError(
                f"{where}: cardinalities has {len(cardinalities)} entries {tuple(cardinalities)} but there are "
                f"{len(columns)} categorical_columns {tuple(columns)}; give one cardinality per categorical column"
            )
        if any(int(k) < 1 for k in cardinalities):
            raise ValueError(f"{where}: cardinalities must be >= 1, got {tuple(cardinalities)}")


class _MLP(nn.Module):
    """Dense -> ReLU -> dropout per hidden width, then Dense(out). `deterministic` is positional (static for remat)."""

    hidden: Sequence[int]
    out: int
    dropout: float = 0.0
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        for i, width in enumerate(self.hidden):
            x = nn.relu(nn.Dense(width, dtype=self.dtype, name=f"hidden_{i}")(x))
            x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
        return nn.Dense(self.out, dtype=self.dtype, name="out")(x)


@ENCODERS.register("tabular_mlp")
class TabularMLP(nn.Module):
    """Tabular encoder: FT-Transformer-style feature tokens (Gorishniy et al. 2021) plus an MLP summary.

    Input `[B, F]`: columns `categorical_columns` hold integer codes (`cardinalities`, one per categorical
    column); the other `F - len(categorical_columns)` columns are numeric, standardised as
    `(x - numeric_mean) / numeric_std` (one entry per numeric column, in column order; required when there are
    numeric columns, see `tabular_stats`; pass zeros / ones for data that is already standardised).

    * Categorical column j: embedding table `embedding_{j}` `[cardinality, embed_dim]` (j counts categorical
      columns). Invalid codes give NaN embeddings (see the module docstring).
    * tokens `[B, F, width]`, one per column in column order: numeric column -> `z * weight + bias` with a
      learned `[width]` weight and bias per column (`numeric_weight`, `numeric_bias`); categorical column ->
      its embedding through a per-column linear map (`categorical_weight` `[n_cat, embed_dim, width]`,
      `categorical_bias`).
    * pooled `[B, width]`: `mlp` (Dense + ReLU + dropout per `hidden` width, then Dense(width)) over the
      concatenation of the standardised numerics and the categorical embeddings.

    `dtype` is the compute dtype (parameters, standardisation and the embedding lookup stay float32); `remat`
    ("none" / "full" / "dots") rematerialises the MLP. Column counts and statistics are checked at trace time.
    """

    categorical_columns: Sequence[int] = ()
    cardinalities: Sequence[int] = ()
    embed_dim: int = 8
    numeric_mean: Sequence[float] = ()
    numeric_std: Sequence[float] = ()
    width: int = 64
    hidden: Sequence[int] = (128,)
    dropout: float = 0.0
    remat: str = "none"
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> EncoderOutput:
        check_rank("tabular_mlp", x, 2, "[B, F]")
        num_features = x.shape[1]
        categorical = tuple(int(c) for c in self.categorical_columns)
        numeric = numeric_columns(num_features, categorical)
        self._check(num_features, categorical, numeric)
        x = jnp.asarray(x, jnp.float32)
        dtype = self.dtype or jnp.float32
        batch = x.shape[0]
        num_tokens, cat_tokens, summary = [], [], []

        if numeric:
            mean = np.asarray(self.numeric_mean, np.float32)
            std = np.asarray(self.numeric_std, np.float32)
            z = (x[:, list(numeric)] - mean) / std  # [B, n_num]
            weight = self.param("numeric_weight", nn.initializers.normal(1.0), (len(numeric), self.width))
            bias = self.param("numeric_bias", nn.initializers.zeros_init(), (len(numeric), self.width))
            z = z.astype(dtype)
            num_tokens = [z[:, :, None] * weight.astype(dtype) + bias.astype(dtype)]
            summary.append(z)

        if categorical:
            embeddings = []
            for j, (column, cardinality) in enumerate(zip(categorical, self.cardinalities)):
                table = self.param(
                    f"embedding_{j}", nn.initializers.normal(1.0), (int(cardinality), self.embed_dim), jnp.float32
                )
                codes = x[:, column]
                valid = (codes >= 0) & (codes < cardinality) & (jnp.floor(codes) == codes)
                index = jnp.where(valid, codes, cardinality).astype(jnp.int32)  # cardinality: out of bounds -> NaN.
                embeddings.append(jnp.take(table, index, axis=0, mode="fill", fill_value=jnp.nan))
            e = jnp.stack(embeddings, axis=1).astype(dtype)  # [B, n_cat, embed_dim]
            init = nn.initializers.lecun_normal(in_axis=1, out_axis=2, batch_axis=(0,))
            weight = self.param("categorical_weight", init, (len(categorical), self.embed_dim, self.width))
            bias = self.param("categorical_bias", nn.initializers.zeros_init(), (len(categorical), self.width))
            cat_tokens = [jnp.einsum("bce,cew->bcw", e, weight.astype(dtype)) + bias.astype(dtype)]
            summary.append(e.reshape(batch, -1))

        # Numeric tokens then categorical ones, reordered into column order.
        order = np.argsort(np.asarray(numeric + categorical))
        tokens = jnp.concatenate(num_tokens + cat_tokens, axis=1)[:, order]
        mlp = maybe_remat(_MLP, self.remat, static_argnums=(2,))
        pooled = mlp(self.hidden, self.width, self.dropout, self.dtype, name="mlp")(
            jnp.concatenate(summary, axis=1), not train
        )
        return EncoderOutput(tokens=tokens, pooled=pooled)

    def _check(self, num_features: int, categorical: tuple[int, ...], numeric: tuple[int, ...]) -> None:
        if num_features == 0:
            raise ValueError("tabular_mlp: the input has no columns")
        _check_columns("tabular_mlp", num_features, categorical, self.cardinalities)
        if len(self.numeric_mean) != len(self.numeric_std):
            raise ValueError(
                f"tabular_mlp: numeric_mean has {len(self.numeric_mean)} entries but numeric_std has "
                f"{len(self.numeric_std)}; give one mean and one std per numeric column"
            )
        if numeric and not self.numeric_mean:
            raise ValueError(
                f"tabular_mlp: the input has {len(numeric)} numeric column(s) {numeric} but numeric_mean / "
                f"numeric_std are empty; fill them with mmjax.nn.encoders.tabular.tabular_stats(train_array, "
                f"categorical_columns) (or zeros / ones if the data is already standardised)"
            )
        if len(self.numeric_mean) != len(numeric):
            raise ValueError(
                f"tabular_mlp: input has {num_features} columns, {len(categorical)} categorical "
                f"{categorical}, so {len(numeric)} numeric, but numeric_mean / numeric_std have "
                f"{len(self.numeric_mean)} entries"
            )
        if any(not s > 0 for s in self.numeric_std):
            raise ValueError(f"tabular_mlp: numeric_std must be > 0, got {tuple(self.numeric_std)}")
