"""Attention kernels on this backend: jax.nn.dot_product_attention (XLA) against ldm_jax's XLA
attention whole and in cache-sized lax.map blocks, and torch's scaled_dot_product_attention when
torch is installed (optional at run time).

  python benchmarks/attention.py [--shapes=8x1024x8x32,8x256x16x32,8x64x32x32]
      [--block_kib=256,1024,4096] [--rounds=4] [--out=attention.json]

Shapes are batch x tokens x heads x head_dim: the ImageNet UNet's self-attention at 32x32,
16x16 and 8x8 latents, batch 8. Each variant is timed forward and forward+backward; the
variants run interleaved in rounds and the best round counts (robust to a busy machine). The
outputs are checked against jax.nn.dot_product_attention's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ldm_jax.models.attention import xla_attention  # noqa: E402


def _timed(fn, *args) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def _torch_times(q, k, v, rounds: int):
  try:
    import torch
    import torch.nn.functional as F
  except ImportError:
    return None
  qt, kt, vt = (torch.tensor(np.asarray(a)).permute(0, 2, 1, 3).contiguous().requires_grad_()
                for a in (q, k, v))

  def fwd():
    with torch.no_grad():
      F.scaled_dot_product_attention(qt, kt, vt)

  def fwd_bwd():
    (F.scaled_dot_product_attention(qt, kt, vt) * vt).sum().backward()

  fwd(), fwd_bwd()
  best = [float("inf"), float("inf")]
  for _ in range(rounds):
    for i, fn in enumerate((fwd, fwd_bwd)):
      start = time.perf_counter()
      fn()
      best[i] = min(best[i], time.perf_counter() - start)
  return {"fwd_ms": best[0] * 1e3, "fwd_bwd_ms": best[1] * 1e3}


def run_shape(shape, block_kib, rounds: int) -> dict:
  q, k, v = (jax.random.normal(jax.random.PRNGKey(i), shape) for i in range(3))
  variants = {"jax.nn.dot_product_attention": lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v), "ldm_jax whole": lambda q, k, v: xla_attention(q, k, v)}
  for kib in block_kib:
    variants[f"ldm_jax blocks {kib} KiB"] = (
        lambda b: lambda q, k, v: xla_attention(q, k, v, block_bytes=b))(kib * 1024)
  fns = {}
  for name, f in variants.items():
    fwd = jax.jit(f)
    grad = jax.jit(jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v) * v), argnums=(0, 1, 2)))
    jax.block_until_ready(fwd(q, k, v))
    jax.block_until_ready(grad(q, k, v))
    fns[name] = (fwd, grad)
  ref = np.asarray(fns["jax.nn.dot_product_attention"][0](q, k, v))
  best = {name: [float("inf"), float("inf")] for name in fns}
  for _ in range(rounds):
    for name, pair in fns.items():
      for i, fn in enumerate(pair):
        best[name][i] = min(best[name][i], _timed(fn, q, k, v))
  rows = {name: {"fwd_ms": t[0] * 1e3, "fwd_bwd_ms": t[1] * 1e3,
                 "max_abs_diff": float(np.max(np.abs(np.asarray(fns[name][0](q, k, v)) - ref)))}
          for name, t in best.items()}
  peer = _torch_times(q, k, v, rounds)
  if peer:
    rows["torch scaled_dot_product_attention"] = peer
  return {"shape": "x".join(map(str, shape)), "variants": rows}


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--shapes", default="8x1024x8x32,8x256x16x32,8x64x32x32")
  parser.add_argument("--block_kib", default="256,1024,4096")
  parser.add_argument("--rounds", type=int, default=4)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  block_kib = [int(b) for b in args.block_kib.split(",") if b]
  results = {"backend": jax.default_backend(), "jax": jax.__version__, "shapes": []}
  for text in args.shapes.split(","):
    shape = tuple(int(d) for d in text.split("x"))
    result = run_shape(shape, block_kib, args.rounds)
    results["shapes"].append(result)
    for name, row in result["variants"].items():
      print(f"{result['shape']:>14s}  {name:36s} fwd {row['fwd_ms']:8.1f} ms  "
            f"fwd+bwd {row['fwd_bwd_ms']:8.1f} ms", flush=True)
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
