"""Where the CPU time of a UNet's fwd+bwd (or forward) goes, by what each XLA op computes.

  python benchmarks/cpu_profile.py [--model=imagenet|small] [--batch=8] [--case=train|forward]
      [--iters=1] [--top=12] [--json=out.json]

Times one call untraced, then traces --iters calls with jax.profiler, reads the op events from
the trace and classifies each op by its instructions in the compiled module's optimised HLO:
convolution, batched matmul (attention's scores and values), matmul (linear and 1x1 layers),
exponential/division (softmax, SiLU), reduction (norm statistics, softmax sums), data movement
(copies, transposes, slices, broadcasts), other elementwise. Prints each class's time and share
of the call, the largest single ops, and the wall time per call. Under Eigen's kernels (the
default, ldm_jax/xla_cpu.py) XLA runs convolutions asynchronously on its thread pool and the
trace times only their launch, so their time shows as the rest of the call (an estimate: other
ops can overlap them). The UNet is vs_pytorch.py's (random weights, same shapes), so the classes
line up with its ldm_jax/diffusers ratio.

Why: the performance issue asks where the CPU time goes before anything is changed for speed;
a trace keeps the answer measured rather than guessed (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.models import host_cpu  # noqa: E402
from benchmarks.vs_pytorch import LATENT, MODELS, inputs  # noqa: E402
from ldm_jax.models.unet import UNet  # noqa: E402

# "%name = f32[8,32]{1,0} op(" or, for multi-output ops, "%name = (f32[256]{0}, f32[256]{0}) op(".
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\([^()]*\)|\S+) ([\w\-]+)\(")
# Control flow: its body's ops appear in the trace themselves, so it is not counted again.
_CONTROL = {"while", "conditional", "call"}
_DATA_MOVEMENT = {"copy", "transpose", "parameter", "bitcast", "tuple", "get-tuple-element",
                  "reshape", "broadcast", "slice", "concatenate", "pad", "reverse",
                  "dynamic-slice", "dynamic-update-slice", "constant", "iota",
                  "data movement"}
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_COMP = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) ")
_BATCH_DIMS = re.compile(r"lhs_batch_dims=\{\d")


def computations(hlo: str) -> dict[str, list[str]]:
  """The module's computations: name -> its instruction lines."""
  comps, name = {}, None
  for line in hlo.splitlines():
    if line and not line.startswith((" ", "}", "HloModule")) and line.rstrip().endswith("{"):
      match = _COMP.match(line)
      name = match.group(1) if match else None
      comps[name] = []
    elif name is not None and line.startswith(" "):
      comps[name].append(line)
  return comps


def _kind(lines: list[str], comps: dict, depth: int = 0) -> str:
  """The class of the work in `lines` (a computation's instructions, called ones included)."""
  ops, text = set(), "\n".join(lines)
  for line in lines:
    m = _INSTR.match(line)
    if m:
      ops.add(m.group(3))
    call = _CALLS.search(line)
    if call and depth < 4 and call.group(1) in comps:
      ops.add(_kind(comps[call.group(1)], comps, depth + 1))
  if "convolution" in ops:
    return "convolution"
  if "dot" in ops or "batched matmul" in ops or "matmul" in ops:
    return "batched matmul" if _BATCH_DIMS.search(text) or "batched matmul" in ops else "matmul"
  if ops & {"exponential", "divide", "exp/divide (softmax, SiLU)"}:
    return "exp/divide (softmax, SiLU)"
  if "reduce" in ops or "reduction" in ops or "reduce-window" in ops:
    return "reduction"
  if ops and ops <= _DATA_MOVEMENT:
    return "data movement"
  return "elementwise"


def classify(hlo: str) -> dict[str, str]:
  """Instruction name -> class, for every instruction of every computation."""
  comps, out = computations(hlo), {}
  for lines in comps.values():
    for line in lines:
      m = _INSTR.match(line)
      if not m:
        continue
      name, _, op = m.groups()
      if op == "fusion":
        call = _CALLS.search(line)
        out[name] = _kind(comps.get(call.group(1), []) if call else [], comps)
      elif op not in _CONTROL:
        out[name] = _kind([line], comps)
  return out


def op_events(trace_dir: str) -> list[tuple[str, float]]:
  """(op name, duration in ms) of every complete event in the perfetto trace."""
  paths = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
  if not paths:
    raise SystemExit(f"no perfetto_trace.json.gz under {trace_dir}")
  with gzip.open(paths[0]) as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  return [(e["name"], e["dur"] / 1e3) for e in events if e.get("ph") == "X" and "dur" in e]


def build(name: str, batch: int, case: str):
  """The jitted function of `case` and its arguments, on vs_pytorch.py's UNet."""
  module = UNet(in_channels=LATENT[2], out_channels=LATENT[2], use_spatial_transformer=True,
                **MODELS[name])
  x, t, ctx = inputs(batch, 2)
  params = module.init(jax.random.PRNGKey(0), x[:1], t[:1], ctx[:1])["params"]
  target = np.random.default_rng(3).standard_normal(x.shape).astype(np.float32)
  if case == "train":
    def fn(p):
      return jax.grad(lambda q: jnp.mean((module.apply({"params": q}, x, t, ctx) - target) ** 2))(p)
  else:
    def fn(p):
      return module.apply({"params": p}, x, t, ctx)
  return jax.jit(fn), params


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="imagenet", choices=sorted(MODELS))
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--case", default="train", choices=("train", "forward"))
  parser.add_argument("--iters", type=int, default=1)
  parser.add_argument("--top", type=int, default=12)
  parser.add_argument("--json", default="")
  args = parser.parse_args()
  fn, params = build(args.model, args.batch, args.case)
  compiled = fn.lower(params).compile()      # timed and traced below: the HLO that was parsed
  hlo = compiled.as_text()
  kinds = classify(hlo)
  # Each instruction's result type (e.g. f32[8,32,32,256]; a tuple for several outputs).
  types = {m.group(1): m.group(2) for line in hlo.splitlines() if (m := _INSTR.match(line))}
  jax.block_until_ready(compiled(params))                       # warm-up
  start = time.perf_counter()
  jax.block_until_ready(compiled(params))
  wall_s = time.perf_counter() - start                           # untraced
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(args.iters):
        jax.block_until_ready(compiled(params))
    events = op_events(trace_dir)
  by_kind, by_op, unmatched = collections.Counter(), collections.Counter(), collections.Counter()
  for name, ms in events:
    if name in kinds:
      by_kind[kinds[name]] += ms / args.iters
      by_op[name] += ms / args.iters
    else:
      unmatched[name] += ms / args.iters
  total = sum(by_kind.values())
  print(f"{host_cpu()}; {args.model} UNet, {args.case}, batch {args.batch}: {wall_s:.2f} s per "
        f"call (untraced), {total / 1e3:.2f} s of timed XLA ops ({len(by_op)} ops)")
  for kind, ms in by_kind.most_common():
    print(f"  {kind:27s} {ms / 1e3:7.2f} s  {100 * ms / (wall_s * 1e3):5.1f}% of the call")
  print(f"  {'rest of the call':27s} {wall_s - total / 1e3:7.2f} s  "
        f"{100 * (1 - total / (wall_s * 1e3)):5.1f}% (ops the trace times only as a launch: "
        "Eigen's convolutions run on its thread pool; runtime)")
  print("largest trace events that are no op of the module (runtime, threads):")
  for name, ms in unmatched.most_common(args.top):
    print(f"  {name[:60]:60s} {ms:8.1f} ms")
  print("largest ops:")
  for name, ms in by_op.most_common(args.top):
    print(f"  {name:30s} {kinds[name]:27s} {ms:8.1f} ms  {types.get(name, '')}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"model": args.model, "case": args.case, "batch": args.batch, "wall_s": wall_s,
                 "rest_of_call_s": wall_s - total / 1e3,
                 "op_s": total / 1e3, "by_kind_s": {k: v / 1e3 for k, v in by_kind.items()},
                 "xla_flags": os.environ.get("XLA_FLAGS", ""), "host_cpu": host_cpu(),
                 "jax": jax.__version__}, f, indent=2)


if __name__ == "__main__":
  main()
