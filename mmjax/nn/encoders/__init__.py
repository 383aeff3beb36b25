"""Encoders: one module per modality family; each returns token features [B, T, D] and a pooled [B, D]."""
