"""ldm_jax against diffusers (PyTorch) on the same UNet with the same weights, in one process.

  python benchmarks/vs_pytorch.py [--model=imagenet|small] [--batch=8] [--sample_batch=4]
      [--steps=50] [--repeats=3] [--skip=train|sample] [--out=vs_pytorch.json]

Two cases, both float32 on the default JAX backend and on torch's CPU:
  train: one forward + backward of the UNet (MSE of its output against a fixed target, gradients
         of every parameter), batch --batch;
  sample: an unguided --steps-step DDIM trajectory of the UNet alone (no decoding), batch
         --sample_batch; ldm_jax's lax.scan sampler against a Python loop over the torch UNet.
The UNet is diffusers' UNet2DConditionModel built from ldm_jax's config of it, with diffusers'
random initialisation, saved by diffusers and loaded through ldm_jax.interop, so both run the
same weights (the script checks their outputs agree before timing). torch and diffusers are
needed at run time only; they are no dependency of ldm_jax. The two take turns, --repeats rounds
of two calls each, the second timed. Prints and writes the median times, their ratio ldm_jax /
diffusers (below 1: ldm_jax is faster) and each round's ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.models import alternate, host_cpu, medians  # noqa: E402
from ldm_jax.diffusion import samplers  # noqa: E402
from ldm_jax.diffusion.schedules import make_beta_schedule, schedule_from_betas  # noqa: E402
from ldm_jax.interop.diffusers import diffusers_unet_config, load_diffusers_unet  # noqa: E402
from ldm_jax.models.unet import UNet  # noqa: E402

MODELS = {
    # configs/ldm_kl8_imagenet.py's UNet (395M parameters) on 32x32x4 latents, one 512-d token.
    "imagenet": dict(model_channels=256, channel_mult=(1, 2, 4), num_res_blocks=2,
                     attention_resolutions=(4, 2, 1), num_head_channels=32),
    # The same layout at a quarter of the width, for quick runs.
    "small": dict(model_channels=64, channel_mult=(1, 2, 4), num_res_blocks=2,
                  attention_resolutions=(4, 2, 1), num_head_channels=32),
}
LATENT, CONTEXT = (32, 32, 4), 512


def _alternate(jax_fn, torch_fn, repeats: int) -> dict:
  """Median seconds of each (models.alternate: turns, second call timed) and each round's ratio."""
  times = alternate({"ldm_jax": jax_fn, "diffusers": torch_fn}, repeats)
  jax_s, torch_s = medians(times).values()
  return {"ldm_jax_s": jax_s, "diffusers_s": torch_s, "ratio": jax_s / torch_s,
          "round_ratios": [round(a / b, 4) for a, b in zip(*times.values())]}


def build_pair(name: str, folder: str, attention_impl: str | None):
  """(torch UNet, ldm_jax UNet module, its variables) with the same random weights."""
  import torch
  from diffusers import UNet2DConditionModel
  module = UNet(in_channels=LATENT[2], out_channels=LATENT[2], use_spatial_transformer=True,
                attention_impl=attention_impl, **MODELS[name])
  config = diffusers_unet_config(module, CONTEXT, sample_size=LATENT[0])
  config = {k: v for k, v in config.items() if not k.startswith("_")}
  torch.manual_seed(0)
  peer = UNet2DConditionModel(**config)
  # diffusers zero-initialises no output layer; keep its init (non-trivial gradients everywhere).
  peer.save_pretrained(folder, safe_serialization=True)
  loaded, variables = load_diffusers_unet(folder)
  module = module.clone(**{f: getattr(loaded, f) for f in ("num_heads", "num_head_channels")})
  return peer, module, variables


def inputs(batch: int, seed: int):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch,) + LATENT).astype(np.float32)
  t = rng.integers(0, 1000, (batch,)).astype(np.int64)
  ctx = rng.standard_normal((batch, 1, CONTEXT)).astype(np.float32)
  return x, t, ctx


def check_same(peer, module, variables, batch: int = 2) -> float:
  """Relative max difference of the two UNets' outputs on one batch."""
  import torch
  x, t, ctx = inputs(batch, 1)
  with torch.no_grad():
    want = peer(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                torch.from_numpy(ctx)).sample.numpy().transpose(0, 2, 3, 1)
  got = np.asarray(module.apply(variables, x, t, ctx))
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def time_train(peer, module, variables, batch: int, repeats: int) -> dict:
  import torch
  x, t, ctx = inputs(batch, 2)
  target = np.random.default_rng(3).standard_normal(x.shape).astype(np.float32)

  def loss(params):
    out = module.apply({"params": params}, x, t, ctx)
    return jnp.mean((out - target) ** 2)

  grad = jax.jit(jax.grad(loss))
  start = time.perf_counter()
  jax.block_until_ready(grad(variables["params"]))
  compile_s = time.perf_counter() - start

  xt, tt, ct = (torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                torch.from_numpy(ctx))
  target_t = torch.from_numpy(target.transpose(0, 3, 1, 2))

  def torch_step():
    peer.zero_grad(set_to_none=True)
    out = peer(xt, tt, ct).sample
    torch.mean((out - target_t) ** 2).backward()

  peer.train()
  torch_step()                                                  # warm-up
  timed = _alternate(lambda: jax.block_until_ready(grad(variables["params"])), torch_step,
                     repeats)
  return {"batch": batch, **timed, "ldm_jax_compile_s": compile_s}


def time_sample(peer, module, variables, batch: int, steps: int, repeats: int) -> dict:
  import torch
  schedule = schedule_from_betas(make_beta_schedule("linear", 1000, 0.0015, 0.0195))
  x, _, ctx = inputs(batch, 4)
  fn = jax.jit(lambda v, x, c: samplers.ddim_sample(
      lambda x, t, c: module.apply(v, x, t, c), schedule, x, c, jax.random.PRNGKey(0),
      steps=steps))
  start = time.perf_counter()
  jax_out = np.asarray(fn(variables, x, ctx))
  compile_s = time.perf_counter() - start

  ts = samplers.ddim_timesteps(1000, steps)
  alphas, alphas_prev, _ = samplers.ddim_alphas(schedule.alphas_cumprod, ts, 0.0)
  alphas, alphas_prev = np.asarray(alphas), np.asarray(alphas_prev)
  ct = torch.from_numpy(ctx)

  @torch.no_grad()
  def torch_sample():
    z = torch.from_numpy(x.transpose(0, 3, 1, 2))
    for i in reversed(range(len(ts))):
      t = torch.full((batch,), int(ts[i]), dtype=torch.int64)
      eps = peer(z, t, ct).sample
      a, a_prev = float(alphas[i]), float(alphas_prev[i])
      x0 = (z - (1 - a) ** 0.5 * eps) / a ** 0.5
      z = a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps
    return z.numpy().transpose(0, 2, 3, 1)

  peer.eval()
  torch_out = torch_sample()
  timed = _alternate(lambda: jax.block_until_ready(fn(variables, x, ctx)), torch_sample,
                     repeats)
  diff = float(np.max(np.abs(jax_out - torch_out)) / np.max(np.abs(torch_out)))
  return {"batch": batch, "steps": steps, **timed, "ldm_jax_compile_s": compile_s,
          "trajectory_rel_diff": diff}


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="imagenet", choices=sorted(MODELS))
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--sample_batch", type=int, default=4)
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--skip", choices=("train", "sample"), default=None)
  parser.add_argument("--attention", default="auto", choices=("auto", "xla", "cudnn"))
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  try:
    import diffusers
    import torch
  except ImportError:
    sys.exit("vs_pytorch.py needs torch and diffusers installed (they are no dependency of "
             "ldm_jax): pip install torch diffusers")
  result = {"model": args.model, "backend": jax.default_backend(),
            "jax": jax.__version__, "torch": torch.__version__,
            "diffusers": diffusers.__version__, "torch_threads": torch.get_num_threads(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "host_cpu": host_cpu()}
  with tempfile.TemporaryDirectory() as folder:
    peer, module, variables = build_pair(args.model, folder, args.attention)
  result["output_rel_diff"] = check_same(peer, module, variables)
  print(f"outputs agree to {result['output_rel_diff']:.2e} (relative max difference)",
        flush=True)
  if args.skip != "train":
    result["train"] = time_train(peer, module, variables, args.batch, args.repeats)
    print("train fwd+bwd:", json.dumps(result["train"]), flush=True)
  if args.skip != "sample":
    result["sample"] = time_sample(peer, module, variables, args.sample_batch, args.steps,
                                   args.repeats)
    print("DDIM sampling:", json.dumps(result["sample"]), flush=True)
  print(json.dumps(result))
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
