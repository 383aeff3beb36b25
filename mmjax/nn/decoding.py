"""Autoregressive generation with a `Captioner` inside `jit`: greedy, beam search and sampling, with or without the
key/value cache.

`generate(model, variables, batch, config, rng)` encodes the conditioning modalities once, then extends the
text [BOS] one token at a time in a `lax.while_loop` that stops at `config.max_length` ids (prompt + text) or when
every example has produced [EOS] (later tokens are [PAD]). With `use_cache=True` the prefix (conditioning tokens
in prefix mode, prompt, [BOS]) is run once to fill each layer's key/value cache and every step then runs the
decoder on one token; without it every step reruns the decoder over the whole sequence. Both give the same tokens
(tested), the cache in O(L) instead of O(L^2) decoder work (`python -m mmjax.bench.decode`).

* greedy: the most likely next token;
* beam search: `beam_size` hypotheses, expanded by their summed log-probabilities; a finished hypothesis keeps
  its score and is padded; at the end each is ranked by score / lp(length) with GNMT's length penalty
  lp(n) = ((5 + n) / 6) ** `length_penalty` (Wu et al. 2016, "Google's Neural Machine Translation System");
  `beam_size=1` is greedy (tested);
* sampling: softmax(logits / `temperature`), restricted to the `top_k` most likely tokens (0 = all) and to the
  smallest set whose probability reaches `top_p` (nucleus sampling, Holtzman et al. 2020; 1 = all), drawn with
  `jax.random.fold_in(rng, position)`.

Everything is plain jnp over the global batch, so under `jit` with a batch sharded over the mesh the tokens are
the same on any number of devices (tested on 1 and 8). Bad requests fail in `check_decode`, before tracing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from mmjax.nn.models.captioner import PROMPT_KEY, Captioner

METHODS = ("greedy", "beam", "sample")


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """How to generate (`config.eval.captioning.decode` in experiments)."""

    max_length: int = 24  # Prompt + text ids, [BOS] and [EOS] included; at most the decoder's max_len.
    method: str = "greedy"  # greedy | beam | sample
    beam_size: int = 4
    length_penalty: float = 0.6  # GNMT's alpha (0 = rank by summed log-probability).
    temperature: float = 1.0
    top_k: int = 0  # 0 = no top-k filter.
    top_p: float = 1.0  # 1 = no nucleus filter.
    use_cache: bool = True
    bos_id: int = 2
    eos_id: int = 3
    pad_id: int = 0


def check_decode(model: Captioner, config: DecodeConfig, prompt_length: int = 0,
                 tokenizer_vocab_size: int | None = None) -> None:
    """Clear errors for requests that would otherwise fail inside XLA or generate garbage silently."""
    if config.method not in METHODS:
        raise ValueError(f"decode method {config.method!r} is unknown; valid: {', '.join(METHODS)}")
    if config.method == "beam" and (isinstance(config.beam_size, bool) or not isinstance(config.beam_size, int)
                                    or config.beam_size < 1):
        raise ValueError(f"decode beam_size={config.beam_size!r} must be an integer >= 1")
    if tokenizer_vocab_size is not None and tokenizer_vocab_size != model.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer_vocab_size} tokens but the decoder's vocab_size is "
                         f"{model.vocab_size} (config model.decoder.vocab_size): ids would not mean the same words")
    for name in ("bos_id", "eos_id", "pad_id"):
        value = getattr(config, name)
        if not 0 <= value < model.vocab_size:
            raise ValueError(f"decode {name}={value} is not a token of the decoder's vocabulary of {model.vocab_size}")
    if prompt_length + 1 >= model.max_len:
        raise ValueError(f"the prompt of {prompt_length} tokens is longer than the decoder's context allows: "
                         f"max_len={model.max_len} positions hold the prompt, [BOS] and at least one new token")
    if config.max_length <= prompt_length + 1:
        raise ValueError(f"decode max_length={config.max_length} must exceed the prompt ({prompt_length} tokens) "
                         "+ [BOS], or nothing is generated")
    if config.max_length > model.max_len:
        raise ValueError(f"decode max_length={config.max_length} exceeds the decoder's max_len={model.max_len} "
                         "(its learned positions)")
    if config.method == "sample":
        if not config.temperature > 0:
            raise ValueError(f"decode temperature={config.temperature} must be positive")
        if config.top_k < 0:
            raise ValueError(f"decode top_k={config.top_k} must be >= 0 (0 = off)")
        if not 0 < config.top_p <= 1:
            raise ValueError(f"decode top_p={config.top_p} must be in (0, 1]")


def filter_logits(logits: jax.Array, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """`[B, V]` logits scaled by 1 / temperature with the tokens outside the top-k / nucleus set at -inf."""
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # Probability of the more likely tokens.
        kept = jnp.where(before < top_p, ordered, jnp.inf)  # The nucleus (always its first token).
        threshold = jnp.min(kept, axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def length_penalty(lengths: jax.Array, alpha: float) -> jax.Array:
    """GNMT's lp(n) = ((5 + n) / 6) ** alpha (Wu et al. 2016)."""
    return ((5.0 + lengths.astype(jnp.float32)) / 6.0) ** alpha


class _Decoder:
    """The model's logits for the next token, by the cache or by rerunning the whole sequence."""

    def __init__(self, model: Captioner, variables, context, context_mask, key_valid, key_prefix, use_cache):
        self.model, self.variables, self.use_cache = model, variables, use_cache
        self.context, self.context_mask, self.key_valid, self.key_prefix = context, context_mask, key_valid, key_prefix

    def _apply(self, ids, start, cache=None, with_context=False):
        kwargs = dict(context=self.context, context_mask=self.context_mask, key_valid=self.key_valid,
                      key_prefix=self.key_prefix, with_context=with_context, method=Captioner.decode)
        if cache is None:
            return self.model.apply(self.variables, ids, start, **kwargs), None
        logits, updated = self.model.apply({**self.variables, "cache": cache}, ids, start, decode=True,
                                           mutable=["cache"], **kwargs)
        return logits, updated["cache"]

    def start(self, ids: jax.Array, first: int):
        """(logits for position first + 1, cache) after the known ids `[:, :first + 1]`."""
        if not self.use_cache:
            return self._apply(ids, 0, with_context=True)[0][:, first], None
        shapes = jax.eval_shape(lambda: self.model.apply(
            self.variables, ids, 0, self.context, self.context_mask, self.key_valid, self.key_prefix, decode=True,
            with_context=True, mutable=["cache"], method=Captioner.decode)[1]["cache"])
        cache = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        logits, cache = self._apply(ids[:, :first + 1], 0, cache, with_context=True)
        return logits[:, -1], cache

    def next(self, ids: jax.Array, position: jax.Array, cache):
        """(logits for position + 1, cache) once the token at `position` is known."""
        if not self.use_cache:
            logits = self._apply(ids, 0, with_context=True)[0]
            return jax.lax.dynamic_index_in_dim(logits, position, axis=1, keepdims=False), None
        token = jax.lax.dynamic_slice_in_dim(ids, position, 1, axis=1)
        logits, cache = self._apply(token, position, cache)
        return logits[:, 0], cache


def _prepare(model: Captioner, variables, batch: Mapping[str, jax.Array], config: DecodeConfig, repeat: int):
    """Conditioning tokens, the id buffer `[B * repeat, max_length]` (prompt, [BOS], padding) and key layout."""
    context, context_mask, _ = model.apply(variables, batch, method=Captioner.encode)
    b = context.shape[0]
    prompt = batch.get(PROMPT_KEY)
    prompt = jnp.zeros((b, 0), jnp.int32) if prompt is None else jnp.asarray(prompt, jnp.int32)
    p = prompt.shape[1]
    ids = jnp.full((b, config.max_length), config.pad_id, jnp.int32)
    ids = ids.at[:, :p].set(prompt).at[:, p].set(config.bos_id)
    key_valid, key_prefix = model.apply(variables, context_mask, prompt != config.pad_id, config.max_length - p,
                                        method=Captioner.sequence_layout)
    if repeat > 1:
        context, context_mask, ids, key_valid, key_prefix = (
            jnp.repeat(a, repeat, axis=0) for a in (context, context_mask, ids, key_valid, key_prefix))
    return _Decoder(model, variables, context, context_mask, key_valid, key_prefix, config.use_cache), ids, p


def generate(model: Captioner, variables, batch: Mapping[str, jax.Array], config: DecodeConfig,
             rng: jax.Array | None = None) -> dict[str, jax.Array]:
    """`tokens [B, max_length - P]` (the generated text ids, [BOS] first, [PAD] after [EOS]) and `score [B]`
    (summed log-probability; divided by the length penalty for beam search). Call `check_decode` first."""
    if config.method == "beam":
        return _beam_search(model, variables, batch, config)
    decoder, ids, p = _prepare(model, variables, batch, config, 1)
    b = ids.shape[0]
    rng = jax.random.PRNGKey(0) if rng is None else rng
    logits, cache = decoder.start(ids, p)

    def choose(logits, position):
        if config.method == "greedy":
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        filtered = filter_logits(logits, config.temperature, config.top_k, config.top_p)
        return jax.random.categorical(jax.random.fold_in(rng, position), filtered).astype(jnp.int32)

    def body(state):
        position, ids, done, score, logits, cache = state
        token = choose(logits, position)
        logprob = jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], axis=1)[:, 0]
        token = jnp.where(done, config.pad_id, token)
        score = score + jnp.where(done, 0.0, logprob)
        ids = jax.lax.dynamic_update_slice_in_dim(ids, token[:, None], position + 1, axis=1)
        done = done | (token == config.eos_id)
        logits, cache = decoder.next(ids, position + 1, cache)
        return position + 1, ids, done, score, logits, cache

    def cond(state):
        position, _, done, *_ = state
        return (position < config.max_length - 1) & ~jnp.all(done)

    state = (jnp.asarray(p, jnp.int32), ids, jnp.zeros((b,), bool), jnp.zeros((b,), jnp.float32), logits, cache)
    _, ids, _, score, _, _ = jax.lax.while_loop(cond, body, state)
    return {"tokens": ids[:, p:], "score": score}


def _beam_search(model: Captioner, variables, batch, config: DecodeConfig) -> dict[str, jax.Array]:
    k = config.beam_size
    decoder, ids, p = _prepare(model, variables, batch, config, k)
    bk, length = ids.shape
    b = bk // k
    logits, cache = decoder.start(ids, p)
    vocab = logits.shape[-1]
    pad_row = jnp.where(jnp.arange(vocab) == config.pad_id, 0.0, -jnp.inf)

    def body(state):
        position, ids, scores, done, lengths, logits, cache = state
        logprobs = jax.nn.log_softmax(logits).reshape(b, k, vocab)
        logprobs = jnp.where(done[..., None], pad_row, logprobs)  # A finished hypothesis only pads, at no cost.
        candidates = (scores[..., None] + logprobs).reshape(b, k * vocab)
        scores, flat = jax.lax.top_k(candidates, k)
        beam, token = flat // vocab, (flat % vocab).astype(jnp.int32)
        rows = (jnp.arange(b)[:, None] * k + beam).reshape(-1)
        ids = ids[rows]
        ids = jax.lax.dynamic_update_slice_in_dim(ids, token.reshape(-1, 1), position + 1, axis=1)
        was_done = jnp.take_along_axis(done, beam, axis=1)
        lengths = jnp.take_along_axis(lengths, beam, axis=1) + (~was_done)
        done = was_done | (token == config.eos_id)
        if cache is not None:
            cache = jax.tree_util.tree_map(lambda c: c[rows] if c.ndim else c, cache)
        logits, cache = decoder.next(ids, position + 1, cache)
        return position + 1, ids, scores, done, lengths, logits, cache

    def cond(state):
        position, _, _, done, *_ = state
        return (position < length - 1) & ~jnp.all(done)

    scores = jnp.tile(jnp.where(jnp.arange(k) == 0, 0.0, -jnp.inf)[None], (b, 1))  # One live beam at first.
    state = (jnp.asarray(p, jnp.int32), ids, scores, jnp.zeros((b, k), bool), jnp.zeros((b, k), jnp.int32),
             logits, cache)
    _, ids, scores, _, lengths, _, _ = jax.lax.while_loop(cond, body, state)
    normalised = scores / length_penalty(lengths, config.length_penalty)
    best = jnp.argmax(normalised, axis=1)
    ids = ids.reshape(b, k, length)[jnp.arange(b), best]
    return {"tokens": ids[:, p:], "score": normalised[jnp.arange(b), best]}


def jit_generate(model: Captioner, config: DecodeConfig, variables_sharding: Any = None,
                 batch_sharding: Any = None):
    """`generate` compiled for `(variables, batch, rng)`; with shardings, over the mesh like the eval step."""
    fn = lambda variables, batch, rng: generate(model, variables, batch, config, rng)  # noqa: E731
    if batch_sharding is None:
        return jax.jit(fn)
    return jax.jit(fn, in_shardings=(variables_sharding, batch_sharding, None), out_shardings=batch_sharding)
