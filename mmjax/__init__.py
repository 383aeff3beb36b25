"""mmjax: multimodal models in JAX (Flax linen encoders and fusion, data-parallel training, TFDS + Grain data).

Importing it applies the measured-best XLA flags while JAX has not started (see `mmjax.runtime`).
"""

from mmjax import runtime

__version__ = "0.1.0"

runtime.apply_xla_flags()
