"""Datasets (our own offline TFDS builders and the TFDS catalog), preprocessing and the Grain input pipeline."""
