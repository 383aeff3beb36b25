"""Image encoders. Input `[B, H, W, C]` (uint8 pixels or floats); output `EncoderOutput`.

Registered names (every dataclass field is a config key; the named sizes are subclasses that only change field
defaults, so `patch_size`, `width`, `stem`, ... can still be overridden from the config):

* `small_cnn`: LeNet-like CNN for tiny images.
* `vgg`: VGG-11/13/16 (Simonyan, Zisserman 2015), optional batch norm, any input size, channel width scalable.
* `vit` (generic, small defaults), `vit_ti16`, `vit_s16`, `vit_b16`: Vision Transformer (Dosovitskiy et al. 2021).
* `resnet` (generic, ResNet-18 defaults), `resnet18`, `resnet50`: ResNet v1.5 (He et al. 2016) with batch norm.

Pixels are only cast to the compute dtype (no scaling): normalisation is the input pipeline's job. `dtype` is the
compute dtype (e.g. bfloat16, outputs then have that dtype); parameters and batch-norm statistics stay float32.
`remat` ("none" / "full" / "dots") rematerialises each block (ViT layer, ResNet residual block, CNN stage) in
the backward pass; it never changes parameter names or values.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange

from mmjax.nn.common import Dtype, EncoderOutput, check_rank, int_pair, to_dtype
from mmjax.nn.conv import Conv
from mmjax.nn.encoders.conditioning import Film, check_film, film_layer
from mmjax.nn.layers import ConvReluPool, relu_max_pool_2x2
from mmjax.nn.transformer import LAYER_NORM_EPS, Transformer, maybe_remat, remat_policy
from mmjax.registry import ENCODERS

# --------------------------------------------------------------------------------------------------------------
# Small CNN
# --------------------------------------------------------------------------------------------------------------


@ENCODERS.register("small_cnn")
class SmallCNN(nn.Module):
    """LeNet-like CNN for small images (e.g. 8x8 digits): 3x3 convs + ReLU, 2x2 max-pool after each `pool_after`.

    Tokens are the last feature map's positions projected to `width`; the pooled feature is a dense layer over
    the flattened map (position matters for small digits, so it is not a mean of the tokens).
    `remat` rematerialises each conv + ReLU (+ pool) stage; parameter names (`Conv_{i}`, `token_proj`,
    `pool_proj`) are the same whatever the policy. FiLM (`film=`, see `mmjax.nn.encoders.conditioning`) scales and
    shifts each conv's output channels before its ReLU; `film_channels()` = `features`.
    """

    features: Sequence[int] = (32, 64)
    pool_after: Sequence[int] = (1,)
    width: int = 128
    dropout: float = 0.0
    conv_impl: str = "auto"
    remat: str = "none"
    dtype: Dtype | None = None

    def film_channels(self) -> tuple[int, ...]:
        return tuple(self.features)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, film: Film = None) -> EncoderOutput:
        check_rank("small_cnn", x, 4, "[B, H, W, C]")
        check_film("small_cnn", film, self.film_channels(), x.shape[0])
        x = to_dtype(x, self.dtype)
        policy = remat_policy(self.remat)  # Validates the name.
        for i, features in enumerate(self.features):

            def stage(module, x, i=i, features=features):
                layer = ConvReluPool if i in self.pool_after else Conv
                y = layer(features, (3, 3), impl=self.conv_impl, dtype=self.dtype, parent=module, name=f"Conv_{i}")(x)
                return y if i in self.pool_after else nn.relu(y)

            def film_stage(module, x, gamma, beta, i=i, features=features):
                y = Conv(features, (3, 3), impl=self.conv_impl, dtype=self.dtype, parent=module, name=f"Conv_{i}")(x)
                y = film_layer(y, ((gamma, beta),), 0)
                return relu_max_pool_2x2(y) if i in self.pool_after else nn.relu(y)

            if film is None:
                if self.remat != "none":
                    stage = nn.remat(stage, policy=policy)
                x = stage(self, x)
            else:
                if self.remat != "none":
                    film_stage = nn.remat(film_stage, policy=policy)
                x = film_stage(self, x, *film[i])
        tokens = nn.Dense(self.width, dtype=self.dtype, name="token_proj")(rearrange(x, "b h w c -> b (h w) c"))
        pooled = nn.relu(nn.Dense(self.width, dtype=self.dtype, name="pool_proj")(rearrange(x, "b h w c -> b (h w c)")))
        pooled = nn.Dropout(self.dropout, deterministic=not train)(pooled)
        return EncoderOutput(tokens=tokens, pooled=pooled)


# --------------------------------------------------------------------------------------------------------------
# VGG
# --------------------------------------------------------------------------------------------------------------

VGG_DEPTHS = {11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2), 16: (2, 2, 3, 3, 3)}
"""3x3 convolutions per stage of VGG configurations A (11 weight layers), B (13) and D (16), Simonyan & Zisserman
2015, Table 1 (the three fully connected layers are counted in the depth)."""


class _VGGLayer(nn.Module):
    """One 3x3 conv (SAME) [+ batch norm] [+ FiLM] + ReLU [+ 2x2 max-pool] of a VGG stage."""

    features: int
    pool: bool
    batch_norm: bool
    bn_momentum: float
    bn_epsilon: float
    conv_impl: str
    dtype: Dtype | None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, gamma: jax.Array | None = None,
                 beta: jax.Array | None = None) -> jax.Array:
        film = None if gamma is None else ((gamma, beta),)
        if self.pool and not self.batch_norm and film is None:  # The fused ReLU + pool of the CPU fast path.
            return ConvReluPool(self.features, (3, 3), impl=self.conv_impl, dtype=self.dtype, name="conv")(x)
        y = Conv(self.features, (3, 3), use_bias=not self.batch_norm, impl=self.conv_impl, dtype=self.dtype,
                 name="conv")(x)
        if self.batch_norm:
            y = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                             dtype=self.dtype, name="bn")(y)
        y = film_layer(y, film, 0)
        return relu_max_pool_2x2(y) if self.pool else nn.relu(y)


@ENCODERS.register("vgg")
class VGG(nn.Module):
    """VGG (Simonyan, Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition", ICLR 2015):
    stages of 3x3 convolutions (stride 1, SAME padding) + ReLU, each stage ending in a 2x2 max-pool.

    * `depth` 11 / 13 / 16: configurations A / B / D, (1, 1, 2, 2, 2) / (2, 2, 2, 2, 2) / (2, 2, 3, 3, 3) convs
      per stage. Stage s has `width * min(2**s, 8)` channels: `width=64` is the paper's 64-128-256-512-512; a
      smaller `width` (e.g. 16) scales every stage down for small images and small data.
    * `batch_norm=True`: conv (no bias) -> BatchNorm -> ReLU, as torchvision's `vgg*_bn` (statistics in
      `batch_stats`, Flax momentum convention, see `resnet`).
    * Any input size: the max-pools use SAME padding (an odd side is padded with -inf, a 1-pixel side stays 1), so
      8x8 digits pass through all five stages (8 -> 4 -> 2 -> 1 -> 1 -> 1).
    * Output: `tokens` = the positions of the last feature map `[B, h*w, C]`; `pooled` = their mean (global
      average pooling), then the `hidden` fully connected layers (ReLU, dropout `dropout`), e.g. `(4096, 4096)`
      for the paper's classifier MLP. The paper flattens a fixed 7x7 map instead; global average pooling is what
      makes any input size possible (for a 1x1 last map it is the same as flattening).
    * FiLM (`film=`, `mmjax.nn.encoders.conditioning`): each conv's output channels are scaled and shifted (after
      batch norm, before the ReLU, as in the FiLM paper's residual blocks); `film_channels()` lists every conv.

    Parameters: `stage{s}_conv{j}/conv/{kernel, bias}` (+ `bn/{scale, bias}`), `fc_{k}`; `remat` ("none" /
    "full" / "dots") rematerialises each conv layer.
    """

    depth: int = 11
    width: int = 64
    batch_norm: bool = False
    hidden: Sequence[int] = ()
    dropout: float = 0.0
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    conv_impl: str = "auto"
    remat: str = "none"
    dtype: Dtype | None = None

    def stages(self) -> list[tuple[int, int]]:
        """(channels, convs) of each stage."""
        if self.depth not in VGG_DEPTHS:
            raise ValueError(f"vgg: depth={self.depth!r}; valid: {', '.join(map(str, VGG_DEPTHS))}")
        return [(self.width * min(2**s, 8), n) for s, n in enumerate(VGG_DEPTHS[self.depth])]

    def film_channels(self) -> tuple[int, ...]:
        return tuple(c for c, n in self.stages() for _ in range(n))

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, film: Film = None) -> EncoderOutput:
        check_rank("vgg", x, 4, "[B, H, W, C]")
        check_film("vgg", film, self.film_channels(), x.shape[0])
        x = to_dtype(x, self.dtype)
        layer_cls = maybe_remat(_VGGLayer, self.remat, static_argnums=(2,))
        index = 0
        for s, (channels, convs) in enumerate(self.stages()):
            for j in range(convs):
                layer = layer_cls(channels, pool=j == convs - 1, batch_norm=self.batch_norm,
                                  bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon, conv_impl=self.conv_impl,
                                  dtype=self.dtype, name=f"stage{s}_conv{j}")
                x = layer(x, train) if film is None else layer(x, train, *film[index])
                index += 1
        tokens = rearrange(x, "b h w c -> b (h w) c")
        pooled = tokens.mean(axis=1)
        for k, features in enumerate(self.hidden):
            pooled = nn.relu(nn.Dense(features, dtype=self.dtype, name=f"fc_{k}")(pooled))
            pooled = nn.Dropout(self.dropout, deterministic=not train)(pooled)
        return EncoderOutput(tokens=tokens, pooled=pooled)


# --------------------------------------------------------------------------------------------------------------
# Vision Transformer
# --------------------------------------------------------------------------------------------------------------


def posemb_sincos_2d(grid_h: int, grid_w: int, width: int, temperature: float = 10_000.0) -> jax.Array:
    """Fixed 2-D sine-cosine position embeddings `[1, grid_h * grid_w, width]` (row-major grid order).

    A quarter of the channels each: sin(x), cos(x), sin(y), cos(y), with frequencies `temperature ** -(k / (D/4))`.
    """
    if width % 4:
        raise ValueError(f"posemb='sincos2d' needs a width divisible by 4, got width={width}")
    y, x = np.mgrid[:grid_h, :grid_w]
    omega = 1.0 / temperature ** (np.arange(width // 4) / (width // 4))
    y = y.reshape(-1)[:, None] * omega[None, :]
    x = x.reshape(-1)[:, None] * omega[None, :]
    table = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
    return jnp.asarray(table[None], jnp.float32)


@ENCODERS.register("vit")
class ViT(nn.Module):
    """Vision Transformer: non-overlapping patches -> linear embedding (+ CLS) + positions -> pre-LN Transformer.

    Parameters (the names `mmjax.nn.pretrained` maps HuggingFace ViT checkpoints onto):

    * `patch_embed/{kernel [p_h*p_w*C, D], bias [D]}`: a Dense over each flattened patch, i.e. a conv with
      kernel = stride = patch. Patches are flattened in `(p_h, p_w, C)` order (channels fastest), so a HF conv
      kernel `[D, C, p_h, p_w]` maps as `kernel.transpose(2, 3, 1, 0).reshape(p_h * p_w * C, D)`.
    * `cls_token [1, 1, D]` (only when `pool="cls"`; initialised to zeros).
    * `pos_embed [1, N (+1 with a CLS token, which comes first), D]` (only when `posemb="learned"`; sized from the
      input at init, N = (H/p_h) * (W/p_w) in row-major order; `posemb="sincos2d"` computes fixed embeddings
      instead, zero for the CLS token).
    * `encoder`: the shared `Transformer` (pre-LN): `encoder/layer_{i}/{ln_attention, attention/{query,key,value,
      out}, ln_mlp, mlp/{fc1,fc2}}` and `encoder/ln_final`.

    Output: `tokens` = the N patch tokens after `ln_final` (CLS excluded) `[B, N, D]`; `pooled` = the CLS token
    after `ln_final` (`pool="cls"`) or the mean of the patch tokens (`pool="mean"`). `image_size`, when set, is
    checked against the input (it is not needed to build the model). `dropout` also applies to the embeddings.
    """

    patch_size: int | Sequence[int] = 4
    width: int = 64
    depth: int = 2
    num_heads: int = 4
    mlp_dim: int = 256
    image_size: int | Sequence[int] | None = None
    posemb: str = "learned"
    pool: str = "cls"
    dropout: float = 0.0
    attention_dropout: float = 0.0
    layer_norm_eps: float = LAYER_NORM_EPS
    remat: str = "none"
    attention_impl: str = "auto"  # "auto": "fused" on GPU in 16-bit, else "packed"; or "flax" (see transformer.py)
    dtype: Dtype | None = None

    def _check(self, name: str, x: jax.Array) -> tuple[int, int]:
        """Validates the config and the input shape (at trace time); returns the patch grid `(H/p_h, W/p_w)`."""
        check_rank(name, x, 4, "[B, H, W, C]")
        if self.posemb not in ("learned", "sincos2d"):
            raise ValueError(f"{name}: posemb must be 'learned' or 'sincos2d', got {self.posemb!r}")
        if self.pool not in ("cls", "mean"):
            raise ValueError(f"{name}: pool must be 'cls' or 'mean', got {self.pool!r}")
        if self.width % self.num_heads:
            raise ValueError(f"{name}: width={self.width} is not divisible by num_heads={self.num_heads}")
        ph, pw = int_pair(self.patch_size, f"{name}: patch_size")
        height, width = x.shape[1:3]
        if self.image_size is not None and int_pair(self.image_size, f"{name}: image_size") != (height, width):
            raise ValueError(
                f"{name}: configured image_size={self.image_size!r} but got images of shape {tuple(x.shape)} "
                f"([B, H, W, C] with H x W = {height} x {width})"
            )
        if height % ph or width % pw:
            raise ValueError(
                f"{name}: image height x width {height} x {width} (input shape {tuple(x.shape)}) is not divisible "
                f"by patch_size {ph} x {pw}"
            )
        return height // ph, width // pw

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> EncoderOutput:
        name = type(self).__name__
        grid_h, grid_w = self._check(name, x)
        ph, pw = int_pair(self.patch_size, "patch_size")
        x = to_dtype(x, self.dtype)
        patches = rearrange(x, "b (gh ph) (gw pw) c -> b (gh gw) (ph pw c)", ph=ph, pw=pw)
        x = nn.Dense(self.width, dtype=self.dtype, name="patch_embed")(patches)
        num_prefix = 0
        if self.pool == "cls":
            cls = self.param("cls_token", nn.initializers.zeros_init(), (1, 1, self.width), jnp.float32)
            cls = jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, self.width))
            x = jnp.concatenate([cls, x], axis=1)
            num_prefix = 1
        if self.posemb == "learned":
            shape = (1, x.shape[1], self.width)
            if self.has_variable("params", "pos_embed"):
                existing = tuple(self.get_variable("params", "pos_embed").shape)
                if existing != shape:
                    raise ValueError(
                        f"{name}: pos_embed has shape {existing} but {grid_h * ph} x {grid_w * pw} images with "
                        f"patch_size {ph} x {pw} need {shape} (learned position embeddings fix the image size "
                        "at init)"
                    )
            pos = self.param("pos_embed", nn.initializers.normal(stddev=0.02), shape, jnp.float32)
        else:
            pos = posemb_sincos_2d(grid_h, grid_w, self.width)
            pos = jnp.pad(pos, ((0, 0), (num_prefix, 0), (0, 0)))
        x = x + pos.astype(x.dtype)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = Transformer(
            num_layers=self.depth,
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            dropout=self.dropout,
            attention_dropout=self.attention_dropout,
            pre_norm=True,
            layer_norm_eps=self.layer_norm_eps,
            remat=self.remat,
            attention_impl=self.attention_impl,
            dtype=self.dtype,
            name="encoder",
        )(x, train=train)
        tokens = x[:, num_prefix:]
        pooled = x[:, 0] if self.pool == "cls" else tokens.mean(axis=1)
        return EncoderOutput(tokens=tokens, pooled=pooled)


@ENCODERS.register("vit_ti16")
class ViTTi16(ViT):
    """ViT-Ti/16: width 192, depth 12, 3 heads, MLP 768."""

    patch_size: int | Sequence[int] = 16
    width: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_dim: int = 768


@ENCODERS.register("vit_s16")
class ViTS16(ViT):
    """ViT-S/16: width 384, depth 12, 6 heads, MLP 1536."""

    patch_size: int | Sequence[int] = 16
    width: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_dim: int = 1536


@ENCODERS.register("vit_b16")
class ViTB16(ViT):
    """ViT-B/16: width 768, depth 12, 12 heads, MLP 3072."""

    patch_size: int | Sequence[int] = 16
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072


# --------------------------------------------------------------------------------------------------------------
# ResNet
# --------------------------------------------------------------------------------------------------------------

# He et al. / torchvision initialisation of convolutions: normal with variance 2 / fan_out.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """3x3 max-pool, stride 2, padding 1 (the ResNet stem's, as in torchvision) over `[B, H, W, C]`.

    A max of nine strided slices, so the gradient is elementwise (XLA's select-and-scatter is slow on CPU).
    """
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    out_h, out_w = (x.shape[1] - 3) // 2 + 1, (x.shape[2] - 3) // 2 + 1
    windows = [x[:, i : i + 2 * out_h - 1 : 2, j : j + 2 * out_w - 1 : 2] for i in range(3) for j in range(3)]
    return functools.reduce(jnp.maximum, windows)


class _ResNetBlock(nn.Module):
    """Residual block: `block="basic"` (two 3x3 convs) or `"bottleneck"` (1x1 -> 3x3 (strided) -> 1x1, x4 wide).

    Convolutions have no bias and are followed by batch norm. The residual branch's last BN scale starts at
    zero (Goyal et al. 2017), so each block starts as the identity (plus the projection shortcut); this is the
    standard ImageNet training recipe. A projection shortcut (1x1 conv + BN: `proj_conv`, `proj_bn`) is used
    when the stride or channel count changes.
    """

    features: int
    strides: int
    block: str
    bn_momentum: float
    bn_epsilon: float
    conv_impl: str
    dtype: Dtype | None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = functools.partial(Conv, use_bias=False, kernel_init=_conv_init, impl=self.conv_impl, dtype=self.dtype)
        norm = functools.partial(
            nn.BatchNorm,
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
        )
        zero_norm = functools.partial(norm, scale_init=nn.initializers.zeros_init())
        if self.block == "basic":
            out_features = self.features
            y = conv(self.features, 3, strides=self.strides, padding=1, name="conv1")(x)
            y = nn.relu(norm(name="bn1")(y))
            y = conv(self.features, 3, padding=1, name="conv2")(y)
            y = zero_norm(name="bn2")(y)
        else:
            out_features = 4 * self.features
            y = conv(self.features, 1, padding=0, name="conv1")(x)
            y = nn.relu(norm(name="bn1")(y))
            y = conv(self.features, 3, strides=self.strides, padding=1, name="conv2")(y)
            y = nn.relu(norm(name="bn2")(y))
            y = conv(out_features, 1, padding=0, name="conv3")(y)
            y = zero_norm(name="bn3")(y)
        if self.strides != 1 or x.shape[-1] != out_features:
            x = conv(out_features, 1, strides=self.strides, padding=0, name="proj_conv")(x)
            x = norm(name="proj_bn")(x)
        return nn.relu(x + y)


@ENCODERS.register("resnet")
class ResNet(nn.Module):
    """ResNet v1.5 (stride in the 3x3 conv of bottlenecks, as torchvision) with batch norm.

    * `stage_sizes`: blocks per stage; stage `i` has `width * 2**i` channels (x4 at the output of bottlenecks)
      and, except the first, starts with a stride-2 block.
    * `block`: "basic" (ResNet-18/34) or "bottleneck" (ResNet-50/101/152).
    * `stem`: "imagenet" (7x7/2 conv + BN + ReLU + 3x3/2 max-pool) or "cifar" (3x3/1 conv + BN + ReLU, no pool)
      for small images.
    * Batch norm: statistics live in the `batch_stats` collection. With `train=True` the batch's own statistics
      are used and the running averages are updated (apply with `mutable=["batch_stats"]`); under `jit` with the
      batch sharded over devices, the mean/variance are over the global batch (XLA reduces across devices).
      With `train=False` the running averages are used and nothing is mutated. `bn_momentum` is Flax's
      convention (running = momentum * running + (1 - momentum) * batch; torch's 0.1 is 0.9 here).

    Parameter names: `stem_conv`, `stem_bn`, `stage{i}_block{j}/{conv1, bn1, conv2, bn2[, conv3, bn3]
    [, proj_conv, proj_bn]}` (0-based). Output: `tokens` = the positions of the final feature map `[B, H'W', C']`
    (row-major), `pooled` = their mean (global average pool) `[B, C']`.
    """

    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    block: str = "basic"
    width: int = 64
    stem: str = "imagenet"
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    conv_impl: str = "auto"
    remat: str = "none"
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> EncoderOutput:
        name = type(self).__name__
        check_rank(name, x, 4, "[B, H, W, C]")
        if self.block not in ("basic", "bottleneck"):
            raise ValueError(f"{name}: block must be 'basic' or 'bottleneck', got {self.block!r}")
        if self.stem not in ("imagenet", "cifar"):
            raise ValueError(f"{name}: stem must be 'imagenet' or 'cifar', got {self.stem!r}")
        x = to_dtype(x, self.dtype)
        if self.stem == "imagenet":
            kernel, strides, padding = 7, 2, 3
        else:
            kernel, strides, padding = 3, 1, 1
        x = Conv(
            self.width,
            kernel,
            strides=strides,
            padding=padding,
            use_bias=False,
            kernel_init=_conv_init,
            impl=self.conv_impl,
            dtype=self.dtype,
            name="stem_conv",
        )(x)
        x = nn.BatchNorm(
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
            name="stem_bn",
        )(x)
        x = nn.relu(x)
        if self.stem == "imagenet":
            x = max_pool_3x3_s2(x)
        block = maybe_remat(_ResNetBlock, self.remat, static_argnums=(2,))
        for i, num_blocks in enumerate(self.stage_sizes):
            for j in range(num_blocks):
                x = block(
                    features=self.width * 2**i,
                    strides=2 if i > 0 and j == 0 else 1,
                    block=self.block,
                    bn_momentum=self.bn_momentum,
                    bn_epsilon=self.bn_epsilon,
                    conv_impl=self.conv_impl,
                    dtype=self.dtype,
                    name=f"stage{i}_block{j}",
                )(x, train)
        tokens = rearrange(x, "b h w c -> b (h w) c")
        return EncoderOutput(tokens=tokens, pooled=tokens.mean(axis=1))


@ENCODERS.register("resnet18")
class ResNet18(ResNet):
    """ResNet-18: basic blocks, stages (2, 2, 2, 2)."""

    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    block: str = "basic"


@ENCODERS.register("resnet50")
class ResNet50(ResNet):
    """ResNet-50: bottleneck blocks (expansion 4), stages (3, 4, 6, 3)."""

    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    block: str = "bottleneck"
