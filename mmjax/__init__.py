"""mmjax: multimodal models in JAX (Flax linen encoders and fusion, data-parallel training, TFDS + Grain data)."""

__version__ = "0.1.0"
