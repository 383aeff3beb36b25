"""Shapes-VQA questions: every answer re-derived from the scene by an independent reading of the question, all
words known to the tokenizer, deterministic, and the batch contract of preprocess / augment."""

import re

import numpy as np

from mmjax.data import shapes_captions as sc
from mmjax.data import shapes_vqa as vqa

SIZES = {"train": 60, "validation": 20, "test": 40, "test_seen": 20}
_NUMBERS = {"zero": 0, "one": 1, "two": 2, "three": 3}


def _answer(question, objects):
    """The answer read off the scene (objects as dicts of the scene JSON) without the dataset's own code."""
    if question == "what colour is the biggest object ?":
        large = [o for o in objects if o["size"] == "large"]
        return (large[0] if large else objects[0])["colour"]  # One large object, or a single small one.
    if m := re.fullmatch(r"how many (\w+) are there \?", question):
        shape = m.group(1)[:-2] if m.group(1) == "crosses" else m.group(1)[:-1]
        return [k for k, v in _NUMBERS.items() if v == sum(o["shape"] == shape for o in objects)][0]
    m = re.fullmatch(r"is the (\w+) (\w+) (to the left of|to the right of|above|below) the (\w+) (\w+) \?", question)
    assert m, question
    (a,) = [o for o in objects if (o["colour"], o["shape"]) == m.group(1, 2)]
    (b,) = [o for o in objects if (o["colour"], o["shape"]) == m.group(4, 5)]
    holds = {"to the left of": a["col"] < b["col"], "to the right of": a["col"] > b["col"],
             "above": a["row"] < b["row"], "below": a["row"] > b["row"]}[m.group(3)]
    return "yes" if holds else "no"


def test_every_answer_is_true_of_the_scene_and_every_word_is_known():
    tokenizer = vqa.build_tokenizer()
    answers = {t: set() for t in vqa.QUESTION_TYPES}
    for split in sc.SPLITS:
        for index, scene in enumerate(sc.generate_split(split, SIZES)):
            objects = [o._asdict() for o in scene.objects]
            qs = vqa.questions(scene.objects, split, index)
            assert qs == vqa.questions(scene.objects, split, index)  # Seeded.
            assert [t for t, _, _ in qs][:2] == ["colour", "count"] and len(qs) == 3
            for kind, question, answer in qs:
                assert _answer(question, objects) == answer, (question, objects)
                answers[kind].add(answer)
                for text, length in ((question, vqa.MAX_QUESTION_LEN), (answer, vqa.MAX_ANSWER_LEN)):
                    ids = tokenizer.encode(text).ids
                    assert 1 not in ids and len(ids) <= length, text  # No [UNK], no truncation.
    assert answers["relation"] == {"yes", "no"} and {"zero", "one"} <= answers["count"]
    assert len(answers["colour"]) == len(sc.COLOURS)


def test_preprocess_asks_one_question_and_augment_draws_any():
    scene = sc.generate_split("validation", SIZES)[4]
    example = {"image": np.zeros((32, 32, 3), np.uint8), "index": 4,
               "questions": vqa.questions(scene.objects, "validation", 4)}
    out = vqa.ShapesVqaPreprocess()(example)
    assert out["prompt"].shape == (vqa.MAX_QUESTION_LEN,) and out["text"].shape == (vqa.MAX_ANSWER_LEN,)
    assert out["label"] == vqa.QUESTION_TYPES.index(example["questions"][4 % 3][0])
    assert out["prompts"].shape == (3, vqa.MAX_QUESTION_LEN) and out["text"][0] == 2 and out["text"][2] == 3
    drawn = {int(vqa.ShapesVqaAugment()(out, np.random.default_rng(seed))["prompt"][1]) for seed in range(20)}
    assert len(drawn) >= 2 and sorted(vqa.ShapesVqaAugment()(out, np.random.default_rng(0))) == [
        "image", "label", "prompt", "text"]
