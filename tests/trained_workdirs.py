"""Tiny trained workdirs for the tests of what comes after training (predict, search, export): own files built
with `mmjax.data.build` and trained for a few steps with the experiments' configs, in seconds.

The session fixtures of tests/conftest.py (`classifier_workdir`, `clip_workdir`, `itm_workdir`, `shapes_workdir`)
build each once per test session.
"""

from __future__ import annotations

import csv
import os

from mmjax import config as config_lib

IMAGE_CHAIN = "decode|resize(10)|random_crop(8)|flip_lr|normalize"
AUDIO_CHAIN = "random_crop_or_pad(2000)|log_mel(n_mels=16)|standardize"
MISSING_AUDIO_ROWS = (3, 8, 17)  # 1-based data rows whose audio cell is empty (the model masks them).
TINY_SHAPES_SIZES = {"train": 96, "validation": 32, "test": 48, "test_seen": 32}


def own_files(folder: str, count: int = 48) -> str:
    """`count` examples of 3 classes (PNG of sizes 10 and 12, 8 kHz WAV of 0.5 s, a caption, a label) with an id
    column and empty audio cells on `MISSING_AUDIO_ROWS`; returns the manifest's path."""
    from mmjax.data import build

    path = build.write_example_folder(folder, count, num_classes=3, sample_rate=8000, seconds=0.5,
                                      image_sizes=(10, 12))
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for i, row in enumerate(rows, start=1):
        row["id"] = f"item{i:03d}"
        if i in MISSING_AUDIO_ROWS:
            row["audio"] = ""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "image", "audio", "text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def pairs_manifest(manifest: str) -> str:
    """The image and text columns (and ids) of an `own_files` manifest, without labels: image-caption pairs."""
    with open(manifest) as f:
        rows = list(csv.DictReader(f))
    path = os.path.join(os.path.dirname(manifest), "pairs.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "image", "text"])
        writer.writeheader()
        writer.writerows({k: r[k] for k in ("id", "image", "text")} for r in rows)
    return path


def _run(config, workdir: str) -> str:
    from mmjax.train import loop

    config.variants = ()
    loop.run(config, workdir)
    return workdir


def train_classifier(folder: str) -> tuple[str, str, str]:
    """(workdir, manifest, data dir): an image + audio classifier (audio optional) on `own_files`."""
    from experiments import av_digits
    from mmjax.data import build
    from tests.conftest import tiny_overrides

    manifest = own_files(os.path.join(folder, "raw"))
    data_dir = os.path.join(folder, "built")
    build.build(manifest, data_dir, optional=("audio",), progress=False)
    config = config_lib.apply_overrides(av_digits.get_config(), tiny_overrides(
        data_dir, **{"train.num_steps": 4, "train.eval_every_steps": 4, "checkpoint.every_steps": 4,
                     "data.eval_batch_size": 16}))
    data = config.data.to_dict()
    data.pop("target")
    data.update(name="files", modalities=("audio", "image"), preprocess={"image": IMAGE_CHAIN, "audio": AUDIO_CHAIN})
    config.data = data
    config.model.num_classes = 3
    return _run(config, os.path.join(folder, "workdir")), manifest, data_dir


def _two_tower_config(data_dir: str, extra=()):
    from experiments import shapes_itm

    image = "{'name': 'vit', 'patch_size': 4, 'width': 16, 'depth': 1, 'num_heads': 2, 'mlp_dim': 32}"
    values = {
        "data.data_dir": data_dir, "data.batch_size": 16, "data.eval_batch_size": 16, "model.encoders.image": image,
        "model.two_tower.embed_dim": 8, "train.num_steps": 3, "train.log_every_steps": 1,
        "train.eval_every_steps": 3, "checkpoint.every_steps": 3, "optimizer.warmup_steps": 1,
        "model.encoders.text.width": 16, "model.encoders.text.depth": 1, "model.encoders.text.num_heads": 2,
        "model.encoders.text.mlp_dim": 32, "matching.embed_dim": 8, "matching.fusion_dim": 16,
        "matching.num_layers": 1, "matching.num_heads": 2, "matching.mlp_dim": 32,
    }
    return config_lib.apply_overrides(shapes_itm.get_config(), [f"{k}={v}" for k, v in values.items()] + list(extra))


# CLIP on own pairs trains 40 steps at a higher learning rate (in about the seconds of 3: compiling dominates), so
# that its scores spread apart: tests/search/test_own_pairs.py compares rankings of two float paths exactly.
CLIP_OVERRIDES = ("train.num_steps=40", "train.eval_every_steps=40", "checkpoint.every_steps=40", "optimizer.lr=3e-3",
                  "train.log_every_steps=10")


def train_pairs(folder: str, variant: str, overrides=()) -> tuple[str, str, str]:
    """(workdir, pairs manifest, data dir): CLIP ("dual") or ITM ("cross") on a label-free paired build, built as a
    user would (`python -m mmjax.data.build --paired`); `overrides` go to the config."""
    from experiments import shapes_itm
    from mmjax.data import build

    manifest = pairs_manifest(own_files(os.path.join(folder, "raw")))
    data_dir = os.path.join(folder, "built")
    build.main(["--manifest", manifest, "--out", data_dir, "--paired", "--quiet"])
    # The shapes experiments' config on own pairs: the fixes the setup error lists (classes, splits, vocabulary).
    config = _two_tower_config(data_dir, ["data.name=files", "model.num_classes=1", "eval.splits=validation,test",
                                          "checkpoint.best_metric=validation/i2t_recall@1", *overrides])
    config = shapes_itm.VARIANTS[variant](config)
    config.checkpoint.best_metric = "validation/i2t_recall@1"  # Own pairs have no hard negatives to bind.
    config.model.encoders.text.vocab_size = _vocabulary(data_dir)
    config.data.max_len = 16
    config.model.encoders.text.max_len = 16
    return _run(config, os.path.join(folder, "workdir")), manifest, data_dir


def _vocabulary(data_dir: str) -> int:
    import ml_collections

    from mmjax.data.datasets import get_dataset

    return get_dataset(ml_collections.ConfigDict({"name": "files", "data_dir": data_dir})).inputs["text"].vocab_size()


def train_shapes(folder: str) -> tuple[str, str]:
    """(workdir, TFDS data dir): CLIP on a tiny Shapes-Captions, 4 steps."""
    from experiments import shapes_clip
    from mmjax.data import shapes_captions

    data_dir = os.path.join(folder, "tfds")
    shapes_captions.build(data_dir, sizes=TINY_SHAPES_SIZES)
    config = _two_tower_config(data_dir, ["train.num_steps=4", "train.eval_every_steps=4", "checkpoint.every_steps=4",
                                          "data.eval_batch_size=32"])
    config.task = {"name": "clip"}
    config.checkpoint.best_metric = shapes_clip.get_config().checkpoint.best_metric
    return _run(config, os.path.join(folder, "workdir")), data_dir
