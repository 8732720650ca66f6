"""Sampling throughput.

  python benchmarks/sampling.py --model=tiny [--batch=16] [--steps=50] [--attention=xla]
  python benchmarks/sampling.py --model=imagenet [--batch=64] [--dtype=bfloat16]
      [--attention=auto|xla|cudnn] [--guidance=1.5] [--tiny] [--out=result.json]

--model=tiny: the lax.scan DDIM sampler against a Python loop of jitted steps. The peer is the
same DDIM update driven from Python, one jitted call per step (how the PyTorch reference runs
its sampler); both run the same UNet with the same weights in this process. It prints samples/s
of both, their ratio, and how many programs each compiled.

--model=imagenet: end to end, the way sample.py generates: configs/ldm_kl8_imagenet.py's UNet
(395M) runs --steps of DDIM (eta 0) with classifier-free guidance (the null class batched with
the real ones in one UNet call per step, LatentDiffusion.generate), then the KL-f8 decoder of
configs/ae_kl8_imagenet.py turns the 32x32x4 latents into 256 px images; random weights. It
reports samples/s of the whole program, its compile time apart, model FLOPs per sample
(benchmarks/flops.py) and MFU. --tiny shrinks both networks for a CPU smoke run.

Absolute figures are only meaningful on the machine they were measured on; see
benchmarks/RESULTS.md.
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

from benchmarks import flops, models  # noqa: E402
from ldm_jax.diffusion import process, samplers  # noqa: E402
from ldm_jax.diffusion.schedules import make_beta_schedule, schedule_from_betas  # noqa: E402
from ldm_jax.ldm import LatentDiffusion, SampleSettings  # noqa: E402
from ldm_jax.models.build import dtype_of  # noqa: E402
from ldm_jax.models.unet import UNet  # noqa: E402

MODELS = {
    # configs/tiny_ldm.py's UNet on 8x8x3 latents (32 px images, f = 4), class context.
    "tiny": dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                 attention_resolutions=(2,), num_head_channels=16, latent=(8, 8, 3),
                 context_dim=32),
}


def build(name, dtype, attention_impl=None):
  m = dict(MODELS[name])
  h, w, c = m.pop("latent")
  context_dim = m.pop("context_dim")
  unet = UNet(in_channels=c, out_channels=c, use_spatial_transformer=True, dtype=dtype,
              attention_impl=attention_impl, **m)
  params = jax.jit(unet.init)(jax.random.PRNGKey(0), jnp.zeros((1, h, w, c)),
                              jnp.zeros((1,), jnp.int32), jnp.zeros((1, 1, context_dim)))
  return unet, params, (h, w, c), context_dim


def build_ldm(args, attention: str, first=None):
  """The ImageNet LDM (or its tiny stand-in) on a KL-f8 first stage with random weights."""
  size = args.image_size or (models.TINY_IMAGE_SIZE if args.tiny else 256)
  kw = dict(dtype=args.dtype, remat="none", attention=attention, tiny=args.tiny,
            image_size=size)
  config = models.ldm_config(**kw)
  config.sample.sampler, config.sample.eta = "ddim", 0.0
  first = first or models.random_first_stage(models.ae_config(notes=[], **kw),
                                             dtype_of(args.dtype), jax.random.PRNGKey(1))
  return LatentDiffusion(config, first, num_classes=config.cond.num_classes)


def end_to_end(args) -> dict:
  """Guided DDIM + decoding of --batch samples per call: samples/s, compile time, FLOPs."""
  notes = []
  ldm = build_ldm(args, args.attention)
  params = jax.jit(ldm.init_params)(jax.random.PRNGKey(0), ldm.dummy_batch(1))
  params = models.fill_zero_kernels(params, jax.random.PRNGKey(2))
  frozen = ldm.first.variables
  settings = SampleSettings(sampler="ddim", steps=args.steps, eta=0.0,
                            guidance_scale=args.guidance)

  def generate(model, p, ae, key, indices, labels):
    return model.generate(p, ae, 1.0, key, indices, {"label": labels}, settings)

  fn = jax.jit(lambda *a: generate(ldm, *a))
  labels = jax.random.randint(jax.random.PRNGKey(3), (args.batch,), 0, ldm.num_classes)
  call = lambda r: (params, frozen, jax.random.PRNGKey(r),  # noqa: E731
                    jnp.arange(args.batch) + r * args.batch, labels)
  start = time.perf_counter()
  lowered = fn.lower(*call(0))
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - lowered_at
  images = jax.block_until_ready(compiled(*call(0)))   # untimed: first run
  t = time.perf_counter()
  outs = [compiled(*call(r + 1)) for r in range(args.repeats)]
  jax.block_until_ready(outs)
  seconds = (time.perf_counter() - t) / args.repeats
  # Model FLOPs: the same program traced with XLA attention (a cuDNN kernel is opaque).
  xla_ldm = ldm
  if ldm.config.unet.attention_impl != "xla":
    xla_ldm = build_ldm(args, "xla", ldm.first)
  count = flops.count(lambda *a: generate(xla_ldm, *a), *call(0))
  counted = count["total"] / args.batch
  xla = flops.xla_flops(compiled)
  rate = args.batch / seconds
  peak = models.peak_flops(args.peak_tflops)
  return {
      "model": "imagenet", "tiny": args.tiny, "batch": args.batch, "steps": args.steps,
      "guidance": args.guidance, "sampler": "ddim (eta 0), guided batch of 2 x batch per step",
      "image_shape": list(images.shape[1:]), "dtype": args.dtype, "attention": args.attention,
      "attention_impl": models.attention_resolved(ldm.config.unet.attention_impl, args.dtype,
                                                  ldm.config.unet.num_head_channels),
      "lower_s": round(lowered_at - start, 2), "compile_s": round(compile_s, 2),
      "repeats": args.repeats, "seconds_per_batch": seconds, "samples_per_sec": rate,
      "all_finite": bool(all(jnp.all(jnp.isfinite(o)) for o in outs)),
      "flops_per_sample": counted,
      "xla_flops_per_sample": None if xla is None else xla / args.batch,
      # XLA counts the sampling loop's body once: compare with the same count of ours.
      "model_over_xla": None if not xla else count["total_loop_bodies_once"] / xla,
      "achieved_tflops": counted * rate / 1e12,
      "peak_tflops": None if peak is None else peak / 1e12,
      "mfu": None if peak is None else counted * rate / peak,
      "peak_bytes_in_use": models.peak_bytes(), "compiled_bytes": models.compiled_bytes(compiled),
      "notes": notes + ["one device"], **models.environment(),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="tiny", choices=("tiny", "imagenet"))
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--attention", default="xla", choices=models.ATTENTION,
                      help="the UNet's attention_impl ('auto': cuDNN for bfloat16 on a GPU)")
  parser.add_argument("--guidance", type=float, default=1.5, help="imagenet: guidance scale")
  parser.add_argument("--image_size", type=int, default=0,
                      help="imagenet: pixels (0 = 256, or 32 with --tiny)")
  parser.add_argument("--tiny", action="store_true", help="imagenet: shrunk networks (CPU)")
  parser.add_argument("--peak_tflops", type=float, default=None,
                      help="imagenet: peak TFLOP/s for MFU (default 989 on a GPU)")
  parser.add_argument("--out", default="", help="also write the JSON here")
  args = parser.parse_args()
  if args.model == "imagenet":
    result = end_to_end(args)
    print(json.dumps(result, indent=2))
    models.write_json(args.out, result)
    return
  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  notes = []
  impl = args.attention
  unet, params, shape, context_dim = build(args.model, dtype, impl)
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
      "max_abs_difference": diff, "attention_impl": impl, "notes": notes,
  }
  print(json.dumps(result, indent=2))
  models.write_json(args.out, result)


if __name__ == "__main__":
  main()
