"""Shapes-VQA: visual question answering on the Shapes-Captions scenes, questions generated from each scene graph.

The images and scenes are Shapes-Captions' (same build, same splits: `test` holds colour-shape pairs never seen in
training). Every scene gets one question of each type (:func:`questions`, seeded by the split and the example's
index, so they never change), answered from the scene JSON:

* `colour`: "what colour is the biggest object ?" -> the colour of the scene's subject (its one large object, or
  its only object);
* `count`: "how many <shape>s are there ?" (a shape drawn at random, present or not) -> "zero" ... "three";
* `relation`: "is the <colour> <shape> <relation> the <colour> <shape> ?" for two of its objects (one-object
  scenes: a count question instead) -> "yes" / "no" (grid relations, as the captions').

Batches (:func:`dataset`, `config.data.name = "shapes_vqa"`): `image` float32 [S, S, 3] in [-1, 1]; `prompt`
int32 [MAX_QUESTION_LEN] (the question, [CLS] ... [SEP]); `text` int32 [MAX_ANSWER_LEN] ([CLS] answer [SEP]);
`label` int32, the question type (:data:`QUESTION_TYPES` order). Evaluation asks the question of type
`index % 3`; training draws one of the three per example and epoch (`augment`). The tokenizer (:func:`build_tokenizer`)
is word-level over the captions' words and the questions' and answers' words, [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np
from tokenizers import Tokenizer

from mmjax.data import shapes_captions as sc
from mmjax.data.core import Dataset, build_on_process_zero
from mmjax.data.tfds_builder import split_sizes
from mmjax.data.tokenization import encode_texts, word_level_tokenizer
from mmjax.registry import DATASETS

QUESTION_TYPES = ("colour", "count", "relation")
NUMBERS = ("zero", "one", "two", "three")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses",
           "diamond": "diamonds"}
MAX_QUESTION_LEN = 16  # [CLS] + at most 13 words + [SEP].
MAX_ANSWER_LEN = 3  # [CLS] answer [SEP].
_STREAM_QUESTIONS = 7  # A random stream of its own (Shapes-Captions uses 0 and 1).


def questions(objects: tuple[sc.SceneObject, ...], split: str, index: int) -> list[tuple[str, str, str]]:
    """`(type, question, answer)` for each of QUESTION_TYPES (seeded by split and index)."""
    rng = np.random.default_rng((sc.SEED, _STREAM_QUESTIONS, sc.SPLITS.index(split), index))
    subject = objects[0]
    result = [("colour", "what colour is the biggest object ?", subject.colour)]
    shape = sc.SHAPES[int(rng.integers(len(sc.SHAPES)))]
    count = sum(o.shape == shape for o in objects)
    result.append(("count", f"how many {PLURALS[shape]} are there ?", NUMBERS[count]))
    if len(objects) >= 2:
        i, j = (int(k) for k in rng.permutation(len(objects))[:2])
        relation = sc.RELATIONS[int(rng.integers(len(sc.RELATIONS)))]
        a, b = objects[i], objects[j]
        answer = "yes" if sc.relation_holds(a, b, relation) else "no"
        result.append(("relation", f"is the {a.colour} {a.shape} {relation} the {b.colour} {b.shape} ?", answer))
    else:
        other = sc.SHAPES[(sc.SHAPES.index(shape) + 1 + int(rng.integers(len(sc.SHAPES) - 1))) % len(sc.SHAPES)]
        result.append(("count", f"how many {PLURALS[other]} are there ?",
                       NUMBERS[sum(o.shape == other for o in objects)]))
    return result


def vocabulary() -> tuple[str, ...]:
    """The captions' words plus every word of the questions and answers, sorted."""
    words = set(sc.vocabulary()) | set(NUMBERS) | set(PLURALS.values()) | {"yes", "no"}
    words |= set("what colour is the biggest object ? how many are there".split())
    return tuple(sorted(words))


def build_tokenizer() -> Tokenizer:
    """Word-level tokenizer (`tokenization.word_level_tokenizer`, as Shapes-Captions'): [PAD]=0 [UNK]=1 [CLS]=2
    [SEP]=3 [MASK]=4, then :func:`vocabulary`; [CLS] ... [SEP]."""
    return word_level_tokenizer(vocabulary())


def tokenizer(data_config: Mapping[str, Any] | None = None) -> Tokenizer:
    """A fresh copy of this dataset's tokenizer (the evaluator decodes answers with it)."""
    del data_config
    return build_tokenizer()


class VqaSource:
    """A split of Shapes-Captions with its questions: `image`, `scene`, `questions` [(type, question, answer)]."""

    def __init__(self, source, split: str):
        self.source, self.split = source, split

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.source[int(index)]
        objects = sc.scene_objects(json.loads(example["scene"]))
        return {"image": example["image"], "scene": example["scene"], "index": int(index),
                "questions": questions(objects, self.split, int(index))}


@dataclasses.dataclass(frozen=True)
class ShapesVqaPreprocess:
    """Example -> `image`, the asked `prompt` / `text` / `label` (type `index % 3`) and all three as
    `prompts` [3, Q], `answers` [3, A], `types` [3] for the training draw. Picklable."""

    def __call__(self, example: Mapping[str, Any]) -> dict[str, np.ndarray]:
        qs = example["questions"]
        prompts = encode_texts(build_tokenizer, [q for _, q, _ in qs], MAX_QUESTION_LEN)
        answers = encode_texts(build_tokenizer, [a for _, _, a in qs], MAX_ANSWER_LEN)
        types = np.asarray([QUESTION_TYPES.index(t) for t, _, _ in qs], np.int32)
        asked = int(example["index"]) % len(qs)
        return {"image": np.asarray(example["image"], np.float32) / 127.5 - 1.0, "prompt": prompts[asked],
                "text": answers[asked], "label": types[asked], "prompts": prompts, "answers": answers,
                "types": types}


@dataclasses.dataclass(frozen=True)
class ShapesVqaAugment:
    """Training stream: one of the example's three questions, drawn with the Grain-seeded rng."""

    def __call__(self, example: Mapping[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        k = int(rng.integers(len(example["types"])))
        return {"image": example["image"], "prompt": example["prompts"][k], "text": example["answers"][k],
                "label": example["types"][k]}


def raw_source(data_config: Mapping[str, Any], split: str) -> VqaSource:
    """A split's stored scenes with their questions, whatever `data.cache_in_memory` did to the dataset's source."""
    return VqaSource(sc.build(data_config.get("data_dir") or None).as_data_source(split=split), split)


@DATASETS.register("shapes_vqa")
def dataset(data_config: ml_collections.ConfigDict) -> Dataset:
    """Shapes-VQA (module docstring): Shapes-Captions' build in `data.data_dir`, questions from the scenes."""
    builder = build_on_process_zero(lambda: sc.build(data_config.get("data_dir") or None))
    return Dataset(
        name="shapes_vqa",
        source=lambda split: VqaSource(builder.as_data_source(split=split), split),
        preprocess=ShapesVqaPreprocess(),
        splits=split_sizes(builder),
        num_classes=len(QUESTION_TYPES),
        modalities=("image", "text"),  # `prompt` rides along (the decoder's `use_prompt` reads it).
        class_names=QUESTION_TYPES,
        task="contrastive",
        augment=ShapesVqaAugment(),
    )
