"""Training: train state, pure steps, device mesh, optimizers, checkpoints and the run loop."""
