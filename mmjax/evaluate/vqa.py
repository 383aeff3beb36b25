"""`vqa`: answer every question of a split by generation and report exact-match accuracy, overall and per type.

Needs a `Captioner` that reads the batch's `prompt` (`model.decoder.use_prompt`; e.g. a prefix-LM) and the
Shapes-VQA dataset. Answers are generated like captions (`captioning.generate_split`, decode options in
`config.eval.vqa`, checked at set-up against the model, the tokenizer and the question length) and compared,
as words, with the answer computed from the scene graph: `accuracy` and `accuracy_<type>` for each of
`shapes_vqa.QUESTION_TYPES`. With a workdir, every question, answer and generated answer goes to
`WORKDIR/samples.jsonl` (the split's lines replaced).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import jax
import numpy as np

from mmjax.data import shapes_vqa
from mmjax.evaluate.captioning import (
    SAMPLES_FILENAME,
    decode_text,
    generate_fn,
    generate_split,
    special_ids,
    write_samples,
)
from mmjax.evaluate.evaluator import EVALUATORS, EvalContext, Evaluator
from mmjax.nn import decoding
from mmjax.nn.models.captioner import Captioner

_SOURCES: dict[tuple[str, str], Any] = {}  # (data dir, split) -> the stored scenes with their questions.


@EVALUATORS.register("vqa")
@dataclasses.dataclass(frozen=True)
class Vqa(Evaluator):
    """Exact-match answer accuracy per question type (module docstring)."""

    method: str = "greedy"
    beam_size: int = 4
    length_penalty: float = 0.6
    use_cache: bool = True

    uses_outputs: ClassVar[bool] = False

    @classmethod
    def unsupported(cls, context: EvalContext) -> str | None:
        if not isinstance(context.model, Captioner) or not context.model.use_prompt:
            return "the model has no text decoder reading the question (model.decoder.use_prompt=True)"
        if context.dataset.name != "shapes_vqa":
            return f"dataset {context.dataset.name!r} has no questions and answers it knows"
        options = dict((context.config.get("eval") or {}).get("vqa") or {})
        evaluator = cls(**{k: v for k, v in options.items() if k in {f.name for f in dataclasses.fields(cls)}})
        try:
            decoding.check_decode(context.model, evaluator.decode_config(context), shapes_vqa.MAX_QUESTION_LEN,
                                  tokenizer_vocab_size=shapes_vqa.build_tokenizer().get_vocab_size())
        except ValueError as error:
            raise ValueError(f"config eval.vqa: {error}") from None
        return None

    def decode_config(self, context: EvalContext) -> decoding.DecodeConfig:
        bos, eos, pad = special_ids(shapes_vqa.build_tokenizer())
        return decoding.DecodeConfig(max_length=shapes_vqa.MAX_QUESTION_LEN + shapes_vqa.MAX_ANSWER_LEN,
                                     method=self.method, beam_size=self.beam_size,
                                     length_penalty=self.length_penalty, use_cache=self.use_cache, bos_id=bos,
                                     eos_id=eos, pad_id=pad)

    def __call__(self, context: EvalContext, state: Any, split: str, outputs: Mapping[str, np.ndarray] | None,
                 batches: Iterable[Mapping[str, np.ndarray]] | None = None) -> dict:
        del outputs, batches  # It reads the split itself, in source order.
        config = self.decode_config(context)
        key = (context.config.data.get("data_dir") or "", split)
        if key not in _SOURCES:
            _SOURCES[key] = shapes_vqa.raw_source(context.config.data, split)
        source = _SOURCES[key]
        generated = generate_split(context, state, split, generate_fn(context, config), len(source))
        tokenizer = shapes_vqa.build_tokenizer()
        rows = []
        for i in range(len(source)):
            qs = source[i]["questions"]
            kind, question, answer = qs[i % len(qs)]  # The question the evaluation batch asked.
            predicted = decode_text(tokenizer, generated[i], config)
            rows.append({"split": split, "index": i, "type": kind, "question": question, "answer": answer,
                         "generated": predicted, "correct": predicted == answer})
        metrics = {"accuracy": float(np.mean([r["correct"] for r in rows]))}
        for kind in shapes_vqa.QUESTION_TYPES:
            asked = [r["correct"] for r in rows if r["type"] == kind]
            if asked:
                metrics[f"accuracy_{kind}"] = float(np.mean(asked))
        workdir = getattr(context, "workdir", None)
        if workdir and jax.process_index() == 0:
            write_samples(os.path.join(workdir, SAMPLES_FILENAME), split, rows)
        return metrics
