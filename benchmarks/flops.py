"""Analytic FLOPs of a JAX function: the dot_general and conv_general_dilated ops of its jaxpr.

Model FLOPs for MFU: the matmuls and convolutions the algorithm needs, counted from the traced
program (2 per multiply-add, products with a conv's zero padding left out, as XLA counts them),
never from what XLA ends up running. Elementwise ops, norms and softmaxes are left out (XLA's
count has them: a few percent of a UNet). Sub-programs are walked: scan bodies count
`length` times, a cond counts its most expensive branch, a while loop's body once (its trip
count is unknown; `while_loops` says how many were seen). Trace the variant without remat and
with XLA attention: remat's recompute is not model work, and a fused attention kernel is one
opaque custom call.

  flops.count(fn, *args)  -> {"total", "dot_general", "conv_general_dilated", "while_loops",
                              "total_loop_bodies_once"}

The last counts each scan body once, as XLA's cost analysis does, to compare with it.

`args` may be ShapeDtypeStructs: nothing is computed.
"""
from __future__ import annotations

import math

import jax
import numpy as np
from jax.extend import core


def dot_general_flops(eqn) -> float:
  """2 x output elements x contracted size."""
  (lhs_contract, _), _ = eqn.params["dimension_numbers"]
  lhs = eqn.invars[0].aval.shape
  out = eqn.outvars[0].aval.shape
  return 2.0 * math.prod(out) * math.prod(lhs[d] for d in lhs_contract)


def _taps(size: int, out: int, kernel: int, stride: int, pad_lo: int, lhs_dil: int,
          rhs_dil: int) -> int:
  """(output position, kernel tap) pairs of one spatial dimension that meet a real input
  element: not padding, not a hole of lhs dilation."""
  o = np.arange(out)[:, None] * stride - pad_lo + np.arange(kernel)[None, :] * rhs_dil
  return int(np.sum((o >= 0) & (o <= (size - 1) * lhs_dil) & (o % lhs_dil == 0)))


def conv_flops(eqn) -> float:
  """2 x products with real inputs: (batch x output features) x input features per group x the
  spatial (output, tap) pairs that do not fall on padding or on holes of lhs dilation (the
  input gradient of a strided conv). This is how XLA's cost analysis counts too."""
  p = eqn.params
  lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
  out = eqn.outvars[0].aval.shape
  dn = p["dimension_numbers"]
  spatial = len(dn.rhs_spec) - 2
  ones = (1,) * spatial
  pairs = 1
  for i in range(spatial):
    pairs *= _taps(lhs[dn.lhs_spec[2 + i]], out[dn.out_spec[2 + i]], rhs[dn.rhs_spec[2 + i]],
                   p["window_strides"][i], p["padding"][i][0], (p["lhs_dilation"] or ones)[i],
                   (p["rhs_dilation"] or ones)[i])
  return 2.0 * out[dn.out_spec[0]] * out[dn.out_spec[1]] * rhs[dn.rhs_spec[1]] * pairs


COUNTERS = {"dot_general": dot_general_flops, "conv_general_dilated": conv_flops}


def _walk(jaxpr, totals: dict, scale: float, loops: bool = True):
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name in COUNTERS:
      totals[name] += scale * COUNTERS[name](eqn)
      continue
    if name == "cond":
      best = None
      for branch in eqn.params["branches"]:
        sub = {k: 0.0 for k in totals}
        _walk(branch.jaxpr, sub, scale, loops)
        if best is None or sum(sub[k] for k in COUNTERS) > sum(best[k] for k in COUNTERS):
          best = sub
      for k in totals:
        totals[k] += best[k]
      continue
    inner = scale * eqn.params["length"] if name == "scan" and loops else scale
    if name == "while":
      totals["while_loops"] += 1
    for sub in core.jaxprs_in_params(eqn.params):
      _walk(sub, totals, inner, loops)


def count_jaxpr(closed_jaxpr) -> dict:
  totals = {k: 0.0 for k in COUNTERS}
  totals["while_loops"] = 0
  _walk(closed_jaxpr.jaxpr, totals, 1.0)
  totals["total"] = sum(totals[k] for k in COUNTERS)
  totals["while_loops"] = int(totals["while_loops"])
  once = {k: 0.0 for k in totals}
  _walk(closed_jaxpr.jaxpr, once, 1.0, loops=False)
  totals["total_loop_bodies_once"] = sum(once[k] for k in COUNTERS)
  return totals


def count(fn, *args, **kwargs) -> dict:
  """FLOPs of fn(*args, **kwargs) from its jaxpr (see the module docstring)."""
  return count_jaxpr(jax.make_jaxpr(fn)(*args, **kwargs))


def xla_flops(compiled) -> float | None:
  """XLA's own count ('flops' of cost_analysis) of a compiled program, per device; None when the
  backend gives none. It includes elementwise ops and remat's recompute, counts a loop's body
  once and misses custom calls (cuDNN attention)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  (some backends raise instead of returning)
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])
