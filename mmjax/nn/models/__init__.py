"""The composed models: `multimodal` (encoders, fusion, head), `two_tower` (dual encoder), `matching` (ITM)."""
