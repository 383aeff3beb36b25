"""Shapes-Captions: an offline, deterministic image-text dataset of rendered shape scenes (TFDS ``shapes_captions``).

What and why: small synthetic scenes (1-3 coloured shapes on a dark, slightly noisy background) with several TRUE
captions and several minimally edited FALSE captions ("hard negatives") each, for training CLIP/SigLIP-style
dual encoders in seconds and measuring what they actually bind: which colour goes with which shape, which size,
which object is left of which (Winoground/ARO-style), and whether they generalise to colour-shape combinations
never seen in training. Everything is rendered with numpy; nothing is downloaded.

Recipe:

* Vocabulary (closed): :data:`SHAPES` (circle, square, triangle, cross, diamond), :data:`COLOURS` (red, green,
  blue, yellow, purple, white; RGB in :data:`COLOUR_RGB`), :data:`SIZES` (small, large) and :data:`RELATIONS`
  (to the left of, to the right of, above, below).
* A scene has 1-3 objects (probabilities :data:`OBJECT_COUNT_PROBS`) in distinct cells of a 3x3 grid, with
  distinct (colour, shape) pairs, so every description "a <size> <colour> <shape>" names one object. A scene of
  one object has a random size; a scene of 2-3 objects has exactly ONE large object, the others small. That
  object (or the only one) is the scene's *subject*: the first entry of ``scene`` and the object ``label`` and
  ``colour`` describe, so "the shape of the largest object" is well defined from the image alone.
  No multi-object scene layout (cells, sizes, colours, shapes) occurs twice in the dataset; single-object
  layouts (432 seen ones) necessarily repeat, with different jitter and noise.
* Rendering (:func:`render`): each object is a mask in its own coordinates (circle, square, triangle, cross,
  diamond), sampled 4x4 per pixel (anti-aliasing by box-averaging) and alpha-blended at its cell centre with a
  small jitter (small objects +-4.5% of the image, large +-0.5%; objects never overlap or leave the image and
  the grid order always holds). Extents: large objects span 32% of the image (about 10 px at 32x32), small 19%
  (about 6 px), so their areas differ by about 2.8x. Per scene, the background is a dark grey with a random tint
  and a linear gradient, each object's colour is jittered by up to +-12 per channel, and Gaussian pixel noise
  (std 4) is added to the whole image. Default :data:`IMAGE_SIZE` 32.
* Relations are grid relations: "A to the left of B" holds when A's column is smaller than B's (whatever the
  rows), "A above B" when A's row is smaller; a caption only states a relation that holds, and every pair of
  objects is in a different row or column, so at least one relation holds for every ordered pair.
* Captions (:data:`TEMPLATES`, :data:`CAPTIONS_PER_SCENE` = 4 true captions per scene, from 4 different
  templates, so they differ; the objects in a random order):
  one object: "a large red circle", "there is a large red circle", "a red circle that is large", ...;
  two objects: "a large red circle to the left of a small blue square", "a small blue square is to the right
  of a large red circle", "a large red circle and a small blue square", ...; three objects mention all three
  with at least one relation: "a large red circle above a small blue square , and a small green cross",
  "a small blue square below a large red circle and to the left of a small green cross", ...
  Captions are lowercase; the comma is a separate word. No caption is longer than 21 words.
* Hard negatives (:data:`NEGATIVES_PER_SCENE` = 3 per scene, with their kind in ``negative_kinds``): a true
  caption with ONE minimal edit that makes it false for the scene: ``swap_colour``, ``swap_shape``,
  ``swap_size`` (two mentioned objects exchange that attribute; only when it differs between them),
  ``swap_relation`` (left <-> right, above <-> below); for single-object scenes ``replace_colour``,
  ``replace_shape``, ``replace_size``. Each negative is checked false under the scene (:func:`caption_holds`),
  differs from every true caption and from the other negatives. Scenes of 2-3 objects take swaps first: two
  different binding kinds (colour, shape, size swaps), then a third from the remaining kinds including
  ``swap_relation``. Swaps keep the words of the caption (only their order changes), so a text-only model
  cannot tell a negative from the words it uses.

Compositional splits: the (colour, shape) pairs in :data:`HELD_OUT_PAIRS` (6 of 30: one per colour, every shape
at least once) never occur in ``train``, ``validation`` or ``test_seen``, neither in scenes nor in any caption or
negative; every ``test`` scene has at least one held-out object (the others may be anything, and its negatives
may name any pair). ``test_seen`` (only seen pairs) is the in-distribution comparison for ``test``.
Sizes (:data:`SPLIT_SIZES`): train 6,000, validation 500, test 1,000, test_seen 500. ``build(data_dir, sizes)``
takes other sizes (for tests) under the same version, so build those into their own data dir. Each split is
stored in generation order (seeded; TFDS's shuffling is off). Labels are close to balanced, except that
triangles are rarer outside ``test`` (held out with two colours).

Features: ``image`` Image uint8 [S, S, 3] (PNG); ``captions``, ``negatives``, ``negative_kinds`` Sequence(Text)
of lengths 4, 3, 3; ``label`` ClassLabel(:data:`SHAPES`) and ``colour`` ClassLabel(:data:`COLOURS`) of the
subject; ``num_objects`` int32; ``scene`` Text, a JSON ``{"objects": [...]}`` with, per object (subject first),
``shape``, ``colour``, ``size``, ``row``, ``col`` (grid cell), ``x``, ``y`` (centre as a fraction of the image
width/height) and ``rgb`` (the rendered colour).

Determinism: every random choice comes from ``numpy.random.default_rng`` seeded from :data:`SEED` (one stream
per split and purpose), PNGs are encoded by Pillow with fixed settings, and examples are re-serialised with
sorted feature maps, so rebuilding a version, in any process, writes byte-identical array_record files.
Building the default sizes takes about 10 s on a busy 2-core machine (scene generation ~4 s, rendering ~2 s,
PNG encoding ~2 s, the rest TFDS's writer).

Reading needs no TensorFlow::

    from mmjax.data import shapes_captions
    builder = shapes_captions.build("/path/to/tensorflow_datasets")
    test = tfds.data_source("shapes_captions", data_dir="/path/to/tensorflow_datasets", split="test")
    example = test[0]   # image uint8 [32, 32, 3]; captions: 4 bytes; scene: bytes (JSON); label: int; ...

(:class:`ShapesSource` wraps such a source and decodes the texts to str.)

:func:`dataset` (``config.data``) gives a :class:`~mmjax.data.datasets.Dataset` for the contrastive task, with
this batch contract:

* evaluation batches (``preprocess`` only): ``image`` float32 [B, S, S, 3] in [-1, 1]; ``text`` int32
  [B, 4, L] (all true captions); ``negatives`` int32 [B, 3, L]; ``label`` int32 [B] (subject shape);
* the training stream (``preprocess`` then ``augment``): ``image``, ``text`` int32 [B, L] (ONE caption per
  example, drawn with the Grain-seeded rng, so a resumed run sees the same ones), ``label``; no negatives.
  There is no geometric augmentation: a flip would falsify the relations.

``data.tokenizer``: "" (default) for this dataset's own word-level tokenizer (:func:`build_tokenizer`: the
grammar's words, no training, [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4, texts wrapped as [CLS] ... [SEP]),
"minilm" for all-MiniLM-L6-v2's, or a tokenizer.json path; ``data.max_len`` (default 24) ids per text.
Texts tokenise with :func:`mmjax.data.tokenization.encode_texts` and :func:`tokenizer_source`, e.g. the zero-shot
prompts (:func:`class_prompts`, :func:`colour_prompts`): ``encode_texts(tokenizer_source(config), prompts, 24)``.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import itertools
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from tokenizers import Tokenizer, pre_tokenizers

from mmjax.data.core import Dataset, build_on_process_zero
from mmjax.data.raw_inputs import RawInput
from mmjax.data.tfds_builder import OfflineBuilder, prepare, split_sizes
from mmjax.data.tokenization import (
    TokenizerSource,
    as_text,
    encode_texts,
    tokenizer_from,
    word_level_tokenizer,
)
from mmjax.registry import DATASETS

__all__ = [
    "CAPTIONS_PER_SCENE",
    "COLOURS",
    "COLOUR_RGB",
    "COLOUR_TEMPLATES",
    "Caption",
    "HELD_OUT_PAIRS",
    "IMAGE_SIZE",
    "MAX_LEN",
    "Mention",
    "NEGATIVES_PER_SCENE",
    "NEGATIVE_KINDS",
    "RELATIONS",
    "SEED",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "SPLIT_SIZES",
    "Scene",
    "SceneObject",
    "ShapesCaptions",
    "ShapesCaptionsAugment",
    "ShapesCaptionsPreprocess",
    "ShapesSource",
    "TEMPLATES",
    "ZERO_SHOT_TEMPLATES",
    "build",
    "build_tokenizer",
    "word_level_tokenizer",
    "caption_holds",
    "judge_caption",
    "parse_caption",
    "ParsedCaption",
    "raw_source",
    "scene_objects",
    "class_prompts",
    "colour_prompts",
    "dataset",
    "generate_examples",
    "generate_split",
    "apply_edit",
    "hard_negatives",
    "relation_holds",
    "render",
    "scene_json",
    "tokenizer",
    "tokenizer_source",
    "true_captions",
    "vocabulary",
]

SEED = 20_251_121
IMAGE_SIZE = 32
GRID = 3
CAPTIONS_PER_SCENE = 4
NEGATIVES_PER_SCENE = 3
MAX_LEN = 24  # Token ids per text: [CLS] + at most 21 words + [SEP] fits.

SPLITS = ("train", "validation", "test", "test_seen")
SPLIT_SIZES = {"train": 6000, "validation": 500, "test": 1000, "test_seen": 500}

SHAPES = ("circle", "square", "triangle", "cross", "diamond")
COLOURS = ("red", "green", "blue", "yellow", "purple", "white")
COLOUR_RGB = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 245),
    "yellow": (235, 215, 40),
    "purple": (175, 60, 215),
    "white": (235, 235, 235),
}
SIZES = ("small", "large")
RELATIONS = ("to the left of", "to the right of", "above", "below")
INVERSE = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below", "below": "above"}
OBJECT_COUNT_PROBS = (0.2, 0.4, 0.4)  # Scenes of 1, 2, 3 objects.

# One held-out shape per colour; every shape is held out with at least one colour.
HELD_OUT_PAIRS = (
    ("red", "square"),
    ("green", "triangle"),
    ("blue", "diamond"),
    ("yellow", "circle"),
    ("purple", "cross"),
    ("white", "triangle"),
)

NEGATIVE_KINDS = (
    "swap_colour", "swap_shape", "swap_size", "swap_relation", "replace_colour", "replace_shape", "replace_size",
)
BINDING_KINDS = ("swap_colour", "swap_shape", "swap_size")

# Caption templates by number of objects: (format string, the mention pairs its relations {r0}, {r1} relate).
# Mentions are fields {0}, {1}, {2} (Mention: ".phrase" = "a <size> <colour> <shape>").
TEMPLATES: dict[int, tuple[tuple[str, tuple[tuple[int, int], ...]], ...]] = {
    1: (
        ("{0.phrase}", ()),
        ("there is {0.phrase}", ()),
        ("{0.colour_shape} that is {0.size}", ()),
        ("a picture of {0.phrase}", ()),
        ("an image with {0.phrase}", ()),
    ),
    2: (
        ("{0.phrase} {r0} {1.phrase}", ((0, 1),)),
        ("there is {0.phrase} {r0} {1.phrase}", ((0, 1),)),
        ("{0.phrase} is {r0} {1.phrase}", ((0, 1),)),
        ("{0.phrase} and {1.phrase}", ()),
    ),
    3: (
        ("{0.phrase} {r0} {1.phrase} , and {2.phrase}", ((0, 1),)),
        ("there is {0.phrase} {r0} {1.phrase} , and {2.phrase}", ((0, 1),)),
        ("{2.phrase} , and {0.phrase} {r0} {1.phrase}", ((0, 1),)),
        ("{0.phrase} {r0} {1.phrase} and {r1} {2.phrase}", ((0, 1), (0, 2))),
    ),
}

ZERO_SHOT_TEMPLATES = ("a {}", "a {} shape", "a picture of a {}", "there is a {}")
COLOUR_TEMPLATES = ("a {} shape", "a {} object", "something {}", "there is a {} object")

# Geometry, as fractions of the image side.
LARGE_EXTENT, SMALL_EXTENT = 0.16, 0.095  # Half-extent of an object's box.
LARGE_JITTER, SMALL_JITTER = 0.005, 0.045  # Largest shift of an object's centre from its cell centre.
SUPERSAMPLE = 4  # Mask samples per pixel along each axis.
NOISE_STD = 4.0
COLOUR_JITTER = 12
RENDER_CHUNK = 512  # Scenes rendered at once (fixed: the noise streams are drawn per chunk).
MAX_ATTEMPTS = 1000

# Distinct random streams derived from SEED.
_STREAM_SCENES, _STREAM_NOISE = range(2)


# ------------------------------------------------------------------------------------------------ scenes


class Mention(NamedTuple):
    """An object as a caption describes it."""

    size: str
    colour: str
    shape: str

    @property
    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"

    @property
    def colour_shape(self) -> str:
        return f"a {self.colour} {self.shape}"


class SceneObject(NamedTuple):
    """One object of a scene: attributes, grid cell, centre (fractions of the image) and rendered colour."""

    shape: str
    colour: str
    size: str
    row: int
    col: int
    x: float
    y: float
    rgb: tuple[int, int, int]

    @property
    def mention(self) -> Mention:
        return Mention(self.size, self.colour, self.shape)


class Caption(NamedTuple):
    """A caption in structured form: a TEMPLATES format string, its mentions and its relation phrases."""

    template: str
    mentions: tuple[Mention, ...]
    relations: tuple[str, ...]

    @property
    def text(self) -> str:
        names = {f"r{i}": r for i, r in enumerate(self.relations)}
        return self.template.format(*self.mentions, **names)

    @property
    def relation_pairs(self) -> tuple[tuple[int, int], ...]:
        return _TEMPLATE_RELATIONS[self.template]


_TEMPLATE_RELATIONS = {t: pairs for templates in TEMPLATES.values() for t, pairs in templates}


class Scene(NamedTuple):
    """A generated example before rendering; ``objects[0]`` is the subject (the large or only object)."""

    objects: tuple[SceneObject, ...]
    captions: tuple[str, ...]
    negatives: tuple[str, ...]
    negative_kinds: tuple[str, ...]
    background: tuple[float, float, float]  # Mean RGB.
    gradient: tuple[float, float]  # Change of brightness across the image, along x and y.


def relation_holds(a: SceneObject, b: SceneObject, relation: str) -> bool:
    """Whether ``a <relation> b`` holds on the grid (columns for left/right, rows for above/below)."""
    if relation == "to the left of":
        return a.col < b.col
    if relation == "to the right of":
        return a.col > b.col
    if relation == "above":
        return a.row < b.row
    if relation == "below":
        return a.row > b.row
    raise ValueError(f"unknown relation {relation!r}")


def caption_holds(caption: Caption, objects: Sequence[SceneObject]) -> bool:
    """Whether some assignment of the caption's mentions to distinct objects matches every attribute and relation."""
    for chosen in itertools.permutations(objects, len(caption.mentions)):
        if any(o.mention != m for o, m in zip(chosen, caption.mentions, strict=False)):
            continue
        relations = zip(caption.relation_pairs, caption.relations, strict=False)
        if all(relation_holds(chosen[i], chosen[j], r) for (i, j), r in relations):
            return True
    return False


# ------------------------------------------------------------------------------------------ caption parser
# A reading of caption TEXT (e.g. a model's generated caption) that does not go through TEMPLATES: regular
# expressions of the grammar's noun phrases and relations, so generated text is judged on what it says.

_SIZE_RE, _COLOUR_RE, _SHAPE_RE = (f"({'|'.join(words)})" for words in (SIZES, COLOURS, SHAPES))
_RELATION_RE = f"({'|'.join(RELATIONS)})"
_PHRASE_RE = f"a {_SIZE_RE} {_COLOUR_RE} {_SHAPE_RE}"
_PREFIXES = ("there is ", "a picture of ", "an image with ")


class ParsedCaption(NamedTuple):
    """What a caption text states: mentions `(size, colour, shape)` and relations `(i, relation, j)` between them."""

    mentions: tuple[Mention, ...]
    relations: tuple[tuple[int, str, int], ...]


def parse_caption(text: str) -> ParsedCaption | None:
    """The mentions and relations a caption states, or None when the text is not in the captions' grammar."""
    text = " ".join(text.lower().split())
    for prefix in _PREFIXES:
        if text.startswith(prefix + "a "):
            text = text[len(prefix):]
            break
    match = re.fullmatch(f"a {_COLOUR_RE} {_SHAPE_RE} that is {_SIZE_RE}", text)
    if match:
        colour, shape, size = match.groups()
        return ParsedCaption((Mention(size, colour, shape),), ())
    mentions: list[Mention] = []
    relations: list[tuple[int, str, int]] = []
    for clause in text.split(" , and "):
        base = len(mentions)
        if m := re.fullmatch(_PHRASE_RE, clause):
            mentions.append(Mention(*m.groups()))
        elif m := re.fullmatch(f"{_PHRASE_RE} and {_PHRASE_RE}", clause):
            mentions += [Mention(*m.groups()[:3]), Mention(*m.groups()[3:])]
        elif m := re.fullmatch(f"{_PHRASE_RE} (?:is )?{_RELATION_RE} {_PHRASE_RE}(?: and {_RELATION_RE} "
                               f"{_PHRASE_RE})?", clause):
            g = m.groups()
            mentions += [Mention(*g[0:3]), Mention(*g[4:7])]
            relations.append((base, g[3], base + 1))
            if g[7] is not None:
                mentions.append(Mention(*g[8:11]))
                relations.append((base, g[7], base + 2))
        else:
            return None
    return ParsedCaption(tuple(mentions), tuple(relations))


def judge_caption(text: str, objects: Sequence[SceneObject]) -> dict[str, bool | float]:
    """How true a caption text is of a scene (by :func:`parse_caption`): `grammatical`; `attributes_true` (every
    mentioned size-colour-shape is an object of the scene, and no object is mentioned twice); `true` (moreover
    some assignment of mentions to distinct objects makes every relation hold); `object_recall` (the share of the
    scene's objects it mentions)."""
    parsed = parse_caption(text)
    if parsed is None:
        return {"grammatical": False, "attributes_true": False, "true": False, "object_recall": 0.0}
    present = {o.mention for o in objects}
    distinct = len(set(parsed.mentions)) == len(parsed.mentions)
    attributes = distinct and all(m in present for m in parsed.mentions)
    holds = False
    if attributes:
        for chosen in itertools.permutations(objects, len(parsed.mentions)):
            if all(o.mention == m for o, m in zip(chosen, parsed.mentions)) and all(
                    relation_holds(chosen[i], chosen[j], r) for i, r, j in parsed.relations):
                holds = True
                break
    recall = len(present & set(parsed.mentions)) / len(present)
    return {"grammatical": True, "attributes_true": attributes, "true": holds, "object_recall": recall}


def scene_objects(scene: str | Mapping[str, Any]) -> tuple[SceneObject, ...]:
    """The objects of a ``scene`` feature (JSON text or its parsed dict)."""
    data = json.loads(scene) if isinstance(scene, str) else scene
    return tuple(SceneObject(o["shape"], o["colour"], o["size"], o["row"], o["col"], o["x"], o["y"], tuple(o["rgb"]))
                 for o in data["objects"])


def _held_out(colour: str, shape: str) -> bool:
    return (colour, shape) in HELD_OUT_PAIRS


def _names_held_out(caption: Caption) -> bool:
    return any(_held_out(m.colour, m.shape) for m in caption.mentions)


def _true_relations(a: SceneObject, b: SceneObject) -> list[str]:
    return [r for r in RELATIONS if relation_holds(a, b, r)]


def _random_caption(objects: Sequence[SceneObject], template: str, rng: np.random.Generator) -> Caption:
    """A true caption from ``template``: the objects in a random order, each relation a random true one."""
    order = [objects[int(i)] for i in rng.permutation(len(objects))]
    relations = []
    for i, j in _TEMPLATE_RELATIONS[template]:
        options = _true_relations(order[i], order[j])
        relations.append(options[int(rng.integers(len(options)))])
    return Caption(template, tuple(o.mention for o in order), tuple(relations))


def _shuffled(items: list, rng: np.random.Generator) -> list:
    return [items[int(i)] for i in rng.permutation(len(items))]


def true_captions(objects: Sequence[SceneObject], rng: np.random.Generator) -> list[Caption]:
    """CAPTIONS_PER_SCENE true captions from as many different templates (so their texts differ)."""
    templates = TEMPLATES[len(objects)]
    chosen = rng.choice(len(templates), size=CAPTIONS_PER_SCENE, replace=False)
    return [_random_caption(objects, templates[int(t)][0], rng) for t in chosen]


_VALUES = {"colour": COLOURS, "shape": SHAPES, "size": SIZES}


def _edit_specs(caption: Caption, kind: str) -> list[tuple]:
    """The edits of ``kind`` that change ``caption``: relation indices, mention pairs, or (mention, new value)."""
    if kind == "swap_relation":
        return [(k,) for k in range(len(caption.relations))]
    action, field = kind.split("_")
    values = [getattr(m, field) for m in caption.mentions]
    if action == "swap":
        return [(i, j) for i, j in itertools.combinations(range(len(values)), 2) if values[i] != values[j]]
    return [(i, v) for i, old in enumerate(values) for v in _VALUES[field] if v != old]


def apply_edit(caption: Caption, kind: str, spec: tuple) -> Caption:
    """``caption`` with one edit (see :func:`hard_negatives`): ``spec`` from ``_edit_specs``."""
    if kind == "swap_relation":
        relations = list(caption.relations)
        relations[spec[0]] = INVERSE[relations[spec[0]]]
        return caption._replace(relations=tuple(relations))
    action, field = kind.split("_")
    mentions = list(caption.mentions)
    if action == "swap":
        i, j = spec
        a, b = getattr(mentions[i], field), getattr(mentions[j], field)
        mentions[i], mentions[j] = mentions[i]._replace(**{field: b}), mentions[j]._replace(**{field: a})
    else:
        i, value = spec
        mentions[i] = mentions[i]._replace(**{field: value})
    return caption._replace(mentions=tuple(mentions))


def hard_negatives(
    captions: Sequence[Caption], objects: Sequence[SceneObject], rng: np.random.Generator, allow_held_out: bool
) -> list[tuple[str, str]]:
    """NEGATIVES_PER_SCENE ``(kind, text)``: minimal edits of the true captions, each false for the scene.

    Kinds are taken in turn, one negative each (a random valid edit of a random caption): multi-object scenes
    take two different binding swaps first, then any remaining kind (relation flips included); single-object
    scenes replace an attribute, kinds in a random order. Unless ``allow_held_out``, no negative names a
    held-out pair.
    """
    if len(objects) == 1:
        kinds = _shuffled(["replace_colour", "replace_shape", "replace_size"], rng)
    else:
        binding = _shuffled(list(BINDING_KINDS), rng)
        kinds = binding[:2] + _shuffled(binding[2:] + ["swap_relation"], rng)
    taken = {c.text for c in captions}
    pending = {kind: _shuffled([(c, e) for c in captions for e in _edit_specs(c, kind)], rng) for kind in kinds}
    picked: list[tuple[str, str]] = []
    while len(picked) < NEGATIVES_PER_SCENE and any(pending.values()):
        for kind in kinds:
            while pending[kind]:
                caption, spec = pending[kind].pop()
                candidate = apply_edit(caption, kind, spec)
                text = candidate.text
                if text in taken or (not allow_held_out and _names_held_out(candidate)):
                    continue
                taken.add(text)
                if not caption_holds(candidate, objects):
                    picked.append((kind, text))
                    break
            if len(picked) == NEGATIVES_PER_SCENE:
                break
    if len(picked) < NEGATIVES_PER_SCENE:
        raise RuntimeError(f"shapes_captions: fewer than {NEGATIVES_PER_SCENE} negatives for {objects}")
    return picked


_ALL_PAIRS = [(c, s) for c in COLOURS for s in SHAPES]
_SEEN_PAIRS = [p for p in _ALL_PAIRS if p not in HELD_OUT_PAIRS]
_COUNT_CDF = np.cumsum(OBJECT_COUNT_PROBS)[:-1]


def _cell_centre(index: int) -> float:
    return (index + 0.5) / GRID


def _draw_objects(rng: np.random.Generator, split: str) -> tuple[SceneObject, ...]:
    """1-3 objects: distinct cells and (colour, shape) pairs, one large (or the one object of any size).

    ``test`` scenes hold at least one held-out pair; the other splits none. The subject comes first.
    """
    count = 1 + int(np.searchsorted(_COUNT_CDF, rng.random(), side="right"))
    cells = rng.permutation(GRID * GRID)[:count]
    if split == "test":
        pairs = [HELD_OUT_PAIRS[int(rng.integers(len(HELD_OUT_PAIRS)))]]
        rest = [p for p in _ALL_PAIRS if p != pairs[0]]
        pairs += [rest[int(i)] for i in rng.permutation(len(rest))[: count - 1]]
        pairs = _shuffled(pairs, rng)
    else:
        pairs = [_SEEN_PAIRS[int(i)] for i in rng.permutation(len(_SEEN_PAIRS))[:count]]
    large = int(rng.integers(count)) if count > 1 else -1
    shifts = rng.uniform(-1.0, 1.0, size=(count, 2)).tolist()
    tints = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=(count, 3)).tolist()
    objects = []
    for k, ((colour, shape), cell) in enumerate(zip(pairs, cells.tolist(), strict=False)):
        size = ("large" if k == large else "small") if count > 1 else SIZES[int(rng.integers(2))]
        jitter = LARGE_JITTER if size == "large" else SMALL_JITTER
        row, col = divmod(cell, GRID)
        x = round(_cell_centre(col) + jitter * shifts[k][0], 4)
        y = round(_cell_centre(row) + jitter * shifts[k][1], 4)
        rgb = tuple(min(255, max(0, c + t)) for c, t in zip(COLOUR_RGB[colour], tints[k], strict=False))
        objects.append(SceneObject(shape, colour, size, row, col, x, y, rgb))
    # Subject first (the large one, else the only one), then reading order.
    objects.sort(key=lambda o: (o.size != "large", o.row, o.col))
    return tuple(objects)


def _layout_key(objects: Sequence[SceneObject]) -> tuple:
    return tuple(sorted((o.row, o.col, o.size, o.colour, o.shape) for o in objects))


def _draw_scene(rng: np.random.Generator, split: str, used: set) -> Scene:
    for _ in range(MAX_ATTEMPTS):
        objects = _draw_objects(rng, split)
        if len(objects) == 1 or _layout_key(objects) not in used:
            break
    else:
        raise RuntimeError("shapes_captions: ran out of distinct multi-object layouts")
    if len(objects) > 1:
        used.add(_layout_key(objects))
    captions = true_captions(objects, rng)
    negatives = hard_negatives(captions, objects, rng, allow_held_out=split == "test")
    level = rng.uniform(18, 45)
    tint = rng.uniform(-8, 8, size=3)
    gradient = rng.uniform(-12, 12, size=2)
    return Scene(
        objects=objects,
        captions=tuple(c.text for c in captions),
        negatives=tuple(text for _, text in negatives),
        negative_kinds=tuple(kind for kind, _ in negatives),
        background=tuple(round(float(level + t), 3) for t in tint),
        gradient=tuple(round(float(g), 3) for g in gradient),
    )


@functools.lru_cache(maxsize=4)
def _generate_all(sizes: tuple[tuple[str, int], ...]) -> dict[str, tuple[Scene, ...]]:
    """Every split, in SPLITS order, so that no multi-object layout repeats anywhere in the dataset."""
    used: set = set()
    out = {}
    for split_index, split in enumerate(SPLITS):
        rng = np.random.default_rng((SEED, _STREAM_SCENES, split_index))
        out[split] = tuple(_draw_scene(rng, split, used) for _ in range(dict(sizes)[split]))
    return out


def _resolve_sizes(sizes: Mapping[str, int] | None) -> dict[str, int]:
    unknown = set(sizes or ()) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)}; expected some of {SPLITS}")
    return {s: int(n) for s, n in {**SPLIT_SIZES, **(sizes or {})}.items()}


def generate_split(split: str, sizes: Mapping[str, int] | None = None) -> tuple[Scene, ...]:
    """The scenes of ``split`` (captions and negatives included, not rendered); ``sizes`` overrides SPLIT_SIZES."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    sizes = _resolve_sizes(sizes)
    return _generate_all(tuple((s, sizes[s]) for s in SPLITS))[split]


def scene_json(scene: Scene) -> str:
    """The ``scene`` feature: ``{"objects": [{shape, colour, size, row, col, x, y, rgb}, ...]}``, subject first."""
    objects = [o._asdict() | {"rgb": list(o.rgb)} for o in scene.objects]
    return json.dumps({"objects": objects}, sort_keys=True, separators=(",", ":"))


# --------------------------------------------------------------------------------------------- rendering


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test in an object's own coordinates (u right, v down; the shape fits in [-1, 1]^2)."""
    au, av = np.abs(u), np.abs(v)
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(au, av) <= 0.85
    if shape == "diamond":
        return au + av <= 1.0
    if shape == "cross":
        return (np.minimum(au, av) <= 0.34) & (np.maximum(au, av) <= 1.0)
    if shape == "triangle":  # Apex up, base at v = 0.75.
        return (v >= -1.0) & (v <= 0.75) & (au <= (v + 1.0) / 1.75)
    raise ValueError(f"unknown shape {shape!r}")


def _render_chunk(scenes: Sequence[Scene], size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [n, size, size, 3]: background, then the k-th object of every scene at once, then noise."""
    n = len(scenes)
    window = int(np.ceil(2 * LARGE_EXTENT * size)) + 3  # Pixels around an object that its mask may cover.
    pad = window
    centres = (np.arange(size) + 0.5) / size - 0.5
    background = np.array([s.background for s in scenes], np.float32)  # [n, 3]
    gradient = np.array([s.gradient for s in scenes], np.float32)  # [n, 2]
    shade = gradient[:, 0, None, None] * centres[None, None, :] + gradient[:, 1, None, None] * centres[None, :, None]
    canvas = np.zeros((n, size + 2 * pad, size + 2 * pad, 3), np.float32)
    canvas[:, pad:-pad, pad:-pad] = background[:, None, None, :] + shade[..., None]
    samples = (np.arange(window * SUPERSAMPLE) + 0.5) / SUPERSAMPLE  # Pixel units from a window's corner.
    for k in range(max(len(s.objects) for s in scenes)):
        which = np.array([i for i, s in enumerate(scenes) if len(s.objects) > k])
        objects = [scenes[i].objects[k] for i in which]
        cx = np.array([o.x for o in objects], np.float32) * size
        cy = np.array([o.y for o in objects], np.float32) * size
        radius = np.array([LARGE_EXTENT if o.size == "large" else SMALL_EXTENT for o in objects], np.float32) * size
        x0 = np.floor(cx).astype(int) - window // 2
        y0 = np.floor(cy).astype(int) - window // 2
        u = (x0[:, None] + samples[None, :] - cx[:, None]) / radius[:, None]  # [m, W*F]
        v = (y0[:, None] + samples[None, :] - cy[:, None]) / radius[:, None]
        alpha = np.zeros((len(objects), window, window), np.float32)
        for shape in SHAPES:
            idx = np.array([j for j, o in enumerate(objects) if o.shape == shape], int)
            if len(idx):
                mask = _shape_mask(shape, u[idx, None, :], v[idx, :, None])  # [m_s, W*F (rows), W*F (cols)]
                mask = mask.reshape(len(idx), window, SUPERSAMPLE, window, SUPERSAMPLE)
                alpha[idx] = mask.mean(axis=(2, 4), dtype=np.float32)
        rgb = np.array([o.rgb for o in objects], np.float32)[:, None, None, :]
        rows = (y0 + pad)[:, None, None] + np.arange(window)[None, :, None]
        cols = (x0 + pad)[:, None, None] + np.arange(window)[None, None, :]
        region = canvas[which[:, None, None], rows, cols]  # [m, W, W, 3]
        a = alpha[..., None]
        canvas[which[:, None, None], rows, cols] = region * (1.0 - a) + rgb * a
    image = canvas[:, pad:-pad, pad:-pad] + rng.normal(0.0, NOISE_STD, size=(n, size, size, 3)).astype(np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render(scenes: Sequence[Scene], image_size: int = IMAGE_SIZE, noise_stream: int = 0) -> np.ndarray:
    """uint8 [len(scenes), image_size, image_size, 3] images (vectorised, chunk by chunk, seeded noise)."""
    chunks = [
        _render_chunk(scenes[start : start + RENDER_CHUNK], image_size,
                      np.random.default_rng((SEED, _STREAM_NOISE, noise_stream, start // RENDER_CHUNK)))
        for start in range(0, len(scenes), RENDER_CHUNK)
    ]
    return np.concatenate(chunks) if chunks else np.zeros((0, image_size, image_size, 3), np.uint8)


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buffer, format="png", compress_level=6, optimize=False)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------ builder


def generate_examples(
    split: str, sizes: Mapping[str, int] | None = None, image_size: int = IMAGE_SIZE
) -> Iterator[tuple[int, dict]]:
    """Yields ``(index, features)`` for one split, in its (seeded) order; images are PNG bytes."""
    scenes = generate_split(split, sizes)
    images = render(scenes, image_size, noise_stream=SPLITS.index(split))
    for index, (scene, image) in enumerate(zip(scenes, images, strict=False)):
        subject = scene.objects[0]
        yield index, {
            "image": _png(image),
            "captions": list(scene.captions),
            "negatives": list(scene.negatives),
            "negative_kinds": list(scene.negative_kinds),
            "label": SHAPES.index(subject.shape),
            "colour": COLOURS.index(subject.colour),
            "num_objects": np.int32(len(scene.objects)),
            "scene": scene_json(scene),
        }


class ShapesCaptions(OfflineBuilder):
    """TFDS builder for Shapes-Captions (see module docstring); array_record by default.

    ``sizes`` ({split: scenes}, missing splits default to SPLIT_SIZES) and ``image_size`` are for tests and
    experiments: a builder with other values writes different data under the same version, so build it into its
    own data dir.
    """

    name = "shapes_captions"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release: 1-3 shapes on a 3x3 grid, 4 true captions and 3 hard negatives per scene; "
        "6 colour-shape pairs held out of train/validation/test_seen and present in every test scene.",
    }

    def __init__(self, *, sizes: Mapping[str, int] | None = None, image_size: int = IMAGE_SIZE, **kwargs):
        self._sizes = _resolve_sizes(sizes)
        self._image_size = int(image_size)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        s = self._image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[0],
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(s, s, 3)),
                "captions": tfds.features.Sequence(tfds.features.Text()),
                "negatives": tfds.features.Sequence(tfds.features.Text()),
                "negative_kinds": tfds.features.Sequence(tfds.features.Text()),
                "label": tfds.features.ClassLabel(names=SHAPES),
                "colour": tfds.features.ClassLabel(names=COLOURS),
                "num_objects": tfds.features.Scalar(dtype=np.int32),
                "scene": tfds.features.Text(),
            }),
            supervised_keys=("image", "label"),
            disable_shuffling=True,  # Written in generate_split order (random, seeded).
        )

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str):
        yield from generate_examples(split, self._sizes, self._image_size)


def build(
    data_dir: str | None = None, sizes: Mapping[str, int] | None = None, image_size: int = IMAGE_SIZE
) -> tfds.core.DatasetBuilder:
    """Builds Shapes-Captions under ``data_dir`` (default: TFDS's) unless already there; returns the builder.

    With ``sizes=None`` an existing build is used whatever its sizes; explicit ``sizes`` that differ from an
    existing build raise a ValueError (build them into another data dir).
    """
    builder = ShapesCaptions(data_dir=data_dir, sizes=sizes, image_size=image_size)
    if builder.is_prepared() and sizes is not None:
        built = split_sizes(builder)
        if built != _resolve_sizes(sizes):
            raise ValueError(
                f"shapes_captions is already built in {builder.data_dir} with sizes {built}, not "
                f"{_resolve_sizes(sizes)}; use another data_dir"
            )
    return prepare(builder)


# ------------------------------------------------------------------------------------------ tokenisation


def vocabulary() -> tuple[str, ...]:
    """Every word the grammar, the captions' negatives and the zero-shot prompts can produce, sorted."""
    texts = [re.sub(r"\{[^}]*\}", " ", t) for templates in TEMPLATES.values() for t, _ in templates]
    texts += [t.format("") for t in ZERO_SHOT_TEMPLATES + COLOUR_TEMPLATES]
    texts += ["a", *SHAPES, *COLOURS, *SIZES, *RELATIONS]
    split = pre_tokenizers.BertPreTokenizer()
    return tuple(sorted({word for text in texts for word, _ in split.pre_tokenize_str(text.lower())}))


def build_tokenizer() -> Tokenizer:
    """This dataset's word-level tokenizer: [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4, then :func:`vocabulary`.

    Lowercases, splits on whitespace and punctuation (BERT's pre-tokenizer) and wraps texts as [CLS] ... [SEP],
    like the wordpiece tokenizers of :mod:`mmjax.data.tokenization`. Deterministic: no training.
    """
    return word_level_tokenizer(vocabulary())


def _tokenizer_spec(data_config: Mapping[str, Any] | None) -> str:
    return str((data_config or {}).get("tokenizer", "") or "")


def _source(spec: str) -> TokenizerSource:
    return spec or build_tokenizer


def tokenizer_source(data_config: Mapping[str, Any] | None = None) -> TokenizerSource:
    """What :func:`~mmjax.data.tokenization.encode_texts` encodes ``data_config.tokenizer`` with: "" (default) ->
    :func:`build_tokenizer` (this dataset's own), else the spec ("minilm" or a tokenizer.json path)."""
    return _source(_tokenizer_spec(data_config))


def tokenizer(data_config: Mapping[str, Any] | None = None) -> Tokenizer:
    """A fresh tokenizer for ``data_config.tokenizer``: "" (this dataset's own), "minilm" or a tokenizer.json path."""
    return tokenizer_from(tokenizer_source(data_config))


def class_prompts(templates: Sequence[str] = ZERO_SHOT_TEMPLATES) -> list[list[str]]:
    """Zero-shot prompts for ``label``: per shape (SHAPES order), one prompt per template ("a circle", ...)."""
    return [[t.format(shape) for t in templates] for shape in SHAPES]


def colour_prompts(templates: Sequence[str] = COLOUR_TEMPLATES) -> list[list[str]]:
    """Zero-shot prompts for ``colour``: per colour (COLOURS order), one prompt per template."""
    return [[t.format(colour) for t in templates] for colour in COLOURS]


def write_files(data_dir: str | None, split: str, folder: str) -> tuple[str, str]:
    """Writes a split as your own files would be: ``images/<i>.png`` (lossless: they decode to the stored pixels)
    and two manifests, for ``python -m mmjax.search`` (README "Using a trained model"):

    * ``collection.csv``: ``image``, ``id`` (the example's index), ``caption`` (the first true caption),
      ``captions`` (all of them, " | "-joined), ``label`` (the subject's shape);
    * ``queries.csv``: ``text``, ``id``: every true caption of every image (``CAPTIONS_PER_SCENE`` per image), with
      the id of its image. Its recall@K through the search index is the evaluator's text->image recall@K.

    Returns the two manifests' paths. ``data_dir``: where the dataset is (built there if it is not).
    """
    import csv

    from PIL import Image

    builder = build(data_dir)
    if split not in split_sizes(builder):
        raise ValueError(f"shapes_captions has no split {split!r}; splits: {sorted(split_sizes(builder))}")
    source = ShapesSource(builder.as_data_source(split=split))
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    collection, queries = os.path.join(folder, "collection.csv"), os.path.join(folder, "queries.csv")
    with open(collection, "w", newline="") as c, open(queries, "w", newline="") as q:
        items, texts = csv.writer(c), csv.writer(q)
        items.writerow(["image", "id", "caption", "captions", "label"])
        texts.writerow(["text", "id"])
        for index in range(len(source)):
            example = source[index]
            path = f"images/{index:05d}.png"
            Image.fromarray(example["image"]).save(os.path.join(folder, path))
            items.writerow([path, index, example["captions"][0], " | ".join(example["captions"]),
                            SHAPES[example["label"]]])
            texts.writerows([caption, index] for caption in example["captions"])
    return collection, queries


# --------------------------------------------------------------------------------------------- dataset entry


class ShapesSource:
    """A random-access split with text decoded: ``image`` uint8 [S, S, 3], ``captions``/``negatives``/
    ``negative_kinds`` lists of str, ``scene`` str (JSON), ``label``/``colour``/``num_objects`` int."""

    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.source[int(index)]
        return {
            "image": np.asarray(example["image"], np.uint8),
            "captions": [as_text(t) for t in example["captions"]],
            "negatives": [as_text(t) for t in example["negatives"]],
            "negative_kinds": [as_text(t) for t in example["negative_kinds"]],
            "label": int(example["label"]),
            "colour": int(example["colour"]),
            "num_objects": int(example["num_objects"]),
            "scene": as_text(example["scene"]),
        }


@dataclasses.dataclass(frozen=True)
class ShapesCaptionsPreprocess:
    """Example -> ``image`` float32 [S, S, 3] in [-1, 1], ``text`` int32 [CAPTIONS_PER_SCENE, max_len],
    ``negatives`` int32 [NEGATIVES_PER_SCENE, max_len], ``label`` int32. Picklable (only the spec travels)."""

    tokenizer: str = ""
    max_len: int = MAX_LEN

    def __call__(self, example: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return {
            "image": np.asarray(example["image"], np.float32) / 127.5 - 1.0,
            "text": encode_texts(_source(self.tokenizer), list(example["captions"]), self.max_len),
            "negatives": encode_texts(_source(self.tokenizer), list(example["negatives"]), self.max_len),
            "label": np.int32(example["label"]),
        }


@dataclasses.dataclass(frozen=True)
class ShapesCaptionsAugment:
    """Training stream only: keeps ``image`` and ``label``, picks ONE caption ``text`` int32 [max_len] with
    ``rng.integers(CAPTIONS_PER_SCENE)`` and drops ``negatives``. No geometric augmentation (flips would
    falsify the relations)."""

    def __call__(self, example: Mapping[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        choice = int(rng.integers(CAPTIONS_PER_SCENE))
        return {"image": example["image"], "text": np.asarray(example["text"])[choice], "label": example["label"]}


def raw_source(data_config: Mapping[str, Any], split: str) -> ShapesSource:
    """The examples of a built split as stored (image, captions, scene, ...), whatever `data.cache_in_memory` did
    to the dataset's preprocessed source: e.g. the references and scenes of generated captions."""
    return ShapesSource(build(data_config.get("data_dir") or None).as_data_source(split=split))


@DATASETS.register("shapes_captions")
def dataset(data_config: ml_collections.ConfigDict) -> Dataset:
    """Shapes-Captions for contrastive image-text training (see mmjax.data.shapes_captions for the batch contract).

    `data.data_dir`; `data.tokenizer`: "" (default: the dataset's own word-level tokenizer), "minilm" or a
    tokenizer.json path; `data.max_len`: ids per text (default 24).
    """
    builder = build_on_process_zero(lambda: build(data_config.get("data_dir") or None))
    preprocess = ShapesCaptionsPreprocess(_tokenizer_spec(data_config), int(data_config.get("max_len", MAX_LEN)))
    prompts = class_prompts()
    prompt_ids = encode_texts(
        _source(preprocess.tokenizer), [p for per_class in prompts for p in per_class], preprocess.max_len
    )
    size = int(builder.info.features["image"].shape[0])
    inputs = {  # One raw image / caption, as `preprocess` treats them (x / 127.5 - 1 is `normalize`, to the bit).
        "image": RawInput("image", f"decode|resize({size})|normalize"),
        "text": RawInput("text", tokenizer=_source(preprocess.tokenizer), max_len=preprocess.max_len),
    }
    return Dataset(
        name="shapes_captions",
        source=lambda split: ShapesSource(builder.as_data_source(split=split)),
        preprocess=preprocess,
        splits=split_sizes(builder),
        num_classes=len(SHAPES),
        modalities=("image", "text"),
        class_names=SHAPES,
        task="contrastive",
        augment=ShapesCaptionsAugment(),
        class_prompts=prompt_ids.reshape(len(prompts), len(prompts[0]), -1),
        inputs=inputs,
    )
