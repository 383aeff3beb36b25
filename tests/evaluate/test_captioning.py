"""The `captioning` evaluator's parts: BLEU-4 / CIDEr through their libraries on hand-checked pairs, the Shapes
caption parser against the generator's own truth, the evaluation row order, samples.jsonl, and the decode errors
a run's config raises at set-up (before anything compiles). The whole evaluator runs in the tiny
`shapes_caption` experiment (tests/test_experiments.py)."""

import json
import math

import numpy as np
import pytest

from experiments import shapes_caption
from mmjax.data import shapes_captions as sc
from mmjax.data.tokenization import encode_texts
from mmjax.evaluate import captioning
from mmjax.train import setup as setup_lib

SIZES = {"train": 48, "validation": 16, "test": 24, "test_seen": 16}


def test_bleu4_and_cider_through_their_libraries_on_known_pairs():
    refs = [["a large red circle to the left of", "there is a large red circle"]]
    # Every n-gram of the 4-word hypothesis is in a reference: precisions 1. The closest reference length is 6
    # (there is a large red circle), so the brevity penalty is exp(1 - 6 / 4).
    assert captioning.bleu4(["a large red circle"], refs) == pytest.approx(100 * math.exp(1 - 6 / 4), rel=1e-4)
    assert captioning.bleu4(["there is a large red circle"], refs) == pytest.approx(100.0)
    assert captioning.bleu4(["blue square"], refs) == 0.0
    references = [["a small red circle", "there is a small red circle"], ["a large blue square", "a blue square"]]
    perfect = captioning.cider(["a small red circle", "a large blue square"], references)
    wrong = captioning.cider(["green green", "green green"], references)
    assert perfect > 1.0 and wrong == 0.0
    assert captioning.cider(["a small red circle", "green green"], references) == pytest.approx(
        perfect / 2, rel=0.2)
    with pytest.raises(ValueError, match="same number of references"):
        captioning.bleu4(["a"], [["a"], ["a", "b"]])


def test_the_caption_parser_agrees_with_the_generator_on_every_caption_and_negative():
    scenes = sc.generate_split("test", SIZES) + sc.generate_split("validation", SIZES)
    relation_only = 0
    for scene in scenes:
        for caption in scene.captions:
            judged = sc.judge_caption(caption, scene.objects)
            assert judged == {"grammatical": True, "attributes_true": True, "true": True, "object_recall": 1.0}
        for kind, negative in zip(scene.negative_kinds, scene.negatives):
            judged = sc.judge_caption(negative, scene.objects)
            assert judged["grammatical"] and not judged["true"], (negative, scene.objects)
            if kind == "swap_relation":
                relation_only += 1
                assert judged["attributes_true"]  # Right objects, wrong relation.
    assert relation_only > 0
    objects = scenes[0].objects
    assert sc.parse_caption("a large red circle near a small blue square") is None
    assert sc.judge_caption("circle circle", objects)["grammatical"] is False
    duplicated = f"{objects[0].mention.phrase} and {objects[0].mention.phrase}"
    assert not sc.judge_caption(duplicated, objects)["attributes_true"]  # One object mentioned twice.
    assert sc.scene_objects(sc.scene_json(scenes[0])) == objects


def test_shapes_references_and_decoded_targets_are_the_captions_as_written():
    """Own files' references are compared as the tokenizer normalises them and generated ids are joined by its
    decoder: for Shapes-Captions (word-level, no decoder, lowercase captions) both are the caption itself, so its
    figures do not depend on that step."""
    tokenizer = sc.build_tokenizer()
    captions = [c for scene in sc.generate_split("test", SIZES) for c in scene.captions]
    assert [captioning.reference_text(tokenizer, c) for c in captions] == captions
    config = captioning.decoding.DecodeConfig(bos_id=2, eos_id=3, pad_id=0)
    ids = encode_texts(tokenizer, captions, sc.MAX_LEN)
    assert [captioning.decode_text(tokenizer, row, config) for row in ids] == captions


def test_rows_follow_the_source_order_and_samples_replace_their_split(tmp_path):
    np.testing.assert_array_equal(captioning.source_order(5, 4), [0, 1, 2, 3, 4, -1, -1, -1])
    path = str(tmp_path / "samples.jsonl")
    captioning.write_samples(path, "test", [{"split": "test", "index": 0}])
    captioning.write_samples(path, "validation", [{"split": "validation", "index": 0}])
    captioning.write_samples(path, "test", [{"split": "test", "index": 0}, {"split": "test", "index": 1}])
    rows = [json.loads(line) for line in open(path)]
    assert [(r["split"], r["index"]) for r in rows] == [("validation", 0), ("test", 0), ("test", 1)]


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    sc.build(data_dir, sizes=SIZES)
    config = shapes_caption.get_config()
    config.data.data_dir = data_dir
    config.data.batch_size = 16
    config.data.eval_batch_size = 16
    config.model.encoders.image = dict(name="vit", patch_size=8, width=16, depth=1, num_heads=2, mlp_dim=32)
    config.model.decoder.update(width=16, depth=1, num_heads=2, mlp_dim=32)
    return config


@pytest.mark.parametrize("change, message", [
    (lambda c: c.model.decoder.update(vocab_size=40),
     "config eval.captioning: the tokenizer has 38 tokens but the decoder's vocab_size is 40"),
    (lambda c: c.eval.captioning.update(method="beam", beam_size=0), "beam_size=0 must be an integer >= 1"),
    (lambda c: c.eval.captioning.update(max_length=30), "max_length=30 exceeds the decoder's max_len=24"),
    (lambda c: c.eval.captioning.update(max_length=1), "max_length=1 must exceed the prompt"),
    (lambda c: c.model.decoder.update(condition=("image", "audio")),
     r"condition=\['image', 'audio'\]: the decoder conditions on \['audio'\], but the model has no encoder"),
    (lambda c: c.model.decoder.update(use_prompt=True),
     r"reads batch key\(s\) \['prompt'\] that dataset 'shapes_captions' does not provide"),
], ids=["vocab_mismatch", "beam_below_1", "max_length_over_context", "max_length_within_prompt", "no_encoder",
        "prompt_not_in_data"])
def test_bad_decoding_requests_fail_at_setup(tiny_config, change, message):
    import ml_collections

    config = ml_collections.ConfigDict(tiny_config.to_dict())
    change(config)
    with pytest.raises(ValueError, match=message):
        setup_lib.setup(config)


def test_a_question_longer_than_the_decoder_context_fails_at_setup(tiny_config):
    from experiments import shapes_vqa

    config = shapes_vqa.get_config()
    config.data.data_dir = tiny_config.data.data_dir
    config.model.encoders.image = tiny_config.model.encoders.image.to_dict()
    config.model.decoder.update(width=16, depth=1, num_heads=2, mlp_dim=32, max_len=16)
    with pytest.raises(ValueError, match=r"prompt \(16\) \+ text \(2\) tokens exceed the decoder's max_len=16"):
        setup_lib.setup(config)
    config.model.decoder.max_len = 18  # Training fits (16 + 2 input tokens); generation's 19 positions do not.
    with pytest.raises(ValueError, match="config eval.vqa: decode max_length=19 exceeds the decoder's max_len=18"):
        setup_lib.setup(config)
