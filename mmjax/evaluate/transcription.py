"""`transcription`: transcribe every utterance of a split and score it against the reference transcript.

Models: a CTC head (`model.name: ctc`, `mmjax.nn.models.ctc_head`: best-path decoding, the most likely symbol of each
frame with repeats merged and blanks dropped) or a text decoder reading the audio (`model.name: captioner`:
generation as the `captioning` evaluator runs it, greedy, beam or sampling, with the key/value cache). Both go
through the captioning evaluator's plumbing (`captioning.generate_split`: the evaluation batches sharded over the
mesh, gathered from every process, put back in source order). Datasets: Spoken-Numbers (its transcripts and
word-level tokenizer), or your own audio + transcript files (`files`, built with `python -m mmjax.data.build`: the
build's tokenizer, whose decoder rejoins word pieces; each stored transcript is the reference, normalised as that
tokenizer normalises it, e.g. lowercase, as the captioning evaluator does for own captions). The decode options
are this evaluator's fields (`config.eval.transcription`), checked with the model and the tokenizer (its size, and
that a CTC head strips its [CLS] / [SEP] / [PAD] from the targets) when the run is set up, before anything
compiles.

Metrics per split (words are whitespace-separated tokens of the lowercase transcripts):

* `wer`: word error rate by jiwer over the split, (S + D + I) / N: the substitutions, deletions and insertions of
  the minimum-edit (Levenshtein) word alignment of each hypothesis with its reference, summed over the split, over
  the N reference words (a corpus rate, not a mean of per-utterance rates); it can exceed 1;
* `sequence_accuracy`: the hypothesis equals the reference exactly (every digit, in order, none extra);
* `length_accuracy`: the hypothesis has as many words as the reference (the digit count is right).

With a workdir, the primary process writes each utterance's `reference`, `hypothesis`, `correct` and `speaker`
(Spoken-Numbers) or manifest `row` (own files) to `WORKDIR/samples.jsonl` (the lines of the split evaluated last
replace that split's earlier ones).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import jax
import numpy as np

from mmjax.data import files, spoken_numbers
from mmjax.data.core import frame_mask_key, mask_key
from mmjax.data.tokenization import tokenizer_from
from mmjax.evaluate.captioning import (
    SAMPLES_FILENAME,
    compiled_fn,
    decode_text,
    generate_fn,
    generate_split,
    reference_text,
    special_ids,
    write_samples,
)
from mmjax.evaluate.evaluator import EVALUATORS, EvalContext, Evaluator
from mmjax.nn import decoding
from mmjax.nn.models.captioner import Captioner
from mmjax.nn.models.ctc_head import CtcModel, jit_greedy

_SOURCES: dict[tuple[str, str, str], Any] = {}  # (dataset, data dir, split) -> the stored transcripts.


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """jiwer's corpus word error rate (S + D + I) / N of hypotheses against their references."""
    import jiwer

    return float(jiwer.process_words(list(references), list(hypotheses)).wer)


def sequence_accuracy(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """The share of hypotheses whose words are exactly the reference's."""
    return float(np.mean([r.split() == h.split() for r, h in zip(references, hypotheses, strict=True)]))


def ctc_text(tokenizer, ids: np.ndarray, specials: set[int]) -> str:
    """The words of best-path CTC label ids (-1 = after the end); special tokens are not words. Joined by the
    tokenizer's decoder (word pieces rejoined, e.g. WordPiece's `##`), or by spaces (word-level)."""
    tokens = [tokenizer.id_to_token(int(i)) for i in ids if i >= 0 and int(i) not in specials]
    return tokenizer.decoder.decode(tokens) if tokenizer.decoder is not None else " ".join(tokens)


DATASETS = ("spoken_numbers", "files")


def dataset_tokenizer(context: EvalContext):
    """The tokenizer that encoded the dataset's transcripts: Spoken-Numbers' word-level one, or an own-files
    build's (`Dataset.inputs["text"]`)."""
    if context.dataset.name == "spoken_numbers":
        return spoken_numbers.tokenizer()
    return tokenizer_from(context.dataset.inputs["text"].tokenizer_source())


def _references(context: EvalContext, split: str) -> tuple[list[str], list[dict]]:
    """Each utterance's reference transcript, in source order, and what its samples.jsonl line names it by
    (`speaker` on Spoken-Numbers, the manifest `row` on own files)."""
    key = (context.dataset.name, context.config.data.get("data_dir") or "", split)
    if key not in _SOURCES:
        raw = spoken_numbers.raw_source if context.dataset.name == "spoken_numbers" else files.raw_source
        _SOURCES[key] = raw(context.config.data, split)
    source = _SOURCES[key]
    examples = [source[i] for i in range(len(source))]
    if context.dataset.name == "spoken_numbers":
        return [e["transcript"] for e in examples], [{"speaker": e["speaker"]} for e in examples]
    tokenizer = dataset_tokenizer(context)
    return [reference_text(tokenizer, e["captions"][0]) for e in examples], [{"row": e["row"]} for e in examples]


@EVALUATORS.register("transcription")
@dataclasses.dataclass(frozen=True)
class Transcription(Evaluator):
    """Word error rate and sequence accuracy of transcripts from a CTC head or a text decoder (module docstring)."""

    method: str = "greedy"  # Text decoder: greedy | beam | sample (mmjax.nn.decoding); CTC: greedy (best path).
    beam_size: int = 4
    length_penalty: float = 0.6
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_length: int = 0  # Text decoder: ids including [BOS] / [EOS]; 0 = data.max_len.
    use_cache: bool = True
    seed: int = 0  # Sampling only.

    uses_outputs: ClassVar[bool] = False

    @classmethod
    def unsupported(cls, context: EvalContext) -> str | None:
        model = context.model
        if not isinstance(model, (CtcModel, Captioner)):
            return (f"model {type(model).__name__} neither has a CTC head (model.name='ctc') nor a text decoder "
                    "(model.name='captioner')")
        name = context.dataset.name
        if name not in DATASETS or "text" not in context.dataset.modalities:
            return (f"dataset {name!r} has no reference transcripts it knows (Spoken-Numbers, or own audio files "
                    "built with a text column: python -m mmjax.data.build, README \"Your own data\")")
        options = dict((context.config.get("eval") or {}).get("transcription") or {})
        evaluator = cls(**{k: v for k, v in options.items() if k in {f.name for f in dataclasses.fields(cls)}})
        tokenizer = dataset_tokenizer(context)
        vocabulary = tokenizer.get_vocab_size()
        if isinstance(model, CtcModel):
            if evaluator.method != "greedy":
                raise ValueError(f"config eval.transcription.method={evaluator.method!r}: a CTC head decodes by best "
                                 "path only; use 'greedy'")
            if vocabulary != model.vocab_size:
                raise ValueError(f"config eval.transcription: the tokenizer of dataset {name!r} has {vocabulary} "
                                 f"tokens but the CTC head's vocab_size is {model.vocab_size} (config "
                                 "model.ctc.vocab_size): ids would not mean the same words; set "
                                 f"--config.model.ctc.vocab_size={vocabulary}")
            specials = sorted(set(special_ids(tokenizer)) - set(model.strip_ids))
            if specials:
                raise ValueError(f"config model.ctc.strip_ids={tuple(model.strip_ids)} keeps the tokenizer's special "
                                 f"id(s) {specials} ([CLS], [SEP], [PAD]) as CTC targets; include them")
            return None
        try:
            decoding.check_decode(model, evaluator.decode_config(context), tokenizer_vocab_size=vocabulary)
        except ValueError as error:
            raise ValueError(f"config eval.transcription: {error}") from None
        return None

    def decode_config(self, context: EvalContext) -> decoding.DecodeConfig:
        bos, eos, pad = special_ids(dataset_tokenizer(context))
        text = context.dataset.inputs.get("text")  # Own files: the build's text chain knows its length.
        length = text.context_length() if text is not None else None
        max_length = self.max_length or int(length or context.config.data.get("max_len", spoken_numbers.MAX_LEN))
        return decoding.DecodeConfig(max_length=max_length, method=self.method, beam_size=self.beam_size,
                                     length_penalty=self.length_penalty, temperature=self.temperature,
                                     top_k=self.top_k, top_p=self.top_p, use_cache=self.use_cache, bos_id=bos,
                                     eos_id=eos, pad_id=pad)

    def transcribe(self, context: EvalContext, state: Any, split: str, total: int) -> list[str]:
        """The model's transcript of every example of `split`, in source order."""
        tokenizer = dataset_tokenizer(context)
        config = self.decode_config(context)
        model = context.model
        if isinstance(model, CtcModel):
            m = model.modality
            fn = compiled_fn(context, "ctc_greedy", lambda: jit_greedy(model))
            ids = generate_split(context, state, split, fn, total, inputs=[m, mask_key(m), frame_mask_key(m)])
            specials = {config.bos_id, config.eos_id, config.pad_id}
            return [ctc_text(tokenizer, row, specials) for row in ids]
        ids = generate_split(context, state, split, generate_fn(context, config), total, self.seed)
        return [decode_text(tokenizer, row, config) for row in ids]

    def __call__(self, context: EvalContext, state: Any, split: str, outputs: Mapping[str, np.ndarray] | None,
                 batches: Iterable[Mapping[str, np.ndarray]] | None = None) -> dict:
        del outputs, batches  # It reads the split itself, in source order, to align transcripts with references.
        references, names = _references(context, split)
        hypotheses = self.transcribe(context, state, split, len(references))
        metrics = {"wer": word_error_rate(references, hypotheses),
                   "sequence_accuracy": sequence_accuracy(references, hypotheses),
                   "length_accuracy": float(np.mean([len(r.split()) == len(h.split())
                                                     for r, h in zip(references, hypotheses)]))}
        workdir = getattr(context, "workdir", None)
        if workdir and jax.process_index() == 0:
            rows = [{"split": split, "index": i, "reference": r, "hypothesis": h, "correct": r.split() == h.split(),
                     **n} for i, (r, h, n) in enumerate(zip(references, hypotheses, names))]
            write_samples(os.path.join(workdir, SAMPLES_FILENAME), split, rows)
        return metrics
