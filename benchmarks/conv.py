"""3x3 convolutions on the CPU: XLA's convolution against the same convolution written as
matmuls (im2col: the 9 shifted copies of the input side by side, one (9C, C') matmul; and
shifted: 9 (C, C') matmuls summed), and ldm_jax's CPU conv (models/cpu_conv.py: under Eigen's
kernels, the default, im2col on maps of at most 2x2 outputs and XLA's elsewhere; under
YNNPACK's, chosen through XLA_FLAGS (ldm_jax/xla_cpu.py), im2col's gradients and its forward
on maps of 8x8 or smaller), forward and forward+backward.

  python benchmarks/conv.py [--repeats=5] [--json=out.json]
  python benchmarks/conv.py --unet=imagenet [--batch=8] [--repeats=3]

The second form times one fwd+bwd and one forward of a whole UNet (vs_pytorch.py's models) with
XLA's convolution and with ldm_jax's CPU conv, compiled in one process and timed in alternation,
so both see the same machine load.

Why: convolutions were 57% of the ImageNet UNet's fwd+bwd time on this CPU, and XLA's CPU
convolution ran slower than torch's oneDNN one (benchmarks/RESULTS.md). A formulation that XLA
turns into its (faster) dot kernels would close part of the gap. Prints ms per call, best of
`repeats`, and each variant's time relative to XLA's convolution.
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

from ldm_jax.models import cpu_conv

SHAPES = ((8, 32, 32, 256, 256), (8, 16, 16, 512, 512), (8, 8, 8, 1024, 1024),
          (4, 8, 8, 1024, 1024), (8, 4, 4, 1024, 1024), (8, 32, 32, 4, 256))


def conv_xla(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _shifts(x):
  p = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  h, w = x.shape[1:3]
  return [p[:, i:i + h, j:j + w] for i in range(3) for j in range(3)]


def conv_im2col(x, w):
  return cpu_conv.patch_matmul(x, w, ((1, 1), (1, 1)))


def conv_shifted(x, w):
  taps = w.reshape(9, w.shape[2], w.shape[3])
  return sum(jnp.einsum("bhwc,co->bhwo", s, taps[k]) for k, s in enumerate(_shifts(x)))


def conv_ldm(x, w):
  return cpu_conv.conv_general_dilated(x, w, (1, 1), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))


VARIANTS = {"xla": conv_xla, "im2col": conv_im2col, "shifted": conv_shifted, "ldm_jax": conv_ldm}


def _time(fn, args, repeats):
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t0)
  return best * 1e3


def unet_ab(name: str, batch: int, repeats: int) -> dict:
  """Median fwd+bwd and forward seconds of the UNet with XLA's convolution and with cpu_conv's,
  taking turns (models.alternate; fwd+bwd compile time reported)."""
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
  from benchmarks.models import alternate, medians  # pylint: disable=g-import-not-at-top
  from benchmarks.vs_pytorch import CONTEXT, LATENT, MODELS  # pylint: disable=g-import-not-at-top
  from ldm_jax.models.unet import UNet  # pylint: disable=g-import-not-at-top
  module = UNet(in_channels=LATENT[2], out_channels=LATENT[2], use_spatial_transformer=True,
                **MODELS[name])
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch,) + LATENT), jnp.float32)
  t = jnp.asarray(rng.integers(0, 1000, (batch,)))
  ctx = jnp.asarray(rng.standard_normal((batch, 1, CONTEXT)), jnp.float32)
  params = jax.jit(module.init)(jax.random.PRNGKey(0), x, t, ctx)

  def compiled(use_cpu_conv: bool):
    original = cpu_conv.for_backend
    if not use_cpu_conv:
      cpu_conv.for_backend = lambda: None      # traced now: XLA's own convolution
    try:
      grad = jax.jit(jax.grad(lambda p: jnp.mean(module.apply(p, x, t, ctx) ** 2)))
      fwd = jax.jit(lambda p: module.apply(p, x, t, ctx))
      start = time.perf_counter()
      grad = grad.lower(params).compile()
      seconds = time.perf_counter() - start
      return {"": grad, "_fwd": fwd.lower(params).compile()}, seconds   # by result-key suffix
    finally:
      cpu_conv.for_backend = original

  fns = {"xla": compiled(False), "ldm_jax": compiled(True)}
  calls = {f"{k}{part}_s": lambda f=fn[part]: jax.block_until_ready(f(params))
           for part in ("", "_fwd") for k, (fn, _) in fns.items()}
  out = {"model": name, "batch": batch, "repeats": repeats,
         **medians(alternate(calls, repeats)),
         **{f"{k}_compile_s": c for k, (_, c) in fns.items()}}
  out["fwd_ratio"] = out["ldm_jax_fwd_s"] / out["xla_fwd_s"]
  out["ratio"] = out["ldm_jax_s"] / out["xla_s"]
  print(json.dumps(out), flush=True)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--json", default="")
  parser.add_argument("--unet", default="", help="imagenet|small: the whole-UNet A/B instead")
  parser.add_argument("--batch", type=int, default=8)
  args = parser.parse_args()
  if args.unet:
    result = unet_ab(args.unet, args.batch, args.repeats)
    if args.json:
      with open(args.json, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    return
  rows = []
  for b, h, w, c, o in SHAPES:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(b, h, w, c)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(3, 3, c, o)) / np.sqrt(9 * c), jnp.float32)
    ref = conv_xla(x, k)
    row = {"shape": f"{b}x{h}x{w}x{c}->{o}"}
    for name, fn in VARIANTS.items():
      err = float(jnp.max(jnp.abs(fn(x, k) - ref)) / jnp.max(jnp.abs(ref)))
      fwd = jax.jit(fn)
      both = jax.jit(jax.value_and_grad(lambda a, b_, f=fn: jnp.sum(f(a, b_) ** 2),
                                        argnums=(0, 1)))
      row[name] = {"fwd_ms": _time(fwd, (x, k), args.repeats),
                   "fwd_bwd_ms": _time(both, (x, k), args.repeats), "rel_err": err}
    rows.append(row)
    base = row["xla"]
    print(row["shape"] + "  " + "  ".join(
        f"{n}: {row[n]['fwd_ms']:.1f}/{row[n]['fwd_bwd_ms']:.1f} ms "
        f"({row[n]['fwd_bwd_ms'] / base['fwd_bwd_ms']:.2f}x)" for n in VARIANTS), flush=True)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"devices": str(jax.devices()), "rows": rows}, f, indent=2)


if __name__ == "__main__":
  main()
