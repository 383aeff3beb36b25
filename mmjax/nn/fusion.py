"""Fusion modules: combine per-modality encoder outputs into one representation (or, decision-level, into logits).

Interface: `fusion(features: Mapping[str, EncoderOutput], *, masks: Mapping[str, Array] | None, train) -> Array`.

Conventions shared by every method:

* Modalities are processed in sorted key order, so results never depend on dict insertion order. Parameters that
  belong to one modality carry its name (`proj_audio`, `factor_image`, `head_text`, ...).
* `masks[m]` is a `[B]` array of 1 (present) / 0 (missing; any value <= 0 counts as missing). A missing modality
  contributes nothing: its features are replaced by zeros with `jnp.where` before any parameterised path (so their
  gradient is exactly zero), and the method then excludes it (weights renormalised over the modalities present,
  neutral element 1 in products, its tokens masked out of attention keys). An example with every modality missing
  still gets a finite output.
* `EncoderOutput.mask` (token padding, `[B, T]`) is honoured by the token-level methods.
* Encoders may have different widths `D_m` and token counts `T_m`; methods that need a common width project each
  modality to `dim` with a Dense layer of its own named `proj_{modality}`.
* `dtype` is the compute dtype of the dense layers; parameters stay float32.
* Methods with `min_modalities = 2` raise a ValueError naming the method when given a single modality (`concat`
  and `late` also serve single-modality baselines).

A fusion whose class sets `produces_logits = True` is decision-level: it owns its per-modality heads. A fusion whose
class sets `conditions_encoders = True` (`film`) is serial: the model encodes the conditioning modalities first,
asks the fusion's `generate` for the conditioned encoder's FiLM parameters, then runs that encoder with them
(`mmjax.nn.models.multimodal`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.nn.common import Dtype, EncoderOutput
from mmjax.nn.encoders.conditioning import Film
from mmjax.nn.transformer import (
    LAYER_NORM_EPS,
    Transformer,
    TransformerBlock,
    attention_mask,
    masked_mean,
    maybe_remat,
)
from mmjax.registry import FUSIONS

Masks = Mapping[str, jax.Array] | None


# --------------------------------------------------------------------------------------------- shared helpers


def _mask(masks: Masks, modality: str, batch: int) -> jax.Array:
    """The `[B]` float presence mask of one modality: 1 present, 0 missing (all ones when the batch has none)."""
    if masks is None or masks.get(modality) is None:
        return jnp.ones((batch,), jnp.float32)
    mask = jnp.asarray(masks[modality])
    if mask.shape != (batch,):
        raise ValueError(f"mask of modality {modality!r} must have shape [B] = ({batch},), got {tuple(mask.shape)}")
    return (mask > 0).astype(jnp.float32)


class _Modality(NamedTuple):
    """One modality's inputs with missing examples already zeroed (see `_gather`)."""

    name: str
    tokens: jax.Array  # [B, T, D], zero where the modality is missing.
    pooled: jax.Array  # [B, D], zero where the modality is missing.
    present: jax.Array  # [B] float32, 1 present / 0 missing.
    token_mask: jax.Array  # [B, T] float32: 1 for a real token of a present modality.

    @property
    def keep(self) -> jax.Array:
        """`[B]` boolean presence."""
        return self.present > 0


def _gather(
    features: Mapping[str, EncoderOutput], masks: Masks, method: str, min_modalities: int = 2
) -> list[_Modality]:
    """The modalities in sorted order, features of missing examples replaced by zeros (exactly zero gradient)."""
    names = sorted(features)
    if len(names) < min_modalities:
        raise ValueError(
            f"fusion {method!r} needs at least {min_modalities} modalities, got {len(names)} ({names}); "
            "use 'concat' for a single-modality model"
        )
    out = []
    for name in names:
        f = features[name]
        present = _mask(masks, name, f.pooled.shape[0])
        keep = present > 0
        tokens = jnp.where(keep[:, None, None], f.tokens, 0)
        pooled = jnp.where(keep[:, None], f.pooled, 0)
        padding = jnp.ones(tokens.shape[:2], jnp.float32) if f.mask is None else (f.mask > 0).astype(jnp.float32)
        out.append(_Modality(name, tokens, pooled, present, padding * present[:, None]))
    return out


def _presence(modalities: Sequence[_Modality]) -> jax.Array:
    """`[B, M]` presence matrix in sorted modality order."""
    return jnp.stack([m.present for m in modalities], axis=1)


def _renormalise(weights: jax.Array) -> jax.Array:
    """Divides non-negative `[B, M, ...]` weights (already zero for missing modalities) by their sum over M.

    An example with no weight left (every modality missing) gets all-zero weights.
    """
    total = weights.sum(axis=1, keepdims=True)
    return weights / jnp.where(total > 0, total, 1.0)


def _masked_softmax(logits: jax.Array, present: jax.Array) -> jax.Array:
    """Softmax over axis 1 restricted to the present modalities (`present` broadcasts against `logits`).

    Missing entries get weight exactly 0 (and gradient exactly 0); all-missing rows get all-zero weights.
    """
    keep = jnp.broadcast_to(present > 0, logits.shape)
    logits = logits.astype(jnp.float32)
    shift = jnp.max(jnp.where(keep, logits, -jnp.inf), axis=1, keepdims=True)
    shift = jax.lax.stop_gradient(jnp.where(jnp.isfinite(shift), shift, 0.0))
    exp = jnp.exp(jnp.where(keep, logits - shift, -jnp.inf))  # exp(-inf) = 0 with a zero (not NaN) gradient.
    return _renormalise(exp)


def _proj(modality: _Modality, dim: int, dtype: Dtype | None, use_bias: bool = True) -> nn.Dense:
    """The per-modality projection to the common width, named `proj_{modality}`."""
    return nn.Dense(dim, use_bias=use_bias, dtype=dtype, name=f"proj_{modality.name}")


def _projected_stack(modalities: Sequence[_Modality], dim: int, dtype: Dtype | None) -> jax.Array:
    """`[B, M, dim]`: each modality's pooled features through its own projection."""
    return jnp.stack([_proj(m, dim, dtype)(m.pooled) for m in modalities], axis=1)


def _check_choice(method: str, field: str, value: str, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ValueError(f"fusion {method!r}: unknown {field} {value!r}; valid values: {', '.join(valid)}")


# --------------------------------------------------------------------------------------------- feature level


@FUSIONS.register("concat")
class ConcatFusion(nn.Module):
    """Early (feature-level) fusion: concatenation of the pooled features, missing modalities zeroed.

    C = [z_1; z_2; ...; z_M] (sorted modality order), output width sum_m D_m. The classic baseline of multimodal
    learning (Baltrusaitis, Ahuja, Morency, "Multimodal Machine Learning: A Survey and Taxonomy", IEEE TPAMI 2019).
    Also serves single-modality models (one modality is allowed).
    """

    produces_logits: ClassVar[bool] = False
    min_modalities: ClassVar[int] = 1

    @nn.compact
    def __call__(self, features: Mapping[str, EncoderOutput], *, masks: Masks = None, train: bool) -> jax.Array:
        modalities = _gather(features, masks, "concat", self.min_modalities)
        return jnp.concatenate([m.pooled for m in modalities], axis=-1)


@FUSIONS.register("weighted_sum")
class WeightedSumFusion(nn.Module):
    """Fixed weighted sum of the projected features: C = sum_m alpha_m P_m z_m / sum_{m present} alpha_m.

    A standard feature-level operator (Ramachandram, Taylor, "Deep Multimodal Learning: A Survey on Recent Advances
    and Trends", IEEE Signal Processing Magazine 2017). The alphas are renormalised over the modalities present in
    each example (all missing: zeros).

    Attributes:
      dim: common width each modality is projected to (`proj_{m}`), the output width.
      weights: one non-negative alpha per modality, in sorted modality order; None (default) = equal weights.
      dtype: compute dtype of the projections.
    """

    dim: int = 64
    weights: tuple[float, ...] | None = None
    dtype: Dtype | None = None
    produces_logits: ClassVar[bool] = False
    min_modalities: ClassVar[int] = 2

    @nn.compact
    def __call__(self, features: Mapping[str, EncoderOutput], *, masks: Masks = None, train: bool) -> jax.Array:
        modalities = _gather(features, masks, "weighted_sum", self.min_modalities)
        if self.weights is None:
            alphas = jnp.ones((len(modalities),), jnp.float32)
        else:
            if len(self.weights) != len(modalities) or any(w < 0 for w in self.weights):
                raise ValueError(
                    f"fusion 'weighted_sum': weights must be {len(modalities)} non-negative numbers, one per "
                    f"modality in sorted order {[m.name for m in modalities]}; got {tuple(self.weights)}"
                )
            alphas = jnp.asarray(self.weights, jnp.float32)
        z = _projected_stack(modalities, self.dim, self.dtype)
        w = _renormalise(alphas[None] * _presence(modalities))
        return (w[..., None].astype(z.dtype) * z).sum(axis=1)


@FUSIONS.register("attention")
class AttentionFusion(nn.Module):
    """Learned attention-weighted sum of the projected features (modality attention).

    h_m = P_m z_m; s_m = v^T tanh(W h_m + b) (one scorer shared by the modalities; a single Dense when
    `hidden=0`); a = softmax over the present modalities of s; C = sum_m a_m h_m. After Hori et al., "Attention-Based
    Multimodal Fusion for Video Description", ICCV 2017. The weights are sown as `intermediates/weights` `[B, M]`.

    Attributes:
      dim: common width of the projections `proj_{m}`, the output width.
      hidden: width of the scorer's tanh layer (`score_hidden`); 0 scores with one Dense (`score`).
      dtype: compute dtype of the dense layers.
    """

    dim: int = 64
    hidden: int = 64
    dtype: Dtype | None = None
    produces_logits: ClassVar[bool] = False
    min_modalities: ClassVar[int] = 2

    @nn.compact
    def __call__(self, features: Mapping[str, EncoderOutput], *, masks: Masks = None, train: bool) -> jax.Array:
        modalities = _gather(features, masks, "attention", self.min_modalities)
        h = _projected_stack(modalities, self.dim, self.dtype)
        s = h
        if self.hidden:
            s = jnp.tanh(nn.Dense(self.hidden, dtype=self.dtype, name="score_hidden")(s))
        scores = nn.Dense(1, dtype=self.dtype, name="score")(s)[..., 0]  # [B, M]
        a = _masked_softmax(scores, _presence(modalities))
        self.sow("intermediates", "weights", a)
        return (a[..., None].astype(h.dtype) * h).sum(axis=1)


@FUSIONS.register("max")
class MaxFusion(nn.Module):
    """Element-wise maximum of the projected features: C_d = max_{m present} (P_m z_m)_d.

    A standard feature-level pooling operator (Ramachandram, Taylor, "Deep Multimodal Learning: A Survey on Recent
    Advances and Trends", IEEE Signal Processing Magazine 2017). Missing modalities enter as -inf (the neutral
    element of max); an example with every modality missing gets zeros.

    Attributes:
      dim: common width of the projections `proj_{m}`, the output width.
      dtype: compute dtype of the projections.
    """

    dim: int = 64
    dtype: Dtype | None = None
    produces_logits: ClassVar[bool] = False
    min_modalities: ClassVar[int] = 2

    @nn.compact
    def __call__(self, features: Mapping[str, EncoderOutput], *, masks: Masks = None, train: bool) -> jax.Array:
        modalities = _gather(features, masks, "max", self.min_modalities)
        z = _projected_stack(modalities, self.dim, self.dtype)
        keep = _presence(modalities) > 0
        out = jnp.max(jnp.where(keep[..., None], z, -jnp.inf), axis=1)
        return jnp.where(keep.any(axis=1)[:, None], out, 0)


@FUSIONS.register("product")
class ProductFusion(nn.Module):
    """Element-wise (Hadamard) product of the projected features: C = prod_{m present} P_m z_m.

    The Hadamard fusion of Kim, On, Lim, Kim, Ha, Zhang, "Hadamard Product for Low-rank Bilinear Pooling", ICLR 2017
    (without their tanh non-linearities). Missing modalities enter as 1 (the neutral element of the product); an
    example with every modality missing gets ones.

    Attributes:
      dim: common width of the projections `proj_{m}`, the output width.
      dtype: compute dtype of the projections.
    """

    dim: int = 64
    dtype: Dtype | None = None
    produces_logits: ClassVar[bool] = False
    min_modalities: ClassVar[int] = 2

    @nn.compact
    def __call__(self, features: Mapping[str, EncoderOutput], *, masks: Masks = None, train: bool) -> jax.Array:
        modalities = _gather(features, masks, "product", self.min_modalities)
        factors = [jnp.where(m.keep[:, None], _proj(m, self.dim, self.dtype)(m.pooled), 1) for m in modalities]
        return functools.reduce(jnp.multiply, factors)


@FUSIONS.register("gmu")
class GatedMultimodalUnit(nn.Module):
    """Gated Multimodal Unit (Arevalo, Solorio, Montes-y-Gomez, Gonzalez, "Gated Multimodal Units for Information
    Fusion", ICLR 2017 workshop).

    h_m = tanh(W_m z_m) (`proj_{m}`); gate logits g = W_z [z_1; ...; z_M] (`gate`, one `dim`-vector per modality);
    gates = softmax over the present modalities of g, per feature; h = sum_m gates_m * h_m. This is the paper's
    N-modality generalisation; for two modalities it equals the bimodal form h = s h_1 + (1 - s) h_2 with
    s = sigmoid(W [z_1; z_2]) (a softmax over two logits is the sigmoid of their difference).

    Attributes:
      dim: width of the hidden representations h_m, the output width.
      dtype: compute dtype of the dense layers.
    """

    dim: int = 64
    dtype: Dtype | None = None
    produces_logits: ClassVar[bool] = False
    min_modalities: ClassVar[int] = 2

    @nn.compact
    def __call__(self, features: Mapping[str, EncoderOutput], *, masks: Masks = None, train: bool) -> jax.Array:
        modalities = _gather(features, masks, "gmu", self.min_modalities)
        h = jnp.tanh(_projected_stack(modalities, self.dim, self.dtype))  # [B, M, dim]
        joint = jnp.concatenate([m.pooled for m in modalities], axis=-1)
        logits = nn.Dense(len(modalities) * self.dim, dtype=self.dtype, name="gate")(joint)
        gates = _masked_softmax(logits.reshape(h.shape), _presence(modalities)[..., None])
        self.sow("intermediates", "gates", gates)
        return (gates.astype(h.dtype) * h).sum(axis=1)


@FUSIONS.register("tensor")
class TensorFusion(nn.Module):
    """Tensor Fusion Network (Zadeh, Chen, Poria, Cambria, Morency, "Tensor Fusion Network for Multimodal Sentiment
    Analysis", EMNLP 2017).

    z'_m = [1, P_m z_m] (`proj_{m}` to `dim`); C = flatten(z'_1 (x) z'_2 (x) ... (x) z'_M), width (dim + 1)^M, the
    first sorted modality varying slowest. The head consumes C. A missing modality's vector becomes [1, 0, ..., 0],
    so it contributes only the constant 1 (its unimodal and cross terms vanish). The augmented vectors are sown as
    `intermediates/augmented_{m}`.

    Attributes:
      dim: width each modality is projected to before the outer product (keep small: the output is (dim + 1)^M).
      dtype: compute dtype of the projections.
    """

    dim: int = 16
    dtype: Dtype | None = None
    produces_logits: ClassVar[bool] = False
    min_modalities: ClassVar[int] = 2

    @nn.compact
    def __call__(self, features: Mapping[str, EncoderOutput], *, masks: Masks = None, train: bool) -> jax.Array:
        modalities = _gather(features, masks, "tensor", self.min_modalities)
        out = None
        for m in modalities:
            z = jnp.where(m.keep[:, None], _proj(m, self.dim, self.dtype)(m.pooled), 0)
            z = jnp.concatenate([jnp.ones_like(z[:, :1]), z], axis=-1)
            self.sow("intermediates", f"augmented_{m.name}", z)
            out = z if out is None else (out[:, :, None] * z[:, None, :]).reshape(z.shape[0], -1)
        return out


@FUSIONS.register("low_rank_tensor")
class LowRankTensorFusion(nn.Module):
    """Low-rank Multimodal Fusion (Liu, Shen, Lakshminarasimhan, Liang, Zadeh, Morency, "Efficient Low-rank
    Multimodal Fusion with Modality-Specific Factors", ACL 2018).

    h = sum_{r=1..rank} w_r prod_m ([1, z_m] W_m^(r)) + b: the tensor-fusion weight restricted to rank `rank`,
    computed without forming the outer product. Parameters: `factor_{m}` [rank, 1 + D_m, dim] (W_m^(r)),
    `rank_weights` [rank] (w_r), `bias` [dim] (b). A missing modality's factor term is replaced by 1.

    Attributes:
      dim: output width.
      rank: number of rank-one terms.
      dtype: compute dtype of the factor products.
    """

    dim: int = 64
    rank: int = 4
    dtype: Dtype | None = None
    produces_logits: ClassVar[bool] = False
    min_modalities: ClassVar[int] = 2

    @nn.compact
    def __call__(self, features: Mapping[str, EncoderOutput], *, masks: Masks = None, train: bool) -> jax.Array:
        modalities = _gather(features, masks, "low_rank_tensor", self.min_modalities)
        factor_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=1, out_axis=2,
                                                       batch_axis=(0,))
        product = None
        for m in modalities:
            x = jnp.concatenate([jnp.ones_like(m.pooled[:, :1]), m.pooled], axis=-1)
            factor = self.param(f"factor_{m.name}", factor_init, (self.rank, x.shape[-1], self.dim), jnp.float32)
            x, factor = nn.dtypes.promote_dtype(x, factor, dtype=self.dtype)
            term = jnp.where(m.keep[:, None, None], jnp.einsum("bi,rio->bro", x, factor), 1)
            product = term if product is None else product * term
        rank_weights = self.param("rank_weights", nn.initializers.normal(self.rank**-0.5), (self.rank,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.dim,), jnp.float32)
        product, rank_weights, bias = nn.dtypes.promote_dtype(product, rank_weights, bias, dtype=self.dtype)
        return jnp.einsum("r,bro->bo", rank_weights, product) + bias


@FUSIONS.register("multiplicative")
class MultiplicativeFusion(nn.Module):
    """Multiplicative Interactions (Jayakumar, Czarnecki, Menick, Schwarz, Rae, Osindero, Teh, Harley, Pascanu,
    "Multiplicative Interactions and Where to Find Them", ICLR 2020).

    The paper's general form f(x, c) = c^T W' x + c^T U + V x + b, i.e. a weight matrix W(c) = W' c + V and bias
    b(c) = U c + b generated by a context c and applied to x. N-modality rule: each modality m in turn is the target
    x = z_m and the context c_m is the concatenation of all the other modalities' features (sorted order, zeros for
    missing ones, so a missing context modality leaves the unconditioned weights V, w and b); the fused output is
    the mean over present target modalities of f_m:

    * `form="vector"` (diagonal W(c), gating): f_m = (W'_m c_m + w_m) * (V_m z_m) + U_m c_m + b_m, with `scale_{m}`
      = W'_m c + w_m (w_m initialised to 1), `proj_{m}` = V_m (no bias), `shift_{m}` = U_m c + b_m.
    * `form="matrix"` (full hypernetwork): f_m = (W'_m c_m) z_m + V_m z_m + U_m c_m + b_m, with the 3-tensor
      `weight_tensor_{m}` [D_c, D_m, dim] = W'_m.

    Attributes:
      form: "vector" or "matrix".
      dim: output width.
      dtype: compute dtype.
    """

    form: str = "vector"
    dim: int = 64
    dtype: Dtype | None = None
    produces_logits: ClassVar[bool] = False
    min_modalities: ClassVar[int] = 2
    forms: ClassVar[tuple[str, ...]] = ("vector", "matrix")

    @nn.compact
    def __call__(self, features: Mapping[str, EncoderOutput], *, masks: Masks = None, train: bool) -> jax.Array:
        _check_choice("multiplicative", "form", self.form, self.forms)
        modalities = _gather(features, masks, "multiplicative", self.min_modalities)
        outputs = []
        for m in modalities:
            context = jnp.concatenate([o.pooled for o in modalities if o.name != m.name], axis=-1)
            base = _proj(m, self.dim, self.dtype, use_bias=False)(m.pooled)
            shift = nn.Dense(self.dim, dtype=self.dtype, name=f"shift_{m.name}")(context)
            if self.form == "vector":
                scale = nn.Dense(self.dim, dtype=self.dtype, bias_init=nn.initializers.ones, name=f"scale_{m.name}")
                out = scale(context) * base + shift
            else:
                tensor_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=(0, 1),
                                                               out_axis=2)
                shape = (context.shape[-1], m.pooled.shape[-1], self.dim)
                tensor = self.param(f"weight_tensor_{m.name}", tensor_init, shape, jnp.float32)
                c, x, tensor = nn.dtypes.promote_dtype(context, m.pooled, tensor, dtype=self.dtype)
                out = jnp.einsum("bc,bd,cdo->bo", c, x, tensor) + base + shift
            outputs.append(out)
        w = _renormalise(_presence(modalities))  # Mean over present targets.
        return (w[..., None].astype(outputs[0].dtype) * jnp.stack(outputs, axis=1)).sum(axis=1)


# --------------------------------------------------------------------------------------------- token level


@FUSIONS.register("nl_gate")
class NonLocalGateFusion(nn.Module):
    """Non-local gate (NL-gate) fusion (Wang, Tran, Feiszli, "What Makes Training Multi-Modal Classification
    Networks Hard?", CVPR 2020; as implemented in MultiBench, Liang et al., NeurIPS 2021 Datasets and Benchmarks).

    The query modality's projected tokens Q = P_q X_q attend (a non-local block: multi-head dot-product attention
    with output projection) over the concatenated projected tokens of all other modalities K = V = [P_k X_k]_k, and
    the attention result gates the query by a residual: Y = Q + Attn(Q, K, V); the output is the masked mean of Y
    over the query's real tokens. Missing / padded key tokens are masked out of the keys; an example with no key
    token left gets Y = Q. An example whose query modality is missing falls back to the masked mean of the other
    modalities' projected tokens (zeros when everything is missing).

    Attributes:
      query: the query modality (default None = the first in sorted order).
      dim: common width of the projections `proj_{m}` and the attention, the output width.
      num_heads: attention heads (1 = the original non-local block).
      dtype: compute dtype.
    """

    query: str | None = None
    dim: int = 64
    num_heads: int = 1
    dtype: Dtype | None = None
    produces_logits: ClassVar[bool] = False
    min_modalities: ClassVar[int] = 2

    @nn.compact
    def __call__(self, features: Mapping[str, EncoderOutput], *, masks: Masks = None, train: bool) -> jax.Array:
        modalities = _gather(features, masks, "nl_gate", self.min_modalities)
        names = [m.name for m in modalities]
        query_name = names[0] if self.query is None else self.query
        if query_name not in names:
            raise ValueError(f"fusion 'nl_gate': query modality {query_name!r} is not one of {names}")
        query = modalities[names.index(query_name)]
        others = [m for m in modalities if m.name != query_name]
        q = _proj(query, self.dim, self.dtype)(query.tokens)
        kv = jnp.concatenate([_proj(m, self.dim, self.dtype)(m.tokens) for m in others], axis=1)
        kv_mask = jnp.concatenate([m.token_mask for m in others], axis=1)
        attended = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads, dtype=self.dtype, force_fp32_for_softmax=True, name="attention"
        )(q, kv, mask=attention_mask(None, kv_mask), deterministic=True)
        any_key = kv_mask.max(axis=1) > 0
        gated = q + jnp.where(any_key[:, None, None], attended, 0)
        return jnp.where(query.keep[:, None], masked_mean(gated, query.token_mask), masked_mean(kv, kv_mask))


@FUSIONS.register("cross_attention")
class CrossAttentionFusion(nn.Module):
    """Crossmodal-attention fusion in the style of MulT (Tsai, Bai, Liang, Kolter, Morency, Salakhutdinov,
    "Multimodal Transformer for Unaligned Multimodal Language Sequences", ACL 2019).

    Tokens are projected to `dim` (`proj_{m}`). For every ordered pair source s -> target t, a stack of
    `num_layers` pre-LN cross-attention blocks (`cross_{s}_to_{t}_{i}`) updates t's tokens with queries from t and
    keys/values from LayerNorm(s's tokens) (`ln_{s}_to_{t}`): Z_{s->t} = CM^L(X_t, X_s). For each target the
    streams Z_{s->t} (s in sorted order) are concatenated along features (width (M-1) dim) and passed through a
    self-attention Transformer (`self_{t}`, `self_layers` layers); the masked mean over t's real tokens is the
    target's summary; the output concatenates the summaries over targets in sorted order (width M (M-1) dim).
    A missing source leaves its stream at X_t (the blocks are skipped) and its tokens are masked out of the keys;
    a missing target's summary is zero. Positional information is taken to be in the encoder tokens already.

    Attributes:
      dim: common token width.
      num_layers: cross-attention blocks per (source, target) pair.
      self_layers: self-attention layers per target after the cross-modal streams (0 = none).
      num_heads: attention heads (must divide `dim`).
      mlp_dim: hidden width of the blocks' MLPs (None = 4 x the block width).
      dropout, attention_dropout: dropout rates (active when `train=True`).
      remat: "none" / "full" / "dots" rematerialisation of each block.
      dtype: compute dtype.
    """

    dim: int = 64
    num_layers: int = 1
    self_layers: int = 1
    num_heads: int = 4
    mlp_dim: int | None = None
    dropout: float = 0.0
    attention_dropout: float = 0.0
    remat: str = "none"
    dtype: Dtype | None = None
    produces_logits: ClassVar[bool] = False
    min_modalities: ClassVar[int] = 2

    @nn.compact
    def __call__(self, features: Mapping[str, EncoderOutput], *, masks: Masks = None, train: bool) -> jax.Array:
        modalities = _gather(features, masks, "cross_attention", self.min_modalities)
        tokens = {m.name: _proj(m, self.dim, self.dtype)(m.tokens) for m in modalities}
        block = maybe_remat(TransformerBlock, self.remat, static_argnums=(4,))
        summaries = []
        for t in modalities:
            streams = []
            for s in modalities:
                if s.name == t.name:
                    continue
                norm = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name=f"ln_{s.name}_to_{t.name}")
                context = norm(tokens[s.name])
                mask = attention_mask(None, s.token_mask)
                x = tokens[t.name]
                for i in range(self.num_layers):
                    x = block(
                        num_heads=self.num_heads,
                        mlp_dim=self.mlp_dim or 4 * self.dim,
                        dropout=self.dropout,
                        attention_dropout=self.attention_dropout,
                        dtype=self.dtype,
                        name=f"cross_{s.name}_to_{t.name}_{i}",
                    )(x, mask, context, not train)
                any_key = s.token_mask.max(axis=1) > 0
                streams.append(jnp.where(any_key[:, None, None], x, tokens[t.name]))
            h = jnp.concatenate(streams, axis=-1)
            if self.self_layers:
                h = Transformer(
                    num_layers=self.self_layers,
                    num_heads=self.num_heads,
                    mlp_dim=self.mlp_dim or 4 * h.shape[-1],
                    dropout=self.dropout,
                    attention_dropout=self.attention_dropout,
                    remat=self.remat,
                    dtype=self.dtype,
                    name=f"self_{t.name}",
                )(h, t.token_mask, train=train)
            summaries.append(jnp.where(t.keep[:, None], masked_mean(h, t.token_mask), 0))
        return jnp.concatenate(summaries, axis=-1)


@FUSIONS.register("bottleneck")
class BottleneckFusion(nn.Module):
    """Multimodal Bottleneck Transformer (Nagrani, Yang, Arnab, Jansen, Schmid, Sun, "Attention Bottlenecks for
    Multimodal Fusion", NeurIPS 2021).

    Each modality's tokens are projected to `dim` (`proj_{m}`) and prefixed with a learned CLS token (`cls_{m}`);
    each modality has its own pre-LN blocks (`layer_{i}_{m}`). Layers i < `fusion_layer` are self-attention over
    [CLS_m, X_m]. From layer `fusion_layer` on, B shared bottleneck tokens (initialised from the learned
    `bottleneck` [num_bottlenecks, dim]) join every modality's sequence:
    [X_m^{i+1}, B_m^{i+1}] = Block_m^i([X_m^i, B^i]) and B^{i+1} = mean over present modalities of B_m^{i+1}
    (unchanged when none is present), so cross-modal information flows only through the bottlenecks. The output is
    the mean over present modalities of the final-LayerNormed (`ln_final_{m}`) CLS tokens (MBT averages per-modality
    logits; here the head consumes the averaged CLS representation). Padded / missing tokens are masked out of the
    keys. `fusion_layer = num_layers` means no bottleneck (late fusion of the CLS tokens).

    Attributes:
      dim: token width.
      num_layers: blocks per modality.
      fusion_layer: first layer that uses the bottleneck tokens (0 <= fusion_layer <= num_layers).
      num_bottlenecks: number of bottleneck tokens.
      num_heads: attention heads (must divide `dim`).
      mlp_dim: hidden width of the MLPs (None = 4 dim).
      dropout, attention_dropout: dropout rates (active when `train=True`).
      remat: "none" / "full" / "dots" rematerialisation of each block.
      dtype: compute dtype.
    """

    dim: int = 64
    num_layers: int = 2
    fusion_layer: int = 1
    num_bottlenecks: int = 4
    num_heads: int = 4
    mlp_dim: int | None = None
    dropout: float = 0.0
    attention_dropout: float = 0.0
    remat: str = "none"
    dtype: Dtype | None = None
    produces_logits: ClassVar[bool] = False
    min_modalities: ClassVar[int] = 2

    @nn.compact
    def __call__(self, features: Mapping[str, EncoderOutput], *, masks: Masks = None, train: bool) -> jax.Array:
        if not 0 <= self.fusion_layer <= self.num_layers:
            raise ValueError(
                f"fusion 'bottleneck': fusion_layer must be in [0, num_layers={self.num_layers}], "
                f"got {self.fusion_layer}"
            )
        modalities = _gather(features, masks, "bottleneck", self.min_modalities)
        batch = modalities[0].pooled.shape[0]
        init = nn.initializers.normal(0.02)
        x, masks_alone, masks_fused = {}, {}, {}
        for m in modalities:
            cls = self.param(f"cls_{m.name}", init, (1, 1, self.dim), jnp.float32)
            tokens = _proj(m, self.dim, self.dtype)(m.tokens)
            x[m.name] = jnp.concatenate([jnp.broadcast_to(cls.astype(tokens.dtype), (batch, 1, self.dim)), tokens], 1)
            key = jnp.concatenate([jnp.ones((batch, 1), jnp.float32), m.token_mask], axis=1)
            masks_alone[m.name] = attention_mask(None, key)
            masks_fused[m.name] = attention_mask(
                None, jnp.concatenate([key, jnp.ones((batch, self.num_bottlenecks), jnp.float32)], axis=1)
            )
        bottleneck = None
        if self.fusion_layer < self.num_layers:  # Otherwise no layer would use (or train) the bottleneck tokens.
            bottleneck = self.param("bottleneck", init, (self.num_bottlenecks, self.dim), jnp.float32)
            bottleneck = jnp.broadcast_to(bottleneck, (batch,) + bottleneck.shape)
        weights = _renormalise(_presence(modalities))  # [B, M]: mean over present modalities.
        any_present = weights.sum(axis=1) > 0
        block = maybe_remat(TransformerBlock, self.remat, static_argnums=(4,))
        for i in range(self.num_layers):
            new_bottlenecks = []
            for m in modalities:
                layer = block(
                    num_heads=self.num_heads,
                    mlp_dim=self.mlp_dim or 4 * self.dim,
                    dropout=self.dropout,
                    attention_dropout=self.attention_dropout,
                    dtype=self.dtype,
                    name=f"layer_{i}_{m.name}",
                )
                if i < self.fusion_layer:
                    x[m.name] = layer(x[m.name], masks_alone[m.name], None, not train)
                else:
                    length = x[m.name].shape[1]
                    y = layer(jnp.concatenate([x[m.name], bottleneck.astype(x[m.name].dtype)], 1),
                              masks_fused[m.name], None, not train)
                    x[m.name], b = y[:, :length], y[:, length:]
                    new_bottlenecks.append(b)
            if new_bottlenecks:
                mean = sum(weights[:, j, None, None].astype(b.dtype) * b for j, b in enumerate(new_bottlenecks))
                bottleneck = jnp.where(any_present[:, None, None], mean, bottleneck)
        cls = jnp.stack(
            [nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name=f"ln_final_{m.name}")(x[m.name][:, 0])
             for m in modalities],
            axis=1,
        )
        return (weights[..., None].astype(cls.dtype) * cls).sum(axis=1)


@FUSIONS.register("joint_transformer")
class JointTransformerFusion(nn.Module):
    """Single-stream joint transformer over all modalities' tokens (as in ViLT: Kim, Son, Kim, "ViLT:
    Vision-and-Language Transformer Without Convolution or Region Supervision", ICML 2021).

    Sequence [CLS; P_1 X_1 + e_1; ...; P_M X_M + e_M] (sorted order) with a learned CLS token (`cls`), per-modality
    projections `proj_{m}` and learned modality-type embeddings e_m (`type_{m}`), through a pre-LN `Transformer`
    (`transformer`); the output is the final CLS token. Padded tokens and all tokens of a missing modality are
    masked out of attention (the CLS is always a valid key, so all-missing examples stay finite). Positional
    information is taken to be in the encoder tokens already.

    Attributes:
      dim: token width, the output width.
      num_layers, num_heads: transformer depth and heads (heads must divide `dim`).
      mlp_dim: hidden width of the MLPs (None = 4 dim).
      dropout, attention_dropout: dropout rates (active when `train=True`).
      remat: "none" / "full" / "dots" rematerialisation of each block.
      dtype: compute dtype.
    """

    dim: int = 64
    num_layers: int = 2
    num_heads: int = 4
    mlp_dim: int | None = None
    dropout: float = 0.0
    attention_dropout: float = 0.0
    remat: str = "none"
    dtype: Dtype | None = None
    produces_logits: ClassVar[bool] = False
    min_modalities: ClassVar[int] = 2

    @nn.compact
    def __call__(self, features: Mapping[str, EncoderOutput], *, masks: Masks = None, train: bool) -> jax.Array:
        modalities = _gather(features, masks, "joint_transformer", self.min_modalities)
        batch = modalities[0].pooled.shape[0]
        init = nn.initializers.normal(0.02)
        sequence, token_mask = [], [jnp.ones((batch, 1), jnp.float32)]
        for m in modalities:
            type_embedding = self.param(f"type_{m.name}", init, (self.dim,), jnp.float32)
            tokens = _proj(m, self.dim, self.dtype)(m.tokens)
            sequence.append(tokens + type_embedding.astype(tokens.dtype))
            token_mask.append(m.token_mask)
        cls = self.param("cls", init, (1, 1, self.dim), jnp.float32).astype(sequence[0].dtype)
        sequence.insert(0, jnp.broadcast_to(cls, (batch, 1, self.dim)))
        x = Transformer(
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim or 4 * self.dim,
            dropout=self.dropout,
            attention_dropout=self.attention_dropout,
            remat=self.remat,
            dtype=self.dtype,
            name="transformer",
        )(jnp.concatenate(sequence, axis=1), jnp.concatenate(token_mask, axis=1), train=train)
        return x[:, 0]


# --------------------------------------------------------------------------------------------- serial


@FUSIONS.register("serial")
class SerialFusion(nn.Module):
    """Sequential (hierarchical) fusion: the modalities are fused one after the other, in a configured order.

    With u_k = P_k z_{o_k} (`proj_{m}`, to `dim`) for the k-th modality o_k of `order`:

        h_1 = tanh(u_1),    h_k = tanh(W_k [h_{k-1}; u_k] + b_k)  (k = 2..M, `stage_{k}`),    C = h_M.

    Each stage fuses one more modality into the representation of the ones before it, as the stage-wise fusion of
    Majumder, Hazarika, Gelbukh, Cambria, Poria, "Multimodal Sentiment Analysis using Hierarchical Fusion with
    Context Modeling", Knowledge-Based Systems 2018, which fuses two modalities first and the third into that
    result (here one modality per stage, any number of them, in `order`). A missing modality's stage is skipped
    (h_k = h_{k-1}; h_1 = 0 when the first one is missing), so it contributes nothing, with exactly zero gradient.

    Attributes:
      order: the modalities in fusion order; empty (default) = sorted order.
      dim: width of u_k and h_k, the output width.
      dtype: compute dtype of the dense layers.
    """

    order: tuple[str, ...] = ()
    dim: int = 64
    dtype: Dtype | None = None
    produces_logits: ClassVar[bool] = False
    min_modalities: ClassVar[int] = 2

    @nn.compact
    def __call__(self, features: Mapping[str, EncoderOutput], *, masks: Masks = None, train: bool) -> jax.Array:
        modalities = {m.name: m for m in _gather(features, masks, "serial", self.min_modalities)}
        order = tuple(self.order) or tuple(sorted(modalities))
        if sorted(order) != sorted(modalities):
            raise ValueError(f"fusion 'serial': order={tuple(self.order)!r} must name each modality once; the model's "
                             f"modalities are {sorted(modalities)}")
        h = None
        for k, name in enumerate(order, start=1):
            m = modalities[name]
            u = _proj(m, self.dim, self.dtype)(m.pooled)
            if h is None:
                new = jnp.tanh(u)
                h = jnp.zeros_like(new)
            else:
                new = jnp.tanh(nn.Dense(self.dim, dtype=self.dtype, name=f"stage_{k}")(jnp.concatenate([h, u], -1)))
            h = jnp.where(m.keep[:, None], new, h)
        return h


@FUSIONS.register("film")
class FilmFusion(nn.Module):
    """FiLM conditioning (Perez, Strub, de Vries, Dumoulin, Courville, "FiLM: Visual Reasoning with a General
    Conditioning Layer", AAAI 2018): the other modalities' features scale and shift the `target` encoder's
    intermediate feature maps, channel by channel.

    With z = [z_m for the conditioning modalities m != target, sorted] (missing ones zeroed), the generator
    (`generator`, one Dense layer) gives, for every conditioned layer l of the target encoder (its
    `film_channels()`), (dgamma_l, beta_l) = split(W z + b), and the encoder computes
    F'_l = gamma_l * F_l + beta_l with gamma_l = 1 + dgamma_l, per example and channel, before its non-linearity
    (`mmjax.nn.encoders.conditioning`). The generator starts at zero (W = 0, b = 0), i.e. at the identity
    FiLM(F) = F, and predicts the change from it. Examples whose conditioning modalities are all missing get the
    identity (gamma = 1, beta = 0): the target is encoded unconditioned.

    The fused output is the FiLM-ed target encoder's pooled features (`output="film"`, as the FiLM network's own
    classifier reads only the modulated features), or those concatenated with the conditioning modalities'
    pooled features (`output="concat"`, sorted order after the target), which keeps them when the target is
    missing. A missing target's features are zero.

    Attributes:
      target: the modality whose encoder is conditioned; its encoder must have FiLM layers (`small_cnn`,
        `spectrogram_cnn`, `vgg`, `rnn`).
      output: "film" or "concat".
      dtype: compute dtype of the generator.
    """

    target: str = "image"
    output: str = "film"
    dtype: Dtype | None = None
    produces_logits: ClassVar[bool] = False
    min_modalities: ClassVar[int] = 2
    conditions_encoders: ClassVar[bool] = True
    outputs: ClassVar[tuple[str, ...]] = ("film", "concat")

    @classmethod
    def check_encoders(cls, options: Mapping[str, object], encoders: Mapping[str, nn.Module]) -> None:
        """The target is one of the model's modalities and its encoder has FiLM layers (before any tracing)."""
        target = options.get("target", cls.target)
        if target not in encoders:
            raise ValueError(f"config model.fusion.target={target!r} is not a modality of model.encoders "
                             f"{sorted(encoders)}")
        if not hasattr(encoders[target], "film_channels"):
            raise ValueError(f"config model.fusion.name='film' conditions model.encoders.{target} "
                             f"({type(encoders[target]).__name__}), which has no FiLM layers; encoders with FiLM "
                             "layers: small_cnn, spectrogram_cnn, vgg, rnn")
        if len(encoders) < 2:
            raise ValueError("config model.fusion.name='film' needs a conditioning modality besides the target")
        _check_choice("film", "output", options.get("output", cls.output), cls.outputs)

    def conditioning(self, features: Mapping[str, EncoderOutput], masks: Masks) -> list[_Modality]:
        return _gather({m: f for m, f in features.items() if m != self.target}, masks, "film", 1)

    @nn.compact
    def generate(self, features: Mapping[str, EncoderOutput], *, masks: Masks, channels: Sequence[int]) -> Film:
        """The `(gamma, beta)` pairs of the target encoder's conditioned layers from the conditioning modalities'
        `features` (every modality but the target)."""
        conditioning = self.conditioning(features, masks)
        z = jnp.concatenate([m.pooled for m in conditioning], axis=-1)
        any_present = _presence(conditioning).max(axis=1) > 0
        out = nn.Dense(2 * sum(channels), dtype=self.dtype, kernel_init=nn.initializers.zeros,
                       name="generator")(z).astype(jnp.float32)
        film, start = [], 0
        for c in channels:
            delta_gamma, beta = out[:, start : start + c], out[:, start + c : start + 2 * c]
            start += 2 * c
            film.append((jnp.where(any_present[:, None], 1.0 + delta_gamma, 1.0),
                         jnp.where(any_present[:, None], beta, 0.0)))
        return tuple(film)

    def __call__(self, features: Mapping[str, EncoderOutput], *, masks: Masks = None, train: bool) -> jax.Array:
        _check_choice("film", "output", self.output, self.outputs)
        if self.target not in features:
            raise ValueError(f"fusion 'film': target {self.target!r} is not among the features {sorted(features)}")
        target = _gather({self.target: features[self.target]}, masks, "film", 1)[0]
        if self.output == "film":
            return target.pooled
        return jnp.concatenate([target.pooled] + [m.pooled for m in self.conditioning(features, masks)], axis=-1)


# --------------------------------------------------------------------------------------------- decision level


@FUSIONS.register("late")
class LateFusion(nn.Module):
    """Decision-level (late) fusion: one head per modality (`head_{m}`), logits combined over present modalities.

    See e.g. Baltrusaitis, Ahuja, Morency, "Multimodal Machine Learning: A Survey and Taxonomy", IEEE TPAMI 2019.
    With l_m the logits of modality m and P the present modalities of an example:

    * `combine="mean"` (default): y = (1/|P|) sum_{m in P} l_m.
    * `combine="learned"`: y = sum_{m in P} a_m l_m with a = softmax over P of learned scalars `combine_{m}`
      (initialised to 0, i.e. the mean); the weights are sown as `intermediates/weights` `[B, M]`.
    * `combine="product"`: product of experts (Hinton, "Training Products of Experts by Minimizing Contrastive
      Divergence", Neural Computation 2002): y = sum_{m in P} l_m. Since softmax(sum_m l_m) is proportional to
      prod_m exp(l_m), which is proportional to prod_m softmax(l_m), the softmax of y is the normalised product of
      the per-modality class distributions.

    Every combine gives zeros for an example with every modality missing. One modality is allowed (a unimodal head).

    Attributes:
      head: builds a fresh head module (a `functools.partial` of a head class); each modality gets its own.
      combine: "mean", "learned" or "product".
    """

    head: Callable[..., nn.Module]
    combine: str = "mean"
    produces_logits: ClassVar[bool] = True
    min_modalities: ClassVar[int] = 1
    combines: ClassVar[tuple[str, ...]] = ("mean", "learned", "product")

    @nn.compact
    def __call__(self, features: Mapping[str, EncoderOutput], *, masks: Masks = None, train: bool) -> jax.Array:
        _check_choice("late", "combine", self.combine, self.combines)
        modalities = _gather(features, masks, "late", self.min_modalities)
        logits = jnp.stack([self.head(name=f"head_{m.name}")(m.pooled, train=train) for m in modalities], axis=1)
        present = _presence(modalities)
        if self.combine == "mean":
            weights = _renormalise(present)
        elif self.combine == "product":
            weights = present
        else:
            raw = jnp.stack([self.param(f"combine_{m.name}", nn.initializers.zeros, (), jnp.float32)
                             for m in modalities])
            weights = _masked_softmax(jnp.broadcast_to(raw, present.shape), present)
            self.sow("intermediates", "weights", weights)
        return (weights[..., None].astype(logits.dtype) * logits).sum(axis=1)
