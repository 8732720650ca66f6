"""Ablations of the quickstart's LDM recipe, scored by the quickstart's digit classifier.

  python benchmarks/quickstart_ldm.py --quickstart=runs/quickstart --name=base
  python benchmarks/quickstart_ldm.py --quickstart=runs/quickstart --name=xattn \\
      cond.type=class unet.use_scale_shift_norm=False

Trains ldm_jax.quickstart.ldm_config() with the given field=value overrides on the autoencoder
of a finished quickstart run, into <quickstart>/ablations/<name>, then samples `per_class`
digits of every class (20-step DPM-Solver++) at each guidance scale and prints the classifier's
accuracy on them. Wall times include set-up and compilation. Results: benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ldm_jax import quickstart  # noqa: E402
from ldm_jax.cli import setup_logging  # noqa: E402
from ldm_jax.evaluation import digits  # noqa: E402
from ldm_jax.inference import load_pipeline  # noqa: E402
from ldm_jax.training.loop import train_and_evaluate  # noqa: E402


def override(config, assignment: str):
  """Sets config field 'a.b=value' (value read as a Python literal, else a string); the
  trainer's config validation then checks choices and consistency."""
  path, _, text = assignment.partition("=")
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  try:
    config.update_from_flattened_dict({path: value})
  except (KeyError, TypeError) as e:
    sys.exit(f"override '{assignment}': {e} (fields: docs/config.md)")


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quickstart", required=True, help="a finished quickstart workdir")
  parser.add_argument("--name", required=True)
  parser.add_argument("--steps", type=int, default=500)
  parser.add_argument("--per_class", type=int, default=20)
  parser.add_argument("--guidance", default="1,3,5")
  parser.add_argument("overrides", nargs="*", help="field=value")
  args = parser.parse_args()
  setup_logging()
  classifier_path = os.path.join(args.quickstart, "classifier", "digits.msgpack")
  if not os.path.exists(classifier_path):
    sys.exit(f"--quickstart: no trained classifier at {classifier_path}; run the quickstart")
  config = quickstart.ldm_config(os.path.join(args.quickstart, "autoencoder"), args.steps)
  for assignment in args.overrides:
    override(config, assignment)
  workdir = os.path.join(args.quickstart, "ablations", args.name)
  t = time.time()
  train_and_evaluate(config, workdir)
  train_s = time.time() - t

  pipeline = load_pipeline(workdir)
  classifier = digits.load_classifier(classifier_path, (config.data.image_size,) * 2 +
                                      (config.data.channels,))
  labels = np.repeat(np.arange(pipeline.num_classes), args.per_class)
  batch = pipeline.condition_batch(len(labels), labels=labels)
  row = {"name": args.name, "overrides": args.overrides, "steps": args.steps,
         "train_s": round(train_s), "accuracy": {}}
  for g in (float(s) for s in args.guidance.split(",")):
    generate = jax.jit(pipeline.make_generate(guidance_scale=g))
    images = generate(pipeline.params, pipeline.frozen, jax.random.PRNGKey(0),
                      jnp.arange(len(labels)), batch)
    predictions, _ = digits.classify(classifier, np.asarray(images))
    row["accuracy"][f"{g:g}"] = round(float(np.mean(predictions == labels)), 3)
  print(json.dumps(row))


if __name__ == "__main__":
  main()
