"""Micro-benchmark of 2-D convolutions (``impl='xla'`` vs ``'cpu'``) and a whole-module timer.

Run ``python -m mmjax.bench.convolution`` (optionally ``--repeats N --warmup N --json PATH``). For conv
layers typical of small multimodal encoders (batch 64, NHWC, float32) it prints the median
forward time, input-gradient time, kernel-gradient time, full forward+backward time (output and
both gradients in one jitted call, where XLA may overlap the two gradients) and the ratio
(fwd+bwd)/fwd, per implementation. :func:`benchmark_module` times any linen module's forward
pass and training-step gradient the same way.

Run it WITHOUT ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the test suite sets it).
With 8 simulated devices the XLA figures stay the same within noise, but ``'cpu'`` makes every
kernel-gradient chunk a multiple of 8 examples (so that sharded batches split locally), which
doubles its kernel-gradient time on 40x50x16 inputs. Timings are noisy on shared machines; the
functions of one layer run round-robin so that load spikes hit every column alike.

Design record (2 AMD EPYC cores, jax 0.10.2 whose CPU backend runs convolutions as YNNPACK
fusions, batch 64, 3x3 kernels; the host was shared, so compare ratios to the forward time of
the same run). Kernel-gradient formulations for 40x50 16->32 (forward ~16-20 ms, XLA kernel
gradient ~160-290 ms), in ms:

* im2col with ``lax.conv_general_dilated_patches`` + matmul: ~190 (the identity-kernel patch
  convolution does 144x the useful work);
* im2col with concatenated shifted slices + one matmul: ~90-145. The matmul alone takes
  ~20-30; the 73 MB patch buffer is the cost: XLA CPU buffers over 32 MiB are ``mmap``-ed
  fresh per call and page-faulted at ~1 GB/s on this VM (writing 33 MB: ~25 ms, 31 MB: ~3 ms);
* transposed patch layout ``[taps*cin, N*H*W]`` and the flat-shift trick (one contiguous
  slice per tap): ~115-270, also with chunks of examples;
* gather-built patches + matmul per chunk of examples: ~70-80;
* nine per-tap ``[M, cin]^T @ [M, cout]`` matmuls on shifted slices: ~50-150;
* the kernel gradient as one convolution with swapped dimension numbers: ~260;
* ``vmap`` over example chunks (a batch-grouped convolution): 4-20x slower, and ``lax.scan``
  over them: 25-180x slower than the same chunks unrolled;
* spatial (row-block) chunks instead of example chunks: never faster (up to 2.5x slower);
  polyphase decomposition of stride-2 kernel gradients: 1.25-1.7x slower than the dilated
  convolution;
* chosen: XLA's kernel-gradient convolution per chunk of examples, unrolled in Python and
  summed: ~1.1-1.8x forward at one 40x50x16 example per chunk; chunks of ~128 KiB of input
  were best for every layer (32-512 KiB tried).

With 32 or more input channels (8x8 32->64, 12x10 32->64, 25x20 32->64 stride 2) a patch matrix
per chunk of 4-16 examples (0.5-2 MiB) and one matmul beat the per-chunk convolution by 1.3-1.8x;
with 16 channels it lost (25x20: equal to 1.1x slower, 40x50: 1.5x slower) and one batched
matmul over chunk groups was no faster than chunks unrolled. The encoders' ReLU + 2x2 max-pool
backward (autodiff of ``jnp.max``: equality mask, tie counts, division, in several passes) was
2-3x slower than a ``custom_vjp`` that routes each window's gradient to its first maximum
(``mmjax.nn.layers.relu_max_pool_2x2``). That backward is now one broadcast select from an int8
winner index kept by the forward: XLA's CPU code for the earlier mask version (compare the input
with the pooled maximum, keep the first hit, stack) ran several times below memory speed on
16-channel maps, and recomputed it inside the conv bias gradient.

Inside whole encoder train steps (same process, interleaved, 2 Intel Xeon cores), 2 MiB patch chunks beat 1 and
4 MiB by ~10%: fewer per-chunk ops, whose fixed cost the layer-alone timings hide. Each unrolled chunk adds
compile time (~0.15 s per patch-matmul chunk, ~0.035 s per convolution chunk). Alternatives that compiled
faster all ran the step slower: a ``fori_loop`` over chunks (half the compile, +12%: the chunks no longer run
side by side on the two cores), the patch matrix built in two slice stages (a third, +3-13%) or once for the
whole batch (half, +25%), and a gather-built patch matrix (a quarter, +25% for that layer).

Splitting the forward pass or the input gradient into example chunks gained nothing
(1.0-1.25x); im2col forward was 1.1-2.3x slower; a polyphase input gradient for stride 2 was
1.1-1.6x faster on 25x20x32 and 50x40x16 inputs, equal on 25x20x16 and 1.35x slower on 8x8x32,
and was not adopted. With one
input channel XLA's convolution is ~7-10x slower than a fused sum of shifted broadcast
multiplies (adopted for ``cin == 1``, with a matmul + shifted-add input gradient); for 2-4
input channels the broadcast sum wins only on large maps with few output channels.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmjax import experiment, runtime
from mmjax.data import av_digits as av_digits_data
from mmjax.nn.builder import build_model
from mmjax.nn.conv import conv2d

IMPLS_COMPARED = ("xla", "cpu")


@dataclasses.dataclass(frozen=True)
class ConvCase:
    """A conv layer: input ``[batch, height, width, cin]``, weights ``[*kernel, cin, cout]``."""

    name: str
    height: int
    width: int
    cin: int
    cout: int
    kernel: tuple[int, int] = (3, 3)
    strides: tuple[int, int] = (1, 1)
    padding: str = "SAME"
    batch: int = 64


DEFAULT_CASES = (
    ConvCase("image 8x8 1->32", 8, 8, 1, 32),
    ConvCase("image 8x8 32->64", 8, 8, 32, 64),
    ConvCase("spec 50x40 1->16", 50, 40, 1, 16),
    ConvCase("spec 25x20 16->32", 25, 20, 16, 32),
    ConvCase("spec 13x10 32->64", 13, 10, 32, 64),
    ConvCase("map 40x50 16->32", 40, 50, 16, 32),
    ConvCase("spec 50x40 16->32 s2", 50, 40, 16, 32, strides=(2, 2)),
    ConvCase("spec 25x20 32->64 s2", 25, 20, 32, 64, strides=(2, 2)),
)


def time_round_robin(
    fns: Mapping[str, Callable[[], Any]], *, repeats: int = 20, warmup: int = 2
) -> dict[str, float]:
    """Median wall time in ms of each zero-argument callable, calls interleaved.

    Every callable is called ``warmup`` times first (compilation happens there), then
    the callables take turns for ``repeats`` rounds; each call is timed up to
    ``jax.block_until_ready`` of its result.
    """
    for fn in fns.values():
        for _ in range(warmup):
            jax.block_until_ready(fn())
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}


def conv_functions(case: ConvCase, impl: str, seed: int = 0) -> dict[str, Callable[[], Any]]:
    """Jitted zero-argument closures: ``fwd``, ``dx``, ``dk`` and ``fwd_bwd`` for one case."""
    rng = np.random.default_rng(seed)  # numpy: jax.random takes seconds to compile per shape
    x_shape = (case.batch, case.height, case.width, case.cin)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    k = jnp.asarray(0.1 * rng.standard_normal((*case.kernel, case.cin, case.cout)), jnp.float32)

    def conv(x_, k_):
        return conv2d(x_, k_, strides=case.strides, padding=case.padding, impl=impl)

    g = jnp.asarray(rng.standard_normal(jax.eval_shape(conv, x, k).shape), jnp.float32)
    fwd = jax.jit(conv)
    dx = jax.jit(lambda x_, k_, g_: jax.vjp(lambda a: conv(a, k_), x_)[1](g_)[0])
    dk = jax.jit(lambda x_, k_, g_: jax.vjp(lambda b: conv(x_, b), k_)[1](g_)[0])

    @jax.jit
    def fwd_bwd(x_, k_, g_):
        y, vjp = jax.vjp(conv, x_, k_)
        return y, vjp(g_)

    return {
        "fwd": lambda: fwd(x, k),
        "dx": lambda: dx(x, k, g),
        "dk": lambda: dk(x, k, g),
        "fwd_bwd": lambda: fwd_bwd(x, k, g),
    }


def benchmark_conv(
    case: ConvCase, impls: Sequence[str] = IMPLS_COMPARED, *, repeats: int = 20, warmup: int = 2
) -> dict[str, dict[str, float]]:
    """Per impl: ``fwd_ms``, ``dx_ms``, ``dk_ms``, ``fwd_bwd_ms`` and ``ratio`` = fwd_bwd / fwd."""
    fns = {
        f"{impl}/{part}": fn for impl in impls for part, fn in conv_functions(case, impl).items()
    }
    times = time_round_robin(fns, repeats=repeats, warmup=warmup)
    results = {}
    for impl in impls:
        row = {f"{part}_ms": times[f"{impl}/{part}"] for part in ("fwd", "dx", "dk", "fwd_bwd")}
        row["ratio"] = row["fwd_bwd_ms"] / row["fwd_ms"]
        results[impl] = row
    return results


def benchmark_module(
    module: Any,
    inputs: Any,
    *,
    repeats: int = 20,
    warmup: int = 2,
    seed: int = 0,
    loss_fn: Callable[[Any], jax.Array] | None = None,
    apply_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, float]:
    """Time a linen module's forward pass and a training step's gradient computation.

    Args:
      module: any ``flax.linen`` module.
      inputs: one array or a tuple of positional arrays for ``module.apply``.
      repeats, warmup: as in :func:`time_round_robin`.
      seed: PRNG seed for ``module.init`` (an ``'rbg'`` key: parameter values do not matter
        for timing, and threefry's sampler takes seconds to compile per shape on CPU).
      loss_fn: maps the module output to a scalar; default: the sum over all floating
        output leaves of their mean (works for ``(tokens, pooled)`` encoder outputs).
      apply_kwargs: extra keyword arguments for ``init`` and ``apply`` (e.g. ``train=False``).

    Returns:
      ``forward_ms`` (jitted apply), ``train_step_ms`` (jitted ``value_and_grad`` of the
      loss with respect to the parameters), ``ratio`` = train_step / forward, and
      ``num_params``.
    """
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    kwargs = dict(apply_kwargs or {})
    loss_fn = loss_fn or _mean_of_outputs
    params = module.init(jax.random.key(seed, impl="rbg"), *args, **kwargs)

    forward = jax.jit(lambda p, *a: module.apply(p, *a, **kwargs))
    step = jax.jit(jax.value_and_grad(lambda p, *a: loss_fn(module.apply(p, *a, **kwargs))))
    times = time_round_robin(
        {"forward": lambda: forward(params, *args), "train_step": lambda: step(params, *args)},
        repeats=repeats,
        warmup=warmup,
    )
    return {
        "forward_ms": times["forward"],
        "train_step_ms": times["train_step"],
        "ratio": times["train_step"] / times["forward"],
        "num_params": int(sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(params))),
    }


def _mean_of_outputs(outputs: Any) -> jax.Array:
    """Default loss: the sum of the means of all floating-point output leaves."""
    leaves = [
        jnp.mean(leaf.astype(jnp.float32))
        for leaf in jax.tree_util.tree_leaves(outputs)
        if jnp.issubdtype(leaf.dtype, jnp.floating)
    ]
    if not leaves:
        raise ValueError("the module returned no floating-point outputs to build a loss from")
    return functools.reduce(jnp.add, leaves)


Results = Mapping[str, Mapping[str, Mapping[str, float]]]


def _table(results: Results, first: str, columns: Sequence[tuple[str, str]], total: str) -> str:
    """Text table, one row per (name, impl); `columns` are (header, key); speed-up of `total` against 'xla'."""
    headers = [f"{first:<22}", f"{'impl':<5}", *(f"{h:>11}" for h, _ in columns), f"{'speed-up':>9}"]
    header = " ".join(headers)
    lines = [header, "-" * len(header)]
    for name, per_impl in results.items():
        baseline = per_impl.get("xla", {}).get(total)
        for impl, row in per_impl.items():
            speedup = f"{baseline / row[total]:>8.2f}x" if baseline else f"{'':>9}"
            cells = [f"{name:<22}", f"{impl:<5}", *(f"{row[key]:>11.2f}" for _, key in columns), speedup]
            lines.append(" ".join(cells))
    return "\n".join(lines)


def format_table(results: Results) -> str:
    """Conv layers: forward, input-grad, kernel-grad and fwd+bwd ms, (f+b)/f, speed-up of 'cpu' over 'xla'."""
    columns = [("fwd ms", "fwd_ms"), ("dx ms", "dx_ms"), ("dk ms", "dk_ms"), ("fwd+bwd ms", "fwd_bwd_ms"),
               ("(f+b)/f", "ratio")]
    return _table(results, "case", columns, "fwd_bwd_ms")


def run(
    cases: Sequence[ConvCase] = DEFAULT_CASES,
    impls: Sequence[str] = IMPLS_COMPARED,
    *,
    repeats: int = 20,
    warmup: int = 2,
) -> dict[str, dict[str, dict[str, float]]]:
    """Benchmark every case; returns ``{case name: {impl: figures}}``."""
    return {
        case.name: benchmark_conv(case, impls, repeats=repeats, warmup=warmup) for case in cases
    }


def default_encoders(batch: int = 64) -> dict[str, tuple[Callable[[str], Any], jax.Array]]:
    """The conv encoders of the default experiment (experiments.av_digits), at its input shapes.

    Returns ``{modality: (make_module(conv_impl), inputs)}``.
    """
    config = experiment.load("av_digits").get_config()
    shapes = {
        "image": (batch, 8, 8, 1),
        "audio": (batch, av_digits_data.N_FRAMES, av_digits_data.N_MELS),
    }
    rng = np.random.default_rng(0)
    encoders = {}
    for modality in sorted(config.model.encoders):

        def make(impl: str, modality=modality):
            model_config = config.model.copy_and_resolve_references()
            model_config.encoders = {modality: dict(config.model.encoders[modality].to_dict(), conv_impl=impl)}
            return build_model(model_config).encoders[modality]

        encoders[modality] = (make, rng.normal(size=shapes[modality]).astype(np.float32))
    return encoders


def run_encoders(
    impls: Sequence[str] = IMPLS_COMPARED, *, batch: int = 64, repeats: int = 20, warmup: int = 2
) -> dict[str, dict[str, dict[str, float]]]:
    """Forward and train-step (value_and_grad) times of each default encoder, per conv implementation."""
    return {
        modality: {
            impl: benchmark_module(make(impl), inputs, repeats=repeats, warmup=warmup, apply_kwargs={"train": False})
            for impl in impls
        }
        for modality, (make, inputs) in default_encoders(batch).items()
    }


def format_encoder_table(results: Results) -> str:
    """Encoders: forward and train-step ms, their ratio, speed-up of 'cpu' over 'xla'."""
    columns = [("fwd ms", "forward_ms"), ("step ms", "train_step_ms"), ("step/fwd", "ratio")]
    return _table(results, "encoder", columns, "train_step_ms")


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: print the table for :data:`DEFAULT_CASES`, optionally write JSON."""
    runtime.prepare_process(reexec=argv is None)  # The set-up every command runs with (mmjax.runtime).
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per function")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per function")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args(argv)

    print(
        f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} device(s); "
        f"medians of {args.repeats} calls"
    )
    if jax.device_count() > 1 and jax.default_backend() == "cpu":
        print("warning: several simulated CPU devices (XLA_FLAGS); timings are not representative")
    results = run(DEFAULT_CASES, repeats=args.repeats, warmup=args.warmup)
    print(format_table(results))
    print("\nEncoders of the default experiment (experiments.av_digits), batch 64:")
    encoders = run_encoders(repeats=args.repeats, warmup=args.warmup)
    print(format_encoder_table(encoders))
    if args.json:
        with open(args.json, "w") as f:
            record = {
                "jax_version": jax.__version__,
                "backend": jax.default_backend(),
                "device_count": jax.device_count(),
                "repeats": args.repeats,
                "results": results,
                "encoders": encoders,
            }
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
