"""The `files` dataset: your own data, built from a manifest by `python -m mmjax.data.build --out DIR`.

    config.data.name = "files"
    config.data.data_dir = DIR                    # the build's --out folder
    config.data.preprocess = {"image": "decode|resize(40)|random_crop(32)|flip_lr|normalize", ...}  # optional
    config.data.modalities = ("image", "audio")   # optional: a subset of the built modalities

Splits, class names, the task (classification, multilabel for a build with `--label-sep`, or contrastive for a
paired build: one without a label column, or with `--paired`) and the modalities come from the build.

A paired build trains the contrastive and matching tasks (clip, siglip, itm) with retrieval evaluation (each
example's modalities are a pair). When it has labels, they are the examples' `label`, and for image + text builds
their names make the zero-shot evaluator's classes: each class is prompted with `data.prompts` (default
`("{}", "a {}", "a photo of a {}")`), tokenised by the text chain.

Each key's chain of ops (mmjax.data.ops) replaces its default:

    image  decode|resize(32)|normalize                          -> float32 [32, 32, 3] in [-1, 1]
    audio  crop_or_pad(RATE)|log_mel(n_mels=40)|standardize     -> 1 s at the stored rate, float32 [frames, 40]
    text   tokenize(max_len=32)                                 -> int32 [32], the build's own tokenizer
    label  cast('int32')  (multilabel: multi_hot)               -> int32 class id (float32 [K]); 0 for a paired
                                                                   build without labels

(`data.audio.{n_fft, hop_length, n_mels}` and `data.max_len`, when the config has them, feed the default audio and
text chains.) Random ops run only on the training stream (see mmjax.data.ops). Modalities built `--optional`
carry `<modality>_mask` (1 present, 0 absent; absent values are zeros), which the fusion models honour.

`Dataset.inputs` (prediction and search on new files, `mmjax.data.raw_inputs`) are the same chains in their
evaluation version, applied to a file's bytes, a waveform (resampled to the build's rate first) or a text.

Generation: in a paired build with a text column, the batch's `text` (int32 [L], [CLS] ... [SEP] then [PAD] = 0,
the build's tokenizer) is also the target of a text decoder (`model.name = "captioner"`, task `caption`) that
conditions on the other modalities: image + caption, audio + transcript. `raw_source(data_config, split)` gives
the stored text of each example as its reference caption (with the decoded image, for pictures) to the
`captioning` evaluator, and as its reference transcript to the `transcription` evaluator (speech-to-text by a CTC
head or a text decoder, `experiments/spoken_numbers.py --preset files`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from mmjax.data import ops
from mmjax.data.build import NAME, TOKENIZER_FILENAME, VERSION, dataset_dir
from mmjax.data.core import Dataset, mask_key
from mmjax.data.raw_inputs import RawInput, decode_image
from mmjax.data.tfds_builder import split_sizes
from mmjax.data.tokenization import as_text
from mmjax.registry import DATASETS


def open_built(data_dir: str):
    """TFDS's read-only builder of the dataset built into `data_dir` (no TensorFlow)."""
    if not data_dir:
        raise ValueError("config data.data_dir is empty: set it to the --out folder of python -m mmjax.data.build")
    directory = dataset_dir(os.path.abspath(os.path.expanduser(data_dir)))
    if not os.path.exists(os.path.join(directory, "dataset_info.json")):
        raise FileNotFoundError(
            f"config data.data_dir={data_dir!r}: no {NAME} {VERSION} dataset there ({directory}/dataset_info.json); "
            "build one with: python -m mmjax.data.build --manifest MANIFEST.csv --out DIR"
        )
    return tfds.builder_from_directory(directory)


def _tokenizer(directory: str, spec: str | None) -> str | None:
    if spec == TOKENIZER_FILENAME:
        return os.path.join(directory, TOKENIZER_FILENAME)
    return spec


def default_preprocess(meta: Mapping[str, Any], data_config: ml_collections.ConfigDict) -> dict[str, str]:
    """The chain of each built key when `data.preprocess` does not give one (module docstring)."""
    chains = {"image": "decode|resize(32)|normalize", "label": "multi_hot" if meta["task"] == "multilabel"
              else "cast('int32')"}
    if "audio" in meta["modalities"]:
        audio = data_config.get("audio") or {}
        args = ", ".join(f"{k}={audio[k]}" for k in ("n_mels", "n_fft", "hop_length") if audio.get(k))
        chains["audio"] = f"crop_or_pad({meta['sample_rate']})|log_mel({args or 'n_mels=40'})|standardize"
    chains["text"] = f"tokenize(max_len={int(data_config.get('max_len', 32) or 32)})"
    return chains


PROMPTS = ("{}", "a {}", "a photo of a {}")  # Zero-shot prompt templates of a labelled paired build.


def class_prompts(class_names: tuple[str, ...], text: RawInput, templates) -> np.ndarray:
    """int32 `[classes, templates, L]`: each class name in each template, tokenised as the texts are."""
    templates = tuple(templates)
    if not templates or not all(isinstance(t, str) and "{}" in t for t in templates):
        raise ValueError(f"config data.prompts={templates!r} must be templates with '{{}}' for the class name, "
                         "e.g. ('a photo of a {}',)")
    ids = [[text(t.format(name.replace("_", " "))) for t in templates] for name in class_names]
    return np.asarray(ids, np.int32)


def _check_labels(example: Mapping[str, Any], task: str, num_classes: int) -> None:
    label = np.asarray(example["label"])
    if task == "classification" and not (label.shape == () and np.issubdtype(label.dtype, np.integer)):
        raise ValueError(
            f"config data.preprocess['label'] gives labels of shape {label.shape} and dtype {label.dtype}, but this "
            "dataset's classification task needs one integer class id per example: use cast('int32') (the default)"
        )
    if task == "multilabel" and label.shape != (num_classes,):
        raise ValueError(
            f"config data.preprocess['label'] gives labels of shape {label.shape}, but this dataset's multilabel "
            f"task needs multi-hot vectors of shape ({num_classes},): use multi_hot (the default)"
        )


@DATASETS.register("files")
def dataset(data_config: ml_collections.ConfigDict) -> Dataset:
    """The built manifest dataset under `data.data_dir` with `data.preprocess` chains (module docstring)."""
    builder = open_built(data_config.get("data_dir", ""))
    directory = str(builder.data_dir)
    meta = dict(builder.info.metadata or {})
    if meta.get("format_version") != 1:
        raise ValueError(f"{directory}: metadata.json has format_version {meta.get('format_version')!r}, "
                         "expected 1; rebuild the dataset with python -m mmjax.data.build")
    built = tuple(meta["modalities"])
    modalities = tuple(data_config.get("modalities", ()) or built)
    unknown = sorted(set(modalities) - set(built))
    if unknown:
        raise ValueError(f"config data.modalities names {unknown}, but the dataset in {directory} has {list(built)}")
    label_feature = builder.info.features["label"]
    label_feature = getattr(label_feature, "feature", label_feature)  # Sequence(ClassLabel) for multilabel.
    labelled = meta.get("labelled", True)
    class_names = tuple(label_feature.names) if labelled else ()
    configured = dict(data_config.get("preprocess", None) or {})
    extra = sorted(set(configured) - set(modalities) - {"label"})
    if extra:
        raise ValueError(f"config data.preprocess has chains for {extra}, which are not modalities of this dataset "
                         f"(modalities: {list(modalities)}, and 'label')")
    defaults = default_preprocess(meta, data_config)
    chains = {key: configured.get(key, defaults[key]) for key in (*modalities, "label")}
    contexts = {
        "audio": ops.Context(sample_rate=meta.get("sample_rate")),
        "text": ops.Context(tokenizer=_tokenizer(directory, meta.get("tokenizer"))),
        "label": ops.Context(num_classes=len(label_feature.names)),
    }
    for modality in modalities:  # TFDS reads float32 scalars back as Python floats.
        if modality in meta.get("optional", ()):
            chains[mask_key(modality)] = "cast('float32')"
    preprocess, augment = ops.compose(chains, contexts, keep=())
    splits = split_sizes(builder)
    inputs = {m: RawInput(m, chains[m], sample_rate=contexts["audio"].sample_rate if m == "audio" else None,
                          tokenizer=contexts["text"].tokenizer if m == "text" else None) for m in modalities}
    prompts = None
    if meta["task"] == "contrastive" and labelled and {"image", "text"} <= set(modalities):
        prompts = class_prompts(class_names, inputs["text"], data_config.get("prompts", None) or PROMPTS)
    result = Dataset(
        name=NAME,
        source=lambda split: builder.as_data_source(split=split),
        preprocess=preprocess,
        splits=splits,
        num_classes=max(1, len(class_names)),
        modalities=modalities,
        class_names=class_names,
        task=meta["task"],
        augment=augment,
        class_prompts=prompts,
        inputs=inputs,
    )
    # Runs every chain once now, so a chain that does not fit the data fails here, naming the key and the op.
    first = next(s for s, n in splits.items() if n)
    example = preprocess(result.source(first)[0])
    if augment is not None:
        example = augment(example, np.random.default_rng(0))
    _check_labels(example, result.task, result.num_classes)
    return result


class FilesSource:
    """A built split as the generation evaluators read it: per example `captions` (a list holding the stored
    text: the one reference), `row` (the manifest's data row) and, in a build with images, `image` uint8
    [H, W, 3] decoded from the stored file bytes (its own size)."""

    def __init__(self, source, modalities: tuple[str, ...]):
        self.source, self.modalities = source, modalities

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.source[int(index)]
        record = {"captions": [as_text(example["text"])], "row": int(example["row"])}
        if "image" in self.modalities:
            record["image"] = decode_image(example["image"])
        return record


def raw_source(data_config: Mapping[str, Any], split: str) -> FilesSource:
    """The stored examples of `split` of the build in `data.data_dir` (texts as references, images decoded),
    whatever `data.cache_in_memory` did to the dataset's preprocessed source. A build without a text column has
    no references: a ValueError says so."""
    builder = open_built(data_config.get("data_dir", ""))
    built = tuple((builder.info.metadata or {}).get("modalities", ()))
    if "text" not in built:
        raise ValueError(f"the dataset in {builder.data_dir} has no text (modalities {list(built)}): the reference "
                         "captions / transcripts are the manifest's text column; rebuild with one")
    return FilesSource(builder.as_data_source(split=split), built)
