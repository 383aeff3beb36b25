"""Model FLOPs of a function from its jaxpr: 2 x multiply-adds of every matmul and convolution (forward and
backward, rematerialised recomputation included), the count MFU is conventionally based on.

XLA's own cost analysis is backend-dependent: after GPU optimisation, matmuls are cuBLAS library calls it counts
as zero. Counting the jaxpr gives the same figure on every backend. A `while` loop's trip count is not known
statically, so its body is counted once (train steps have none; `lax.scan`, e.g. gradient accumulation, is
counted exactly).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
from jax.extend import core as jex_core


def _dot_general_flops(eqn) -> float:
    lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = eqn.params["dimension_numbers"]
    contract = math.prod(lhs[d] for d in lhs_contract)
    batch = math.prod(lhs[d] for d in lhs_batch)
    lhs_free = math.prod(s for d, s in enumerate(lhs) if d not in (*lhs_contract, *lhs_batch))
    rhs_free = math.prod(s for d, s in enumerate(rhs) if d not in (*rhs_contract, *rhs_batch))
    return 2.0 * batch * lhs_free * rhs_free * contract


def _conv_flops(eqn) -> float:
    out = eqn.outvars[0].aval.shape
    kernel = eqn.invars[1].aval.shape
    spec = eqn.params["dimension_numbers"]
    rhs_spec = spec.rhs_spec  # (out feature dim, in feature dim, *spatial dims) of the kernel.
    spatial = math.prod(kernel[d] for d in rhs_spec[2:])
    in_per_group = kernel[rhs_spec[1]]
    return 2.0 * math.prod(out) * spatial * in_per_group


def _sub_jaxprs(eqn):
    for value in eqn.params.values():
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(item, jex_core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jex_core.Jaxpr):
                yield item


def jaxpr_flops(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_general_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        else:
            # Sub-programs (jit, remat, custom_vjp, a while loop's body) count once; a scan's body runs `length`
            # times; of a cond's branches only the most expensive counts.
            if name == "cond":
                inner = max((jaxpr_flops(b.jaxpr) for b in eqn.params["branches"]), default=0.0)
            else:
                inner = sum(jaxpr_flops(sub) for sub in _sub_jaxprs(eqn))
            total += inner * (eqn.params["length"] if name == "scan" else 1)
    return total


def model_flops(fn: Callable, *args: Any) -> float:
    """FLOPs of one call of `fn(*args)` (args may be `jax.ShapeDtypeStruct`s): matmuls and convolutions."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)
