"""What the accelerator benchmarks share: the ImageNet LDM and KL-f8 autoencoder configs (or tiny
stand-ins for CPU smoke runs), the remat and attention switches, a first stage with random
weights, and the facts about the machine every JSON result records.

The configs are the repo's own experiment files (configs/ldm_kl8_imagenet.py,
configs/ae_kl8_imagenet.py); `--tiny` shrinks their widths and depths, not their structure.
"""
from __future__ import annotations

import importlib.util
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from ldm_jax.first_stage import FirstStage
from ldm_jax.models.attention import cudnn_unfit_reason
from ldm_jax.models.build import build_autoencoder

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
LDM_CONFIG = os.path.join(ROOT, "configs", "ldm_kl8_imagenet.py")
AE_CONFIG = os.path.join(ROOT, "configs", "ae_kl8_imagenet.py")
REMAT = ("none", "full", "block", "save_dots")
ATTENTION = ("auto", "xla", "cudnn")
IMAGENET_CLASSES = 1000
TINY_CLASSES = 10
TINY_IMAGE_SIZE = 32


def load_config(path: str):
  spec = importlib.util.spec_from_file_location("ldm_jax_benchmark_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def attention_resolved(impl: str, dtype: str, head_dim: int) -> str:
  """What an attention_impl runs here: 'auto' resolved the way the library does
  (ldm_jax.models.attention.cudnn_unfit_reason), else as given; the library itself falls back
  from 'cudnn' where the kernel cannot run, and warns once."""
  if impl != "auto":
    return impl
  q = jax.ShapeDtypeStruct((1, 1, 1, head_dim), jnp.dtype(dtype))
  reason = cudnn_unfit_reason(q, q)
  return "cudnn" if reason is None else f"xla ({reason})"


def ldm_config(*, dtype: str, remat: str, attention: str, tiny: bool, image_size: int):
  """configs/ldm_kl8_imagenet.py (class context, 32x32x4 latents at 256 px), or a tiny one."""
  c = load_config(LDM_CONFIG)
  c.train.compute_dtype = dtype
  c.data.image_size = image_size
  c.cond.num_classes = TINY_CLASSES if tiny else IMAGENET_CLASSES
  if tiny:
    c.unet.model_channels, c.unet.channel_mult, c.unet.num_res_blocks = 32, (1, 2), 1
    c.unet.attention_resolutions, c.unet.num_head_channels = (2,), 16
    c.cond.embed_dim = 32
  c.unet.remat, c.unet.attention_impl = remat, attention
  return c


def ae_config(*, dtype: str, remat: str, attention: str, tiny: bool, image_size: int,
              notes: list):
  """configs/ae_kl8_imagenet.py with the GAN on from step 0 and no gradient accumulation (the
  benchmark times one full update per batch), or a tiny one."""
  c = load_config(AE_CONFIG)
  c.train.compute_dtype = dtype
  c.data.image_size = image_size
  c.train.grad_accum = 1
  c.loss.disc_start = 0
  if tiny:
    c.model.ch, c.model.ch_mult, c.model.num_res_blocks = 32, (1, 1, 2, 2), 1
    c.disc.base_channels, c.disc.num_layers = 32, 2
  c.model.remat = remat
  if attention != "auto":
    notes.append(f"the autoencoder config has no attention_impl: its mid-block attention ran "
                 f"the library's default, not {attention!r}")
  return c


def random_first_stage(config, dtype, rng=None) -> FirstStage:
  """The autoencoder of a stage-1 config as a FirstStage; random weights when `rng` is given,
  else no variables (enough for a stage-2 step on precomputed latents)."""
  module = build_autoencoder(config.model, image_size=config.data.image_size,
                             channels=config.data.channels, dtype=dtype)
  variables = {}
  if rng is not None:
    size = config.data.image_size
    x = jnp.zeros((1, size, size, config.data.channels))
    variables = jax.jit(lambda r: module.init({"params": r, "sample": r}, x))(rng)
    variables = {"params": fill_zero_kernels(variables["params"], rng)}
  return FirstStage(module, variables, config, "random weights (benchmark)")


def fill_zero_kernels(params, rng):
  """Zero-initialised kernels (output convs, attention projections) redrawn as N(0, 1/fan_in),
  so a freshly initialised network computes something other than zeros."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  out = []
  for i, leaf in enumerate(leaves):
    if leaf.ndim >= 2 and not np.any(np.asarray(leaf)):
      fan_in = int(np.prod(leaf.shape[:-1]))
      leaf = jax.random.normal(jax.random.fold_in(rng, i), leaf.shape, leaf.dtype) / np.sqrt(
          fan_in)
    out.append(leaf)
  return jax.tree_util.tree_unflatten(treedef, out)


def environment() -> dict:
  devices = jax.devices()
  return {"device": str(devices[0].device_kind), "backend": jax.default_backend(),
          "devices": len(devices), "jax": jax.__version__,
          "jaxlib": jaxlib.__version__,
          "python": platform.python_version(), "host_cpu": host_cpu()}


def host_cpu() -> str:
  """The host's CPU model, family and core count: this project's 2-core VMs are not all the
  same processor, so CPU timings from different days compare only on the same one."""
  fields = {}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
  except OSError:
    pass
  name = fields.get("model name") or platform.processor() or platform.machine()
  family = (f", family {fields['cpu family']} model {fields.get('model', '?')}"
            if "cpu family" in fields else "")
  return f"{name}{family}, {os.cpu_count()} cores"


def alternate(fns: dict, repeats: int) -> dict[str, list[float]]:
  """Each function's seconds over `repeats` rounds in which they take turns, so all see the same
  machine load (a 2-core VM's speed drifts by 10% from minute to minute). Each turn calls its
  function twice and times the second call: on the CPU a call right after another program's
  runs slower, which no loop of one program sees (benchmarks/conv.py's two UNets, whose
  forwards are the same program, read 0.88x timed call after call and 0.98x this way)."""
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      fn()
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return times


def medians(times: dict[str, list[float]]) -> dict[str, float]:
  return {name: statistics.median(v) for name, v in times.items()}


def peak_bytes() -> int | None:
  """The first device's peak_bytes_in_use (the process's peak so far), when the backend has it."""
  stats = jax.devices()[0].memory_stats() or {}
  value = stats.get("peak_bytes_in_use")
  return int(value) if value is not None else None


def compiled_bytes(compiled) -> dict | None:
  """XLA's static memory plan of a compiled program (per device), in bytes."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  (not every backend implements it)
    return None
  if m is None:
    return None
  out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias",
                                                              "temp")}
  out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out


def peak_flops(peak_tflops: float | None) -> float | None:
  """Peak FLOP/s per device for MFU: --peak_tflops, else 989 TFLOP/s (H100 SXM / H200 dense
  bf16) on a GPU, else None (no MFU on a CPU)."""
  if peak_tflops is None and jax.default_backend() == "gpu":
    peak_tflops = 989.0
  return None if peak_tflops is None else peak_tflops * 1e12


def write_json(path: str, obj):
  if not path:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write(json.dumps(obj, indent=1) + "\n")
