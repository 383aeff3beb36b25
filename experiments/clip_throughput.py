"""CLIP-style two-tower training throughput on synthetic data (what `python -m mmjax.bench` measures).

Presets (applied before any `--config.KEY=VALUE`):

- default (CPU): ViT-S/16 at 224x224 + a 6-layer, 384-wide text tower (32 tokens), float32, batch 32;
- `--preset gpu`: CLIP ViT-B/16 at 224x224 + the 12-layer, 512-wide causal text tower (77 tokens), bfloat16
  compute with float32 parameters and optimizer state, batch 256.

Commands:

    python -m mmjax.bench --config experiments/clip_throughput.py            # step time, examples/s, MFU (CPU)
    python -m mmjax.bench --config experiments/clip_throughput.py:gpu        # the same on a GPU
    python -m experiments.clip_throughput --workdir /tmp/clip_tp [--preset gpu]   # a short real training run

The run trains `train.num_steps` steps of the CLIP loss on random data (the loss falls as the model memorises the
64-example pool); its results.json holds the step time and memory. Figures reached are in README "Performance".
"""

from __future__ import annotations

import ml_collections

from mmjax import experiment
from mmjax.config import base_config

PRESETS = {
    "gpu": [
        "model.encoders.image={'name': 'vit_b16', 'image_size': 224, 'pool': 'cls'}",
        "model.encoders.text={'name': 'text_transformer', 'vocab_size': 49408, 'max_len': 77, 'width': 512, "
        "'depth': 12, 'num_heads': 8, 'mlp_dim': 2048, 'causal': True, 'pool': 'eot'}",
        "model.two_tower.embed_dim=512",
        "model.dtype=bfloat16",
        "data.synthetic.text=(77,)",
        "data.synthetic.vocab_size=49408",
        "data.batch_size=256",
        "data.eval_batch_size=256",
    ],
}


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.name = "clip_throughput"
    config.data.name = "synthetic"
    config.data.synthetic = dict(image=(224, 224, 3), text=(32,), vocab_size=30522, pad=8, task="contrastive",
                                 pool_size=64)
    del config.data.data_dir  # Nothing on disk.
    config.data.batch_size = 32
    config.data.eval_batch_size = 32
    config.data.num_threads = 2
    config.data.cache_in_memory = False  # The synthetic pool already lives in memory.
    config.model = dict(
        name="two_tower",
        num_classes=10,
        dtype="",  # "" = float32; "bfloat16" = mixed precision (float32 params, optimizer state and loss).
        encoders=dict(
            image=dict(name="vit_s16", image_size=224, pool="cls", remat="none"),
            text=dict(name="text_transformer", vocab_size=30522, max_len=32, width=384, depth=6, num_heads=6,
                      mlp_dim=1536, causal=True, pool="eot", remat="none"),
        ),
        two_tower=dict(embed_dim=256),
    )
    config.task = dict(name="clip")
    config.optimizer.update(lr=5e-4, warmup_steps=2, end_lr_factor=0.1, weight_decay=0.1, b2=0.98)
    config.train.update(num_steps=10, log_every_steps=2, eval_every_steps=10)
    del config.mesh.fsdp_min_size  # Not in this config (the trainer's default applies), as in its earlier runs.
    config.eval.splits = ("test",)
    config.checkpoint.update(every_steps=10, keep=1, best_metric="")
    return config


if __name__ == "__main__":
    experiment.main(__name__)
