"""AV-Digits: image-only, audio-only, early (concat) and late (mean of logits) fusion on the embedded dataset.

Command (the main job; builds the dataset on first use, ~4 min on 2 CPU cores in all):

    python -m experiments.av_digits --workdir /tmp/av

Override any config key, e.g. `--config.variants=early,late --config.train.num_steps=1000`.
Expected test results (seed 0; see README "Results"):

    | model | accuracy | macro_f1 |   image ~0.80, audio ~0.80, early ~0.95, late ~0.95
"""

from __future__ import annotations

import ml_collections

from mmjax import cli, compare
from mmjax.train import optimizer


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.name = "av_digits"
    config.seed = 0
    config.variants = ("image", "audio", "early", "late")
    config.data = dict(
        name="av_digits",
        data_dir="",  # Empty: $TFDS_DATA_DIR or ~/tensorflow_datasets.
        train_split="train",
        batch_size=64,
        eval_batch_size=256,
        num_threads=2,
        num_workers=0,
        audio=dict(n_fft=256, hop_length=160, n_mels=40),
    )
    config.model = dict(
        num_classes=10,
        encoders=dict(
            image=dict(name="small_cnn", features=(32, 64), pool_after=(1,), width=128, dropout=0.1),
            audio=dict(name="spectrogram_cnn", features=(16, 32, 64), width=128, dropout=0.1),
        ),
        fusion=dict(name="concat"),
        head=dict(name="classifier", hidden=(128,), dropout=0.2),
    )
    config.optimizer = optimizer.default_config()
    config.optimizer.lr = 2e-3
    config.train = dict(num_steps=600, log_every_steps=50, eval_every_steps=200)
    config.eval = dict(splits=("validation", "test"))
    config.checkpoint = dict(every_steps=200, keep=2, best_metric="validation/accuracy", best_mode="max")
    return config


def _only(modality: str) -> compare.Variant:
    def variant(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
        config.model.encoders = {modality: config.model.encoders[modality].to_dict()}
        config.model.fusion = {"name": "concat"}
        return config

    return variant


def _fused(fusion: str) -> compare.Variant:
    def variant(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
        config.model.fusion = {"name": fusion}
        return config

    return variant


VARIANTS = {"image": _only("image"), "audio": _only("audio"), "early": _fused("concat"), "late": _fused("late")}


def run(config: ml_collections.ConfigDict, workdir: str):
    return compare.run_variants(config, workdir, VARIANTS)


def main(argv=None):
    return cli.main(get_config, run, argv, description=__doc__)


if __name__ == "__main__":
    main()
