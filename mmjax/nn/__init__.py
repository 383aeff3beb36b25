"""Pure Flax linen modules: layers, encoders, fusion, heads and the composed models. No I/O, no global state."""
