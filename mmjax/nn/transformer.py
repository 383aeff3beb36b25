"""Transformer building blocks shared by the ViT, text, AST encoders and the attention-based fusions.

One block class serves self-attention (`context=None`) and cross-attention (queries from `x`, keys/values from
`context`), pre-LN (ViT, CLIP) or post-LN (BERT). Token masks are `[B, T]` arrays of 1 (real token) / 0 (padding).
Parameter names (`attention/{query,key,value,out}`, `ln_attention`, `mlp/{fc1,fc2}`, `ln_mlp`) are what
`mmjax.nn.pretrained` maps HuggingFace checkpoints onto.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from mmjax.nn.common import Dtype

REMAT_POLICIES = ("none", "full", "dots")
LAYER_NORM_EPS = 1e-6  # The pre-LN (ViT/CLIP) default; BERT checkpoints use 1e-12 (set per model).


def remat_policy(name: str):
    """`jax.checkpoint` policy for a config name: full recomputes everything, dots saves matmul outputs."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {name!r}; valid: {', '.join(REMAT_POLICIES)}")
    return {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}.get(name)


def maybe_remat(module_cls: type[nn.Module], policy: str, static_argnums: tuple[int, ...]) -> type[nn.Module]:
    """`nn.remat(module_cls)` with the named policy, or the class unchanged for "none".

    `static_argnums` counts `self` as 0 (Flax's convention for lifted transforms).
    """
    if policy == "none":
        remat_policy(policy)  # Validates the name.
        return module_cls
    return nn.remat(module_cls, policy=remat_policy(policy), static_argnums=static_argnums)


def attention_mask(
    query_mask: jax.Array | None, key_mask: jax.Array | None, causal_length: int | None = None
) -> jax.Array | None:
    """`[B, 1, Tq, Tk]` boolean mask from per-token masks (and causality when `causal_length` is given)."""
    mask = None
    if query_mask is not None or key_mask is not None:
        if query_mask is None:
            query_mask = jnp.ones(key_mask.shape[:1] + (1,), bool)
        if key_mask is None:
            key_mask = jnp.ones(query_mask.shape[:1] + (1,), bool)
        mask = nn.make_attention_mask(query_mask.astype(bool), key_mask.astype(bool))
    if causal_length is not None:
        causal = nn.make_causal_mask(jnp.ones((1, causal_length), bool))
        mask = causal if mask is None else nn.combine_masks(mask, causal)
    return mask


ATTENTION_IMPLS = ("auto", "packed", "flax", "fused")


def fused_attention(query, key, value, bias=None, mask=None, *, dropout_rate=0.0, deterministic=True, dtype=None,
                    **unused):
    """Flax `attention_fn` computed by `jax.nn.dot_product_attention` (cuDNN flash attention on GPUs; XLA
    elsewhere), which never materialises the `[B, H, T, T]` probabilities. No attention dropout."""
    del unused
    if dropout_rate > 0 and not deterministic:
        raise ValueError("fused attention has no attention dropout; use attention_impl='flax'")
    if dtype is not None:
        query, key, value = (x.astype(dtype) for x in (query, key, value))
    mask = None if mask is None else mask.astype(bool)  # Flax's masks are float 0/1.
    return jax.nn.dot_product_attention(query, key, value, bias=bias, mask=mask)


def resolve_attention(impl: str, dtype, attention_dropout: float) -> str:
    """The attention implementation to run: "auto" is "fused" on GPU for 16-bit compute without attention dropout
    (where cuDNN's kernel applies), else "packed"; the others are taken as named (see `MultiHeadAttention`)."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention_impl {impl!r}; valid: {', '.join(ATTENTION_IMPLS)}")
    if impl != "auto":
        return impl
    half = dtype is not None and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "fused" if half and attention_dropout == 0 and jax.default_backend() == "gpu" else "packed"


def _projection_init(in_axes: int, out_axes: int):
    """Flax `DenseGeneral`'s kernel initialisation: LeCun normal on the kernel flattened to 2-D, reshaped back."""

    def init(rng, shape, dtype=jnp.float32):
        fan_in, fan_out = math.prod(shape[:in_axes]), math.prod(shape[in_axes:in_axes + out_axes])
        return nn.initializers.lecun_normal()(rng, (fan_in, fan_out), dtype).reshape(shape)

    return init


class _Projection(nn.Module):
    """The parameters of one Flax `DenseGeneral` projection of `MultiHeadDotProductAttention` (same names, shapes
    and initialisation), returned rather than applied so that several can be applied as one matrix product."""

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array]:
        init = _projection_init(len(self.in_shape), len(self.out_shape))
        kernel = self.param("kernel", init, (*self.in_shape, *self.out_shape))
        bias = self.param("bias", nn.initializers.zeros_init(), self.out_shape)
        return kernel, bias


def _attention_forward(q, k, v, mask):
    """softmax(q k^T / sqrt(Dh), masked) v for heads-first `[B, H, T, Dh]` operands; also the float32 probabilities."""
    scores = jnp.einsum("bhqd,bhkd->bhqk", q / jnp.sqrt(q.shape[-1]).astype(q.dtype), k)
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
    return jnp.einsum("bhqk,bhkd->bhqd", probs.astype(v.dtype), v), probs


@jax.custom_vjp
def heads_first_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Scaled dot-product attention of heads-first `[B, H, T, Dh]` queries, keys and values (mask `[B, 1|H, Tq,
    Tk]`, True = attend), softmax in float32. Its gradient is written out (the standard attention backward:
    dV = P^T dO, dS = P * (dO V^T - rowsum(P * dO V^T)), dQ = dS K / sqrt(Dh), dK = dS^T Q / sqrt(Dh)) so that every
    product stays heads-first: XLA's own derivative of the forward was 13% slower on CPU (ViT-S/16 shapes)."""
    return _attention_forward(q, k, v, mask)[0]


def _attention_fwd(q, k, v, mask):
    out, probs = _attention_forward(q, k, v, mask)
    return out, (q, k, v, mask, probs)


def _attention_bwd(residuals, d_out):
    q, k, v, mask, probs = residuals
    scale = 1.0 / jnp.sqrt(q.shape[-1])
    d_v = jnp.einsum("bhqk,bhqd->bhkd", probs.astype(v.dtype), d_out)
    d_probs = jnp.einsum("bhqd,bhkd->bhqk", d_out, v).astype(jnp.float32)
    d_scores = probs * (d_probs - jnp.sum(d_probs * probs, axis=-1, keepdims=True))
    if mask is not None:  # Masked scores are constants (a row with no key to attend to is uniform): no gradient.
        d_scores = jnp.where(mask, d_scores, 0.0)
    d_scores = d_scores.astype(q.dtype)
    d_q = jnp.einsum("bhqk,bhkd->bhqd", d_scores, k) * scale.astype(q.dtype)
    d_k = jnp.einsum("bhqk,bhqd->bhkd", d_scores, q) * scale.astype(q.dtype)
    return d_q, d_k, d_v, None


heads_first_attention.defvjp(_attention_fwd, _attention_bwd)


def _attention_with_dropout(q, k, v, mask, keep, rate):
    """`heads_first_attention` with dropout on the probabilities (`keep`: Bernoulli(1 - rate) draws), by autodiff."""
    scores = jnp.einsum("bhqd,bhkd->bhqk", q / jnp.sqrt(q.shape[-1]).astype(q.dtype), k)
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
    probs = jnp.where(keep, probs / (1.0 - rate), 0.0).astype(v.dtype)
    return jnp.einsum("bhqk,bhkd->bhqd", probs, v)


class MultiHeadAttention(nn.Module):
    """Multi-head attention with Flax `MultiHeadDotProductAttention`'s parameters (`query`, `key`, `value`, `out`:
    names, shapes and initial values), computed the way XLA's CPU backend runs fastest ("packed"):

    - the query, key and value projections of self-attention are one `[D, 3D]` matrix product (key and value one
      `[D, 2D]` product for cross-attention), not three narrow ones;
    - heads come first (`[B, H, T, Dh]`) for the two batched attention products, whose operands are then
      contiguous matrices, and the context is moved back to `[B, T, H * Dh]` once, before the output projection;
    - softmax(q k^T / sqrt(Dh)) in float32 whatever the compute dtype, masked entries set to the dtype's minimum
      (as Flax does), attention dropout on the probabilities.

    It equals Flax's module to float rounding (tests/nn/test_attention.py, float32 and bfloat16, with masks,
    values and gradients); parameters and checkpoints are interchangeable between the two.

    `decode=True` (self-attention only; autoregressive decoding, `mmjax.nn.decoding`) keeps a key/value cache in
    the "cache" collection: the first call (with the full-length input) only creates it, zero-filled; each later
    call writes its tokens' keys and values at `cache_index`, advances it, and attends over the whole cache with
    `mask` (`[B, 1, T, cache length]`, which must hide the positions not written yet).
    """

    num_heads: int
    dropout_rate: float = 0.0
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None, mask: jax.Array | None = None, *,
                 deterministic: bool, decode: bool = False) -> jax.Array:
        width = x.shape[-1]
        if decode and context is not None:
            raise ValueError("MultiHeadAttention: the key/value cache (decode=True) is for self-attention only")
        if width % self.num_heads:
            raise ValueError(f"attention width {width} is not divisible by num_heads={self.num_heads}")
        heads, head_dim = self.num_heads, width // self.num_heads
        in_width = width if context is None else context.shape[-1]
        query, key, value = (_Projection((in_width if n != "query" else width,), (heads, head_dim), name=n)()
                             for n in ("query", "key", "value"))
        out_kernel, out_bias = _Projection((heads, head_dim), (width,), name="out")()
        flat = lambda kernel_bias: (kernel_bias[0].reshape(kernel_bias[0].shape[0], -1),  # noqa: E731
                                    kernel_bias[1].reshape(-1))
        if context is None:
            kernels, biases = zip(*(flat(p) for p in (query, key, value)))
            x, kernel, bias = promote_dtype(x, jnp.concatenate(kernels, 1), jnp.concatenate(biases), dtype=self.dtype)
            q, k, v = jnp.moveaxis(self._split_heads(x @ kernel + bias, 3), 2, 0)
        else:
            (q_kernel, q_bias), (kv_kernels, kv_biases) = flat(query), zip(*(flat(p) for p in (key, value)))
            x, context, q_kernel, q_bias, kv_kernel, kv_bias = promote_dtype(
                x, context, q_kernel, q_bias, jnp.concatenate(kv_kernels, 1), jnp.concatenate(kv_biases),
                dtype=self.dtype)
            q = self._split_heads(x @ q_kernel + q_bias, 1)[:, :, 0]
            k, v = jnp.moveaxis(self._split_heads(context @ kv_kernel + kv_bias, 2), 2, 0)
        if decode:
            k, v = self._cached(k, v)
        if self.dropout_rate > 0 and not deterministic:
            keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.dropout_rate,
                                        (*q.shape[:3], k.shape[2]))
            context_heads = _attention_with_dropout(q, k, v, mask, keep, self.dropout_rate)
        else:
            context_heads = heads_first_attention(q, k, v, mask)
        context_heads = jnp.swapaxes(context_heads, 1, 2)  # [B, T, H, Dh]
        out_kernel, out_bias = promote_dtype(out_kernel.reshape(-1, width), out_bias, dtype=v.dtype)
        return context_heads.reshape(*context_heads.shape[:2], -1) @ out_kernel + out_bias

    def _cached(self, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The whole `[B, H, S, Dh]` key/value cache with `k`, `v` (`[B, H, T, Dh]`) written at the cache index."""
        initialised = self.has_variable("cache", "cached_key")
        cached_key = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        if not initialised:  # The creating call: the cache spans this input's length.
            return k, v
        start = (0, 0, index.value, 0)
        cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, k.astype(cached_key.value.dtype), start)
        cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, v.astype(cached_value.value.dtype),
                                                          start)
        index.value = index.value + k.shape[2]
        return cached_key.value, cached_value.value

    def _split_heads(self, y: jax.Array, parts: int) -> jax.Array:
        """`[B, T, parts * H * Dh]` (projections side by side) -> `[B, H, parts, T, Dh]`."""
        b, t, _ = y.shape
        y = y.reshape(b, t, parts, self.num_heads, -1)
        return jnp.transpose(y, (0, 3, 2, 1, 4))


class MlpBlock(nn.Module):
    """Dense -> GELU -> dropout -> Dense, the transformer's feed-forward layer."""

    hidden: int
    dropout: float = 0.0
    gelu_approximate: bool = False
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        width = x.shape[-1]
        x = nn.gelu(nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(x), approximate=self.gelu_approximate)
        x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
        return nn.Dense(width, dtype=self.dtype, name="fc2")(x)


class TransformerBlock(nn.Module):
    """Multi-head attention + MLP with residuals, pre-LN or post-LN.

    `mask` is the `[B, 1, Tq, Tk]` attention mask (see `attention_mask`); `context` (optional) supplies keys and
    values for cross-attention. Softmax runs in float32 whatever the compute dtype. `decode=True` keeps the
    self-attention's key/value cache (packed attention only; see `MultiHeadAttention`).
    """

    num_heads: int
    mlp_dim: int
    dropout: float = 0.0
    attention_dropout: float = 0.0
    pre_norm: bool = True
    layer_norm_eps: float = LAYER_NORM_EPS
    gelu_approximate: bool = False
    attention_impl: str = "auto"
    dtype: Dtype | None = None

    @nn.compact
    def __call__(
        self, x: jax.Array, mask: jax.Array | None, context: jax.Array | None, deterministic: bool,
        decode: bool = False,
    ) -> jax.Array:
        norm = lambda name: nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name=name)  # noqa: E731
        impl = resolve_attention(self.attention_impl, self.dtype, self.attention_dropout)
        if impl == "packed":
            packed = MultiHeadAttention(self.num_heads, self.attention_dropout, self.dtype, name="attention")
            attention = functools.partial(packed, decode=decode)
        elif decode:
            raise ValueError(f"the key/value cache needs attention_impl='packed', not {impl!r}")
        else:
            flax_attention = nn.MultiHeadDotProductAttention(
                num_heads=self.num_heads,
                dtype=self.dtype,
                dropout_rate=self.attention_dropout,
                force_fp32_for_softmax=True,
                attention_fn=fused_attention if impl == "fused" else nn.dot_product_attention,
                name="attention",
            )
            attention = lambda q, kv, mask, deterministic: flax_attention(  # noqa: E731
                q, q if kv is None else kv, mask=mask, deterministic=deterministic)
        mlp = MlpBlock(self.mlp_dim, self.dropout, self.gelu_approximate, self.dtype, name="mlp")
        drop = lambda y: nn.Dropout(self.dropout)(y, deterministic=deterministic)  # noqa: E731
        if self.pre_norm:
            y = norm("ln_attention")(x)
            x = x + drop(attention(y, context, mask, deterministic=deterministic))
            return x + drop(mlp(norm("ln_mlp")(x), deterministic))
        x = norm("ln_attention")(x + drop(attention(x, context, mask, deterministic=deterministic)))
        return norm("ln_mlp")(x + drop(mlp(x, deterministic)))


class Transformer(nn.Module):
    """A stack of `num_layers` self-attention blocks (`layer_{i}`), with a final LayerNorm when pre-LN.

    `token_mask` is `[B, T]` (1 = real token); `causal=True` lets each token see only itself and earlier ones.
    `remat` ("none" / "full" / "dots") rematerialises each block in the backward pass.
    """

    num_layers: int
    num_heads: int
    mlp_dim: int
    dropout: float = 0.0
    attention_dropout: float = 0.0
    pre_norm: bool = True
    causal: bool = False
    layer_norm_eps: float = LAYER_NORM_EPS
    gelu_approximate: bool = False
    remat: str = "none"
    attention_impl: str = "auto"
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, token_mask: jax.Array | None = None, *, train: bool) -> jax.Array:
        mask = attention_mask(token_mask, token_mask, x.shape[1] if self.causal else None)
        block = maybe_remat(TransformerBlock, self.remat, static_argnums=(4,))
        for i in range(self.num_layers):
            x = block(
                num_heads=self.num_heads,
                mlp_dim=self.mlp_dim,
                dropout=self.dropout,
                attention_dropout=self.attention_dropout,
                pre_norm=self.pre_norm,
                layer_norm_eps=self.layer_norm_eps,
                gelu_approximate=self.gelu_approximate,
                attention_impl=self.attention_impl,
                dtype=self.dtype,
                name=f"layer_{i}",
            )(x, mask, None, not train)
        if self.pre_norm:
            x = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="ln_final")(x)
        return x


def masked_mean(tokens: jax.Array, token_mask: jax.Array | None) -> jax.Array:
    """Mean over the real tokens of `[B, T, D]` (all tokens when `token_mask` is None)."""
    if token_mask is None:
        return tokens.mean(axis=1)
    weights = token_mask.astype(tokens.dtype)[..., None]
    return (tokens * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1)
