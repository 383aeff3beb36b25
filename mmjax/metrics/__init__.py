"""Exact metrics over a whole split, in numpy/scikit-learn: what tasks and evaluators compute from gathered outputs.

`classification`: single-label, multi-label and regression metrics; `retrieval`: recall@K and ranks, zero-shot
classification, attribute binding and ITM accuracy from embeddings or scores.
"""
