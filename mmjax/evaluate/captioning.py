"""`captioning`: generate a caption for every example of a split and score it against the dataset's references.

Needs a `Captioner` model (`model.name: captioner`) and a dataset whose stored examples carry reference captions
(`RAW_SOURCES`): Shapes-Captions (4 per scene), or your own files built with a text column (`mmjax.data.files`:
the example's text, an image's caption or an audio clip's transcript, is its one reference). Generated ids are
read back into words with the dataset's own text tokenizer (`Dataset.inputs["text"]`, what encoded the targets;
its decoder rejoins word pieces), and references are compared as that tokenizer normalises them (e.g.
lowercased), the only form the decoder can write. Generation runs `mmjax.nn.decoding.generate` compiled over the
evaluation batches, which are sharded over every device like the eval step; the decode options are this
evaluator's fields (`config.eval.captioning`), checked against the model and the tokenizer when the run is set up
(before anything compiles). Metrics per split:

* `bleu4`: corpus BLEU-4 by sacrebleu (Post 2018; its default 13a tokenisation, 0-100) against every reference;
* `cider`: CIDEr-D by pycocoevalcap (Vedantam et al. 2015, the COCO caption evaluation code) over the split;
* `exact_match`: the generated text equals one of the references;
* only with a scene description (Shapes-Captions' `scene`; `JUDGED_DATASETS`), judged by the dataset's own
  caption parser (`shapes_captions.judge_caption`, regular expressions of the grammar, not the generator's
  templates): `grammatical`, `attributes_true` (every mentioned object, with its size, colour and shape, is in
  the scene), `caption_true` (moreover every stated relation holds) and `object_recall` (scene objects
  mentioned). Other datasets have no parser: these are not reported (a `checkpoint.best_metric` naming one is
  refused at set-up).

When the run has a workdir, the primary process writes every generated caption with its references, judgements
(Shapes) or manifest row (own files) to `WORKDIR/samples.jsonl` (the lines of the split evaluated last replace
that split's earlier ones) and, when the decoder reads images, the first `grid` images with their captions to
`WORKDIR/captions_<split>.png` (green: true of the scene on Shapes, equal to the reference on own files).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import jax
import numpy as np
from jax.experimental import multihost_utils

from mmjax.data import files, pipeline, shapes_captions
from mmjax.data.core import VALID_KEY, frame_mask_key, mask_key
from mmjax.data.tokenization import tokenizer_from
from mmjax.evaluate.evaluator import EVALUATORS, EvalContext, Evaluator
from mmjax.nn import decoding
from mmjax.nn.models.captioner import PROMPT_KEY, Captioner

SAMPLES_FILENAME = "samples.jsonl"
SPECIAL_TOKENS = ("[CLS]", "[SEP]", "[PAD]")  # BOS, EOS, padding of the wordpiece / word-level tokenizers.
# Datasets with reference captions: name -> raw_source(data_config, split), whose examples hold `captions` (list of
# str) and, where the dataset has them, `image` (uint8 [H, W, 3]) and `scene` (for the caption parser).
RAW_SOURCES = {"shapes_captions": shapes_captions.raw_source, "files": files.raw_source}
JUDGED_DATASETS = ("shapes_captions",)  # Those whose captions the scene parser judges.
JUDGED_METRICS = ("grammatical", "attributes_true", "caption_true", "object_recall")


def bleu4(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """sacrebleu's corpus BLEU-4 (0-100) of hypotheses against their references (the same number for each)."""
    import sacrebleu

    if len({len(r) for r in references}) != 1:
        raise ValueError("bleu4: every example needs the same number of references")
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(s) for s in zip(*references)]).score)


def cider(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """pycocoevalcap's CIDEr-D of whitespace-tokenised, lowercase captions (document frequencies from the split)."""
    from pycocoevalcap.cider.cider import Cider

    gts = {i: [" ".join(r.lower().split()) for r in refs] for i, refs in enumerate(references)}
    res = {i: [" ".join(h.lower().split())] for i, h in enumerate(hypotheses)}
    return float(Cider().compute_score(gts, res)[0])


def source_order(total: int, global_batch_size: int) -> np.ndarray:
    """The source index of every row `pipeline.eval_batches` yields, gathered over processes batch by batch
    (-1 for padding rows): process p reads the contiguous rows [p * ceil(total / P), ...)."""
    processes = jax.process_count()
    local = global_batch_size // processes
    per_process = math.ceil(total / processes)
    num_batches = math.ceil(per_process / local)
    order = []
    for k in range(num_batches):
        for p in range(processes):
            start, stop = min(total, p * per_process), min(total, (p + 1) * per_process)
            rows = start + k * local + np.arange(local)
            order.append(np.where(rows < stop, rows, -1))
    return np.concatenate(order)


def _text_input(context: EvalContext):
    """The dataset's text input (`Dataset.inputs["text"]`): its tokenizer encoded the decoder's targets."""
    text = context.dataset.inputs.get("text")
    if text is None or text.tokenizer_source() is None:
        raise ValueError(f"dataset {context.dataset.name!r} declares no text tokenizer (Dataset.inputs['text']) to "
                         "read generated ids back into words")
    return text


def _tokenizer(context: EvalContext):
    return tokenizer_from(_text_input(context).tokenizer_source())


def _text(tokenizer, ids: np.ndarray, eos: int, specials: set[int]) -> str:
    """The words of generated ids ([BOS] first), up to the first [EOS]: joined by the tokenizer's decoder (word
    pieces rejoined, e.g. WordPiece's `##`), or by spaces for a tokenizer without one (word-level)."""
    ids = [int(i) for i in ids[1:]]
    if eos in ids:
        ids = ids[:ids.index(eos)]
    tokens = [tokenizer.id_to_token(i) for i in ids if i not in specials]
    return tokenizer.decoder.decode(tokens) if tokenizer.decoder is not None else " ".join(tokens)


def reference_text(tokenizer, text: str) -> str:
    """A reference as the decoder can write it: the tokenizer's normaliser applied (e.g. NFKC + lowercase), runs
    of whitespace made one space. Shapes-Captions' references are already in that form."""
    if tokenizer.normalizer is not None:
        text = tokenizer.normalizer.normalize_str(text)
    return " ".join(text.split())


_COMPILED: dict[tuple, tuple[Any, Any]] = {}
_SOURCES: dict[tuple, Any] = {}


def _raw_source(context: EvalContext, split: str):
    """The split's stored examples (references; images, scenes where the dataset has them), opened once per
    dataset, data dir and split."""
    key = (context.dataset.name, context.config.data.get("data_dir") or "", split)
    if key not in _SOURCES:
        _SOURCES[key] = RAW_SOURCES[context.dataset.name](context.config.data, split)
    return _SOURCES[key]


def compiled_fn(context: EvalContext, key: Any, build):
    """`build()` (a jitted function) made once per run and `key`. The cache holds the run weakly: a finished
    variant's set-up (and its in-memory data) is not kept alive."""
    for stale in [k for k, (ref, _) in _COMPILED.items() if ref() is None]:
        del _COMPILED[stale]
    full = (id(context), key)
    if full not in _COMPILED or _COMPILED[full][0]() is not context:
        _COMPILED[full] = (weakref.ref(context), build())
    return _COMPILED[full][1]


def generate_fn(context: EvalContext, config: decoding.DecodeConfig):
    """`generate` compiled once per run and decode config (its shardings follow the arrays it is given)."""
    return compiled_fn(context, config, lambda: decoding.jit_generate(context.model, config))


def generate_split(context: EvalContext, state: Any, split: str, fn, total: int, seed: int = 0,
                   inputs: Sequence[str] | None = None) -> np.ndarray:
    """Generated ids `[total, length]` for every example of `split`, in source order: `fn(variables, batch, rng)
    -> {"tokens": ...}` over the evaluation batches (the batch keys `inputs`, by default a `Captioner`'s:
    conditioning modalities, their masks and frame masks, `prompt`) sharded over the mesh, gathered from every
    process."""
    if inputs is None:
        condition = context.model.condition
        inputs = [*condition, *(mask_key(m) for m in condition), *(frame_mask_key(m) for m in condition), PROMPT_KEY]
    variables = {"params": state.params, **state.model_state}
    rng = jax.random.PRNGKey(seed)
    global_batch = context.config.data.eval_batch_size
    tokens, valid = [], []
    for batch in pipeline.eval_batches(context.dataset, split, global_batch_size=global_batch):
        present = {k: batch[k] for k in inputs if k in batch}
        sharded = pipeline.to_global({**present, VALID_KEY: batch[VALID_KEY]}, context.batch_sharding)
        valid_rows = sharded.pop(VALID_KEY)
        result = fn(variables, sharded, rng)
        gathered = multihost_utils.process_allgather({"tokens": result["tokens"], "valid": valid_rows}, tiled=True)
        tokens.append(np.asarray(gathered["tokens"]))
        valid.append(np.asarray(gathered["valid"]))
    tokens, valid = np.concatenate(tokens), np.concatenate(valid).astype(bool)
    order = source_order(total, global_batch)
    if not np.array_equal(order >= 0, valid):
        raise RuntimeError("evaluation rows do not follow the expected source order")
    generated = np.empty((total, tokens.shape[1]), tokens.dtype)
    generated[order[valid]] = tokens[valid]
    return generated


def special_ids(tokenizer) -> tuple[int, int, int]:
    """([BOS], [EOS], [PAD]) ids of a wordpiece / word-level tokenizer."""
    ids = tuple(tokenizer.token_to_id(t) for t in SPECIAL_TOKENS)
    if None in ids:
        raise ValueError(f"the tokenizer has no {SPECIAL_TOKENS} (begin, end, padding) tokens")
    return ids


def decode_text(tokenizer, ids: np.ndarray, config: decoding.DecodeConfig) -> str:
    """The words of generated ids ([BOS] first), up to the first [EOS]."""
    return _text(tokenizer, ids, config.eos_id, {config.bos_id, config.eos_id, config.pad_id})


@EVALUATORS.register("captioning")
@dataclasses.dataclass(frozen=True)
class Captioning(Evaluator):
    """Generated captions scored by BLEU-4, CIDEr, exact match and, on Shapes, the scene parser (module
    docstring)."""

    method: str = "greedy"  # greedy | beam | sample (mmjax.nn.decoding)
    beam_size: int = 4
    length_penalty: float = 0.6
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_length: int = 0  # Text ids including [BOS] / [EOS]; 0 = the dataset's text length (data.max_len).
    use_cache: bool = True
    seed: int = 0  # Sampling only.
    grid: int = 16  # Images with their generated captions in captions_<split>.png (0 = none).

    uses_outputs: ClassVar[bool] = False

    @classmethod
    def unsupported(cls, context: EvalContext) -> str | None:
        if not isinstance(context.model, Captioner):
            return f"model {type(context.model).__name__} has no text decoder (model.name='captioner')"
        name = context.dataset.name
        if name not in RAW_SOURCES or "text" not in context.dataset.modalities:
            return (f"dataset {name!r} has no reference captions it knows (Shapes-Captions, or own files built "
                    "with a text column: python -m mmjax.data.build, README \"Your own data\")")
        _check_best_metric(context)
        options = dict((context.config.get("eval") or {}).get("captioning") or {})
        evaluator = cls(**{k: v for k, v in options.items() if k in {f.name for f in dataclasses.fields(cls)}})
        try:
            decoding.check_decode(context.model, evaluator.decode_config(context),
                                  tokenizer_vocab_size=_tokenizer(context).get_vocab_size())
        except ValueError as error:
            raise ValueError(f"config eval.captioning: {error}") from None
        return None

    def decode_config(self, context: EvalContext) -> decoding.DecodeConfig:
        bos, eos, pad = special_ids(_tokenizer(context))
        max_length = self.max_length or int(_text_input(context).context_length() or shapes_captions.MAX_LEN)
        return decoding.DecodeConfig(max_length=max_length, method=self.method, beam_size=self.beam_size,
                                     length_penalty=self.length_penalty, temperature=self.temperature,
                                     top_k=self.top_k, top_p=self.top_p, use_cache=self.use_cache, bos_id=bos,
                                     eos_id=eos, pad_id=pad)

    def __call__(self, context: EvalContext, state: Any, split: str, outputs: Mapping[str, np.ndarray] | None,
                 batches: Iterable[Mapping[str, np.ndarray]] | None = None) -> dict:
        del outputs, batches  # It reads the split itself, in source order, to align captions with references.
        config = self.decode_config(context)
        source = _raw_source(context, split)
        generated = generate_split(context, state, split, generate_fn(context, config), len(source), self.seed)
        return self._score(context, split, source, generated, config)

    def _score(self, context, split, source, generated: np.ndarray, config: decoding.DecodeConfig) -> dict:
        tokenizer = _tokenizer(context)
        specials = {config.bos_id, config.eos_id, config.pad_id}
        hypotheses = [_text(tokenizer, row, config.eos_id, specials) for row in generated]
        examples = [source[i] for i in range(len(source))]
        references = [[reference_text(tokenizer, r) for r in e["captions"]] for e in examples]
        exact = [h in refs for h, refs in zip(hypotheses, references)]
        metrics = {
            "bleu4": bleu4(hypotheses, references),
            "cider": cider(hypotheses, references),
            "exact_match": float(np.mean(exact)),
        }
        judging = context.dataset.name in JUDGED_DATASETS
        judged = [{} for _ in examples]
        if judging:
            judged = [shapes_captions.judge_caption(h, shapes_captions.scene_objects(e["scene"]))
                      for h, e in zip(hypotheses, examples)]
            metrics.update({
                "grammatical": float(np.mean([j["grammatical"] for j in judged])),
                "attributes_true": float(np.mean([j["attributes_true"] for j in judged])),
                "caption_true": float(np.mean([j["true"] for j in judged])),
                "object_recall": float(np.mean([j["object_recall"] for j in judged])),
            })
        workdir = getattr(context, "workdir", None)
        if workdir and jax.process_index() == 0:
            rows = [{"split": split, "index": i, "generated": h, "references": refs, "exact_match": bool(x),
                     **{k: (bool(v) if isinstance(v, bool) else float(v)) for k, v in j.items()},
                     **({"row": e["row"]} if "row" in e else {})}
                    for i, (h, refs, x, j, e) in enumerate(zip(hypotheses, references, exact, judged, examples))]
            write_samples(os.path.join(workdir, SAMPLES_FILENAME), split, rows)
            shown = min(self.grid, len(examples))
            if shown and "image" in examples[0] and "image" in context.model.condition:  # Pictures it captioned.
                good, meaning = (([j["true"] for j in judged], "true of the scene") if judging
                                 else (exact, "equal to the reference"))
                plot_grid([examples[i]["image"] for i in range(shown)], hypotheses[:shown], good[:shown],
                          os.path.join(workdir, f"captions_{split}.png"),
                          f"{split}: generated captions (green: {meaning})")
        return metrics


def _check_best_metric(context: EvalContext) -> None:
    """A best checkpoint chosen by a parser metric (e.g. shapes_caption's `validation/caption_true`) on a dataset
    without the parser would fail at the first evaluation: refused at set-up, naming what is reported."""
    best = str((context.config.get("checkpoint") or {}).get("best_metric") or "")
    split, _, metric = best.partition("/")
    if metric in JUDGED_METRICS and context.dataset.name not in JUDGED_DATASETS:
        raise ValueError(f"config checkpoint.best_metric={best!r}: the captioning evaluator reports {metric!r} only "
                         f"on {', '.join(JUDGED_DATASETS)} (its caption parser); on dataset {context.dataset.name!r} "
                         f"it reports bleu4, cider and exact_match, e.g. --config.checkpoint.best_metric={split}/cider")


def write_samples(path: str, split: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """Replaces `split`'s lines of the JSON-lines file at `path` by `rows` (other splits' lines are kept)."""
    kept = []
    if os.path.exists(path):
        with open(path) as f:
            kept = [line for line in f if line.strip() and json.loads(line).get("split") != split]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
        f.writelines(json.dumps(row) + "\n" for row in rows)
    os.replace(tmp, path)


def plot_grid(images: Sequence[np.ndarray], captions: Sequence[str], correct: Sequence[bool], path: str,
              title: str) -> None:
    """A grid of images, each with its (wrapped) generated caption, green when `correct`, red if not."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(4, len(images))
    rows = math.ceil(len(images) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.6 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, caption, ok in zip(axes.ravel(), images, captions, correct):
        ax.imshow(np.asarray(image, np.uint8), interpolation="nearest")
        ax.set_title(textwrap.fill(caption or "(empty)", 30), fontsize=8, color="green" if ok else "red")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
