"""Decode benchmark: generated tokens/s of a `Captioner` with and without the key/value cache.

    python -m mmjax.bench.decode [--mode cross|prefix] [--method greedy|beam|sample] [--batch 32] [--length 64]
        [--width 256] [--depth 4] [--heads 4] [--repeats 3] [--json PATH]

Builds a captioner over a ViT (32x32 images, 16 tokens), initialises it at random, compiles `generate` both ways
and times `--repeats` runs of each on the same batch (median). Both produce the same tokens (checked here, and in
tests/nn/test_captioner.py); without the cache every step reruns the decoder over the whole sequence, so the
cache's advantage grows with `--length`. Compile time is reported separately and not counted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np

from mmjax import runtime
from mmjax.nn import decoding
from mmjax.nn.builder import build_model


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("cross", "prefix"), default="cross")
    parser.add_argument("--method", choices=decoding.METHODS, default="greedy")
    parser.add_argument("--beam_size", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=64, help="max_length: [BOS] + generated tokens")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default="", help="also write the results here")
    return parser.parse_args(argv)


def _generated(tokens: np.ndarray, eos: int) -> int:
    """Tokens each row generated after [BOS]: up to and including its first [EOS], else all of them."""
    ends = [np.flatnonzero(row[1:] == eos) for row in tokens]
    return int(sum(e[0] + 1 if len(e) else tokens.shape[1] - 1 for e in ends))


def run(args: argparse.Namespace) -> dict:
    """Compile and time generation with and without the cache; returns the figures printed by `main`."""
    config = ml_collections.ConfigDict(dict(
        name="captioner", num_classes=1,
        encoders=dict(image=dict(name="vit", patch_size=8, width=args.width, depth=2, num_heads=args.heads,
                                 mlp_dim=2 * args.width)),
        decoder=dict(mode=args.mode, vocab_size=args.vocab, max_len=args.length, width=args.width,
                     depth=args.depth, num_heads=args.heads)))
    model = build_model(config)
    images = np.random.default_rng(0).normal(size=(args.batch, 32, 32, 3)).astype(np.float32)
    text = np.zeros((1, 2), np.int32)
    variables = jax.jit(lambda rng: model.init(rng, {"image": images[:1], "text": text}, train=False))(
        jax.random.PRNGKey(0))
    # [EOS] = a token that the random decoder never prefers: every row runs to max_length, as a long caption does.
    eos = args.vocab - 1
    variables["params"]["token_embedding"]["embedding"] = variables["params"]["token_embedding"]["embedding"].at[
        eos].set(0.0)
    batch = {"image": images}
    results: dict = {"device": str(jax.devices()[0].device_kind), "batch": args.batch, "length": args.length,
                     "mode": args.mode, "method": args.method}
    tokens = {}
    for use_cache in (True, False):
        decode_config = decoding.DecodeConfig(max_length=args.length, method=args.method, beam_size=args.beam_size,
                                              use_cache=use_cache, eos_id=eos)
        decoding.check_decode(model, decode_config)
        start = time.perf_counter()
        compiled = decoding.jit_generate(model, decode_config).lower(variables, batch, jax.random.PRNGKey(0)).compile()
        compile_s = time.perf_counter() - start
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = jax.block_until_ready(compiled(variables, batch, jax.random.PRNGKey(0)))
            times.append(time.perf_counter() - start)
        generated = _generated(np.asarray(out["tokens"]), eos)
        name = "cache" if use_cache else "no_cache"
        tokens[name] = np.asarray(out["tokens"])
        seconds = statistics.median(times)
        results[name] = {"seconds": seconds, "tokens": generated, "tokens_per_s": generated / seconds,
                         "compile_s": compile_s}
    results["same_tokens"] = bool(np.array_equal(tokens["cache"], tokens["no_cache"]))
    results["speedup"] = results["cache"]["tokens_per_s"] / results["no_cache"]["tokens_per_s"]
    return results


def main(argv: Sequence[str] | None = None) -> dict:
    runtime.prepare_process(reexec=argv is None)  # The set-up every command runs with (mmjax.runtime).
    args = _arguments(argv)
    results = run(args)
    print(f"decode benchmark on {results['device']}: {args.mode} decoder (width {args.width}, depth {args.depth}), "
          f"{args.method}, batch {args.batch}, {args.length} positions")
    print("| decoding | tokens/s | seconds | tokens | compile s |")
    print("|---|---|---|---|---|")
    for name in ("cache", "no_cache"):
        r = results[name]
        print(f"| {name.replace('_', ' ')} | {r['tokens_per_s']:.0f} | {r['seconds']:.3f} | {r['tokens']} | "
              f"{r['compile_s']:.1f} |")
    print(f"key/value cache speed-up: {results['speedup']:.2f}x; same tokens: {results['same_tokens']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if not results["same_tokens"]:
        sys.exit("cached and uncached decoding produced different tokens")
    return results


if __name__ == "__main__":
    main()
