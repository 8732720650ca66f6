"""The quickstart: a small autoencoder trained on the MNIST digits shipped in the package.

  python -m ldm_jax.quickstart --workdir=runs/quickstart

Rerunning resumes. Stage 2 and sampling join this script as they land.
"""
from __future__ import annotations

import argparse
import os

from ldm_jax import config as config_lib
from ldm_jax.cli import friendly_errors, setup_logging


def autoencoder_config(steps: int | None = None):
  c = config_lib.defaults("autoencoder")
  config_lib.use_packaged_mnist(c, image_size=32)
  c.model.ch = 32
  c.model.ch_mult = (1, 2, 2)
  c.model.num_res_blocks = 1
  c.model.z_channels = 3
  c.model.embed_dim = 3
  c.loss.lpips_weight = 0.0
  c.loss.disc_start = 100_000
  c.train.batch_size = 32
  c.train.num_steps = steps or 1500
  c.train.lr = 1e-3
  c.train.scale_lr = False
  c.train.schedule = "cosine"
  c.train.warmup_steps = 50
  c.train.log_every = 100
  c.train.ckpt_every = 500
  c.train.eval_every = 500
  c.train.image_every = 500
  return c


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default="runs/quickstart")
  parser.add_argument("--ae_steps", type=int, default=None)
  args = parser.parse_args(argv)
  setup_logging()
  from ldm_jax.training.loop import train_and_evaluate  # pylint: disable=g-import-not-at-top
  with friendly_errors():
    workdir = os.path.join(args.workdir, "autoencoder")
    train_and_evaluate(autoencoder_config(args.ae_steps), workdir)
    print(f"autoencoder checkpoints: {workdir}/checkpoints")
    print(f"reconstruction grids:    {workdir}/images")


if __name__ == "__main__":
  main()
