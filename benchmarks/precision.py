"""How far the bfloat16 UNet (with the fast attention kernel) is from the float32 one.

  python benchmarks/precision.py [--batch=8] [--attention=auto|xla|cudnn] [--tiny] [--out=x.json]

configs/ldm_kl8_imagenet.py's UNet forward (class context, one token) on the same latents,
timesteps, labels and float32 weights three ways: float32 with XLA attention (the reference),
bfloat16 with XLA attention, and bfloat16 with --attention ('auto': cuDNN on a GPU). Prints the
max / mean absolute error of each against the reference, the relative L2 error
(||out - ref|| / ||ref||) and the max absolute error over the reference's max magnitude, and
the same between the two bfloat16 runs (what the attention kernel adds). Weights are random,
with the zero-initialised output layers redrawn so the network's output is not zero.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks import models  # noqa: E402
from ldm_jax.ldm import LatentDiffusion  # noqa: E402


def errors(out, ref) -> dict:
  out, ref = out.astype(jnp.float32), ref.astype(jnp.float32)
  diff = jnp.abs(out - ref)
  return {"max_abs": float(jnp.max(diff)), "mean_abs": float(jnp.mean(diff)),
          "relative_l2": float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)),
          "max_abs_over_max_ref": float(jnp.max(diff) / jnp.max(jnp.abs(ref))),
          "finite": bool(jnp.all(jnp.isfinite(out)))}


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--attention", default="auto", choices=models.ATTENTION,
                      help="attention of the bfloat16 run under test")
  parser.add_argument("--image_size", type=int, default=0,
                      help="pixels (latents are 1/8): 0 = 256, or 32 with --tiny")
  parser.add_argument("--tiny", action="store_true", help="shrunk UNet for a CPU smoke run")
  parser.add_argument("--out", default="", help="also write the JSON here")
  args = parser.parse_args()
  size = args.image_size or (models.TINY_IMAGE_SIZE if args.tiny else 256)
  notes = []
  variants = {"float32_xla": ("float32", "xla"), "bfloat16_xla": ("bfloat16", "xla"),
              f"bfloat16_{args.attention}": ("bfloat16", args.attention)}
  kw = dict(remat="none", tiny=args.tiny, image_size=size)
  first = models.random_first_stage(
      models.ae_config(dtype="float32", attention="xla", notes=[], **kw), jnp.float32)
  ldms, impls = {}, {}
  for name, (dtype, attention) in variants.items():
    config = models.ldm_config(dtype=dtype, attention=attention, **kw)
    ldms[name] = LatentDiffusion(config, first, num_classes=config.cond.num_classes)
    impls[name] = models.attention_resolved(config.unet.attention_impl, dtype,
                                            config.unet.num_head_channels)
  ref = ldms["float32_xla"]
  params = jax.jit(ref.init_params)(jax.random.PRNGKey(0), ref.dummy_batch(1))
  params = models.fill_zero_kernels(params, jax.random.PRNGKey(1))
  keys = jax.random.split(jax.random.PRNGKey(2), 3)
  z = jax.random.normal(keys[0], ref.latent_shape(args.batch))
  t = jax.random.randint(keys[1], (args.batch,), 0, ref.schedule.num_timesteps)
  labels = jax.random.randint(keys[2], (args.batch,), 0, ref.num_classes)

  def forward(ldm):
    def fn(p, z, t, labels):
      keep = jnp.zeros((z.shape[0],), bool)
      cond = ldm.conditions(p, {"label": labels}, {}, keep, 1.0)
      return ldm.model_fn(p)(z, t, cond)
    return jax.jit(fn)

  outs = {name: forward(ldm)(params, z, t, labels) for name, ldm in ldms.items()}
  test = f"bfloat16_{args.attention}"
  result = {
      "model": "tiny" if args.tiny else "ldm_kl8_imagenet UNet", "batch": args.batch,
      "latent_shape": list(z.shape[1:]), "attention_impl": impls,
      "reference_rms": float(jnp.sqrt(jnp.mean(jnp.square(outs["float32_xla"])))),
      "bfloat16_xla_vs_float32_xla": errors(outs["bfloat16_xla"], outs["float32_xla"]),
  }
  if test != "bfloat16_xla":   # with --attention=xla the variant under test is that one
    result[f"{test}_vs_float32_xla"] = errors(outs[test], outs["float32_xla"])
    result[f"{test}_vs_bfloat16_xla"] = errors(outs[test], outs["bfloat16_xla"])
  result.update(notes=sorted(set(notes)), **models.environment())
  print(json.dumps(result, indent=2))
  models.write_json(args.out, result)


if __name__ == "__main__":
  main()
