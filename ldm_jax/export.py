"""Exports a trained model as a standalone Orbax inference checkpoint.

  python -m ldm_jax.export --workdir=runs/ldm_kl8_imagenet --out=exports/ldm [--dtype=bfloat16]
  python -m ldm_jax.export --workdir=runs/ae_kl8_imagenet --out=exports/ae

An LDM export holds the UNet's EMA weights, the conditioning model, the frozen autoencoder, the
config, the latent scale factor and the tokenizer; sample.py loads it without the training
state. An autoencoder export holds the autoencoder (a stage-2 first_stage.checkpoint).
A mistake stops with one line on stderr and exit status 2; --verbose (or LDM_JAX_VERBOSE=1) adds
the traceback.
"""
from __future__ import annotations

import json
import os

from ldm_jax.cli import ArgumentParser, friendly_errors, setup_logging


def export_workdir(workdir: str, out: str, dtype: str = "float32") -> str:
  """Exports the latest checkpoint of a training workdir (either stage)."""
  # pylint: disable=g-import-not-at-top
  from ldm_jax.checkpoint import CheckpointError, save_inference
  from ldm_jax.first_stage import load_first_stage
  from ldm_jax.inference import export_pipeline, load_pipeline
  config_path = os.path.join(workdir, "config.json")
  if not os.path.isfile(config_path):
    raise CheckpointError(f"--workdir: '{workdir}' has no config.json (not a training workdir)")
  with open(config_path, encoding="utf-8") as f:
    stage = json.load(f).get("stage")
  if stage == "ldm":
    return export_pipeline(load_pipeline(workdir), out, dtype)
  first = load_first_stage(workdir)
  return save_inference(out, {"autoencoder": first.variables}, config=first.config,
                        meta={"stage": "autoencoder", "source": first.source})


def main(argv=None):
  parser = ArgumentParser(prog="python -m ldm_jax.export", description=__doc__)
  parser.add_argument("--workdir", required=True, help="A training workdir (either stage).")
  parser.add_argument("--out", required=True, help="The export folder to create.")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                      help="Cast the LDM weights (bfloat16 halves the size).")
  args = parser.parse_args(argv)
  setup_logging()
  with friendly_errors():
    path = export_workdir(args.workdir, args.out, args.dtype)
  print(f"exported {args.workdir} to {path}")


if __name__ == "__main__":
  main()
