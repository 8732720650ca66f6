"""Sampling throughput: the lax.scan DDIM sampler against a Python loop of jitted steps.

  python benchmarks/sampling.py [--model=tiny|imagenet] [--batch=16] [--steps=50]

The peer is the same DDIM update driven from Python, one jitted call per step (how the PyTorch
reference runs its sampler); both run the same UNet with the same weights in this process. It
prints samples/s of both, their ratio, and how many programs each compiled. Absolute figures
are only meaningful on the machine they were measured on; see benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ldm_jax.diffusion import process, samplers  # noqa: E402
from ldm_jax.diffusion.schedules import make_beta_schedule, schedule_from_betas  # noqa: E402
from ldm_jax.models.unet import UNet  # noqa: E402

MODELS = {
    # configs/tiny_ldm.py's UNet on 8x8x3 latents (32 px images, f = 4), class context.
    "tiny": dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                 attention_resolutions=(2,), num_head_channels=16, latent=(8, 8, 3),
                 context_dim=32),
    # configs/ldm_kl8_imagenet.py's UNet (395M) on 32x32x4 latents.
    "imagenet": dict(model_channels=256, channel_mult=(1, 2, 4), num_res_blocks=2,
                     attention_resolutions=(4, 2, 1), num_head_channels=32, latent=(32, 32, 4),
                     context_dim=512),
}


def build(name, dtype):
  m = dict(MODELS[name])
  h, w, c = m.pop("latent")
  context_dim = m.pop("context_dim")
  unet = UNet(in_channels=c, out_channels=c, use_spatial_transformer=True, dtype=dtype, **m)
  params = jax.jit(unet.init)(jax.random.PRNGKey(0), jnp.zeros((1, h, w, c)),
                              jnp.zeros((1,), jnp.int32), jnp.zeros((1, 1, context_dim)))
  return unet, params, (h, w, c), context_dim


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="tiny", choices=sorted(MODELS))
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  args = parser.parse_args()
  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  unet, params, shape, context_dim = build(args.model, dtype)
  schedule = schedule_from_betas(make_beta_schedule("linear", 1000, 0.0015, 0.0195))
  context = jax.random.normal(jax.random.PRNGKey(1), (args.batch, 1, context_dim))
  model_fn = lambda x, t, ctx: unet.apply(params, x, t, ctx)  # noqa: E731

  scan_fn = jax.jit(lambda x, ctx: samplers.ddim_sample(
      model_fn, schedule, x, ctx, jax.random.PRNGKey(0), steps=args.steps))

  ts = samplers.ddim_timesteps(1000, args.steps)
  alphas, alphas_prev, _ = samplers.ddim_alphas(schedule.alphas_cumprod, ts, 0.0)

  @jax.jit
  def loop_step(x, ctx, t, a, a_prev):
    tb = jnp.full((x.shape[0],), t)
    eps = model_fn(x, tb, ctx)
    x0 = process.predict_x0(schedule, eps, x, tb, "eps")
    return jnp.sqrt(a_prev) * x0 + jnp.sqrt(1 - a_prev) * eps

  def loop_fn(x, ctx):
    for i in reversed(range(len(ts))):
      x = loop_step(x, ctx, int(ts[i]), float(alphas[i]), float(alphas_prev[i]))
    return x

  def timed(fn, seeds):
    outs, start = [], time.perf_counter()
    for seed in seeds:
      x = jax.random.normal(jax.random.PRNGKey(seed), (args.batch,) + shape)
      outs.append(fn(x, context))
    jax.block_until_ready(outs)
    return args.batch * len(seeds) / (time.perf_counter() - start), outs

  timed(scan_fn, [100])   # compile
  timed(loop_fn, [100])
  scan_rate, scan_out = timed(scan_fn, range(args.repeats))
  loop_rate, loop_out = timed(loop_fn, range(args.repeats))
  diff = float(jnp.max(jnp.abs(scan_out[0] - loop_out[0])))
  result = {
      "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
      "model": args.model, "batch": args.batch, "steps": args.steps, "dtype": args.dtype,
      "scan_samples_per_sec": round(scan_rate, 3), "loop_samples_per_sec": round(loop_rate, 3),
      "scan_over_loop": round(scan_rate / loop_rate, 3),
      "scan_compilations": scan_fn._cache_size(),  # pylint: disable=protected-access
      "loop_compilations": loop_step._cache_size(),  # pylint: disable=protected-access
      "max_abs_difference": diff,
  }
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
