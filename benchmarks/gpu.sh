#!/usr/bin/env bash
# The accelerator benchmark suite, in under 8 minutes on one H100/H200; installs nothing.
#
#   bash benchmarks/gpu.sh                  # on the GPU machine (the repo and its venv, `python`
#                                           # the venv's)
#   GPU_SH_TINY=1 bash benchmarks/gpu.sh    # the same commands with --tiny, for a CPU smoke run
#
# Writes one JSON file per command to ${OUT:-benchmarks/out}, then summary.txt there (also
# printed): stage-2 training steps in bfloat16 (attention auto: cuDNN) and float32 (XLA), the
# stage-1 step in bfloat16, guided DDIM + decoding in bfloat16, the bfloat16 UNet's error
# against float32, and, if time is left, the largest stage-2 batch with and without remat.
# Every command runs under `timeout` and starts only while GPU_SH_MIN_S seconds of the
# GPU_SH_BUDGET_S budget remain; a skipped or failed command is listed in the summary.
# GPU_SH_SEARCH=0 skips the max-batch search, =1 runs it even with --tiny.
set -u
cd "$(dirname "$0")/.."

OUT_DIR="${OUT:-benchmarks/out}"
TINY="${GPU_SH_TINY:-0}"
PY="${PYTHON:-python}"
MIN_S="${GPU_SH_MIN_S:-45}"
mkdir -p "$OUT_DIR"
: > "$OUT_DIR/status.txt"

if [ "$TINY" = "1" ]; then
  BUDGET="${GPU_SH_BUDGET_S:-900}"
  SEARCH="${GPU_SH_SEARCH:-0}"
  # A CPU smoke run: LLVM's slow optimisations off halves XLA's compile times.
  export XLA_FLAGS="${XLA_FLAGS:---xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true}"
  T="--tiny"
  LDM_BATCH=4; AE_BATCH=2; SAMPLE_BATCH=2; SAMPLE_STEPS=4; STEPS="--steps=2 --warmup=1"
  CAPS=(300 300 300 300 300)
else
  BUDGET="${GPU_SH_BUDGET_S:-465}"
  SEARCH="${GPU_SH_SEARCH:-1}"
  # Let the max-batch search (and large batches) use nearly all of the GPU's memory.
  export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
  T=""
  LDM_BATCH=64; AE_BATCH=8; SAMPLE_BATCH=64; SAMPLE_STEPS=50; STEPS="--steps=10 --warmup=2"
  CAPS=(150 140 140 120 90)
fi
START=$SECONDS
remaining() { echo $((BUDGET - (SECONDS - START))); }

# run NAME CAP_S COMMAND...: COMMAND under timeout min(CAP_S, time left), unless under MIN_S
# seconds are left; its output goes to NAME.log (the tail printed when it fails), its line to
# status.txt.
run() {
  local name=$1 cap=$2 left
  shift 2
  left=$(remaining)
  if [ "$left" -lt "$MIN_S" ]; then
    echo "$name: skipped (${left}s of the budget left)" | tee -a "$OUT_DIR/status.txt"
    return
  fi
  local limit=$(( cap < left ? cap : left ))
  local t0=$SECONDS
  echo "== $name (timeout ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  local rc=$?
  local what="ok"
  if [ "$rc" != "0" ]; then
    tail -n 5 "$OUT_DIR/$name.log"
    what="FAILED (rc $rc, see $name.log)"
    [ "$rc" = "124" ] && what="TIMED OUT (see $name.log)"
  fi
  echo "$name: $what in $((SECONDS - t0))s" | tee -a "$OUT_DIR/status.txt"
}

echo "== environment"
nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not available (no NVIDIA GPU)"
"$PY" - <<'EOF' 2>&1 | tee "$OUT_DIR/environment.txt"
import importlib.metadata as md
import jax
print("devices:", jax.devices())
for p in ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda12-pjrt", "flax", "optax", "numpy"):
  try:
    print(f"{p}: {md.version(p)}")
  except md.PackageNotFoundError:
    pass
EOF
echo "XLA_FLAGS=${XLA_FLAGS:-} XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-}" \
  | tee -a "$OUT_DIR/environment.txt"

B=benchmarks
run train_ldm_bf16 "${CAPS[0]}" "$PY" $B/train_step.py --stage=ldm --batch=$LDM_BATCH \
  --dtype=bfloat16 --attention=auto $STEPS $T --out="$OUT_DIR/train_ldm_bf16.json"
run train_ldm_f32 "${CAPS[1]}" "$PY" $B/train_step.py --stage=ldm --batch=$LDM_BATCH \
  --dtype=float32 --attention=xla $STEPS $T --out="$OUT_DIR/train_ldm_f32.json"
run train_ae_bf16 "${CAPS[2]}" "$PY" $B/train_step.py --stage=ae --batch=$AE_BATCH \
  --dtype=bfloat16 --attention=auto $STEPS $T --out="$OUT_DIR/train_ae_bf16.json"
run sampling_bf16 "${CAPS[3]}" "$PY" $B/sampling.py --model=imagenet --batch=$SAMPLE_BATCH \
  --steps=$SAMPLE_STEPS --repeats=2 --dtype=bfloat16 --attention=auto $T \
  --out="$OUT_DIR/sampling_bf16.json"
run precision "${CAPS[4]}" "$PY" $B/precision.py --batch=8 --attention=auto $T \
  --out="$OUT_DIR/precision.json"
if [ "$SEARCH" = "1" ]; then
  left=$(remaining)
  if [ "$left" -ge 150 ]; then
    run max_batch_ldm_bf16 "$left" "$PY" $B/train_step.py --stage=ldm --batch=$LDM_BATCH \
      --dtype=bfloat16 --attention=auto --steps=2 --warmup=1 $T --find_max_batch \
      --time_budget_s=$((left - 60)) --out="$OUT_DIR/max_batch_ldm_bf16.json"
  else
    echo "max_batch_ldm_bf16: skipped (${left}s left, needs 150s)" | tee -a "$OUT_DIR/status.txt"
  fi
fi

echo "== summary (${OUT_DIR}/summary.txt, $((SECONDS - START))s in all)"
"$PY" - "$OUT_DIR" <<'EOF' | tee "$OUT_DIR/summary.txt"
import glob, json, os, sys
out = sys.argv[1]
print(open(os.path.join(out, "status.txt")).read().rstrip())
g = lambda v, f="{:.3g}": "-" if v is None else f.format(v)  # noqa: E731
gib = lambda b: "-" if b is None else f"{b / 2**30:.1f} GiB"  # noqa: E731
for path in sorted(glob.glob(os.path.join(out, "*.json"))):
  data = json.load(open(path))
  name = os.path.basename(path)[:-5]
  for case in data if isinstance(data, list) else [data]:
    if "case" in case:
      f = case["flops"]
      print(f"{name} [{case['case']}]: batch {case['global_batch']}, {case['dtype']}, attention "
            f"{case['attention_impl']}, remat {case['remat']}: {g(case['per_sample_ms'])} ms/"
            f"sample, {g(case['samples_per_s'])} samples/s, compile {case['compile_s']}s, "
            f"{g(f['step_per_sample'] / 1e9)} GFLOP/sample (model/XLA {g(f['model_over_xla'])}),"
            f" MFU {g(case['mfu'])}, peak {gib(case['peak_bytes_in_use'])}")
      for mode, s in (case.get("max_batch_per_device") or {}).items():
        print(f"  max batch/device {mode}: {s['max_batch']} (first failing {s['first_failing']},"
              f" complete {s['complete']})")
    elif "samples_per_sec" in case:
      print(f"{name}: batch {case['batch']}, {case['steps']} DDIM steps, guidance "
            f"{case['guidance']}, {case['dtype']}, attention {case['attention_impl']}: "
            f"{g(case['samples_per_sec'])} samples/s incl. decoding, compile "
            f"{case['compile_s']}s, MFU {g(case['mfu'])}, finite {case['all_finite']}")
    elif "reference_rms" in case:
      for key, e in case.items():
        if key.endswith("_vs_float32_xla") or key.endswith("_vs_bfloat16_xla"):
          print(f"{name} {key}: max abs {g(e['max_abs'])}, relative L2 "
                f"{g(e['relative_l2'])} (reference rms {g(case['reference_rms'])})")
EOF
