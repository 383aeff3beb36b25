"""Device memory of a compiled step, from XLA's memory analysis (and the allocator's peak where it reports one)."""

from __future__ import annotations

import jax


def compiled_memory(compiled) -> dict:
    """Per-device bytes of a compiled step (`jax.stages.Compiled`): peak, arguments, outputs, temporaries, aliases;
    on GPU the allocator's measured peak is added as `device_peak_bytes_in_use`."""
    analysis = compiled.memory_analysis()
    result = {}
    if analysis is not None:
        for key in ("peak_memory", "argument_size", "output_size", "temp_size", "alias_size"):
            value = getattr(analysis, f"{key}_in_bytes", None)
            if value is not None:
                result[key.replace("_memory", "").replace("_size", "") + "_bytes"] = int(value)
    stats = jax.local_devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        result["device_peak_bytes_in_use"] = int(stats["peak_bytes_in_use"])
    return result


def step_memory(step_fn, abstract_state, batch) -> dict:
    """`compiled_memory` of a jitted train step (the compilation is cached, so this costs no compile)."""
    return compiled_memory(step_fn.lower(abstract_state, batch).compile())
