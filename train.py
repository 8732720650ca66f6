"""Trains a stage from a config; rerunning the same command resumes from the workdir.

  python train.py --config=configs/ae_kl8_imagenet.py --workdir=runs/ae_kl8
  python train.py --config=configs/ldm_kl8_imagenet.py --workdir=runs/ldm_kl8 \
      --config.first_stage.checkpoint=runs/ae_kl8
  python train.py --config=configs/tiny_ae.py:vq --workdir=/tmp/x --config.train.num_steps=10

Any config field can be overridden with --config.<field>=<value>; see docs/config.md.
A mistake (unknown field, wrong type, missing config file, inconsistent settings) stops with one
line on stderr naming the field and the fix, exit status 2; --verbose (or LDM_JAX_VERBOSE=1)
adds the traceback.

SIGTERM (preemption) saves a checkpoint of the current step and exits with status 3 once it is
complete (a repeated SIGTERM does not interrupt the save); rerun the same command to resume.
"""
import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from ldm_jax import cli  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run folder for checkpoints, logs and images; a rerun with "
                    "the same workdir resumes from its latest checkpoint.")
flags.DEFINE_bool("verbose", False, cli.VERBOSE_HELP)
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS

EXIT_PREEMPTED = 3  # stopped by SIGTERM after saving; 2 is a user error, 1 a crash


def _exit_preempted(signum, frame):
  """SIGTERM outside the training loop (set-up, or closing after the final save): there is
  nothing left to save, so stop at once with the preemption status."""
  del signum, frame
  raise SystemExit(EXIT_PREEMPTED)


def main(argv):
  del argv  # cli.absl_flags_parser refuses positional arguments
  # pylint: disable=g-import-not-at-top
  from ldm_jax.errors import Preempted
  from ldm_jax.parallel.mesh import maybe_initialize_distributed
  from ldm_jax.training.loop import train_and_evaluate
  cli.setup_logging()
  # The training loop replaces this handler with one that saves first (loop._PreemptionFlag).
  signal.signal(signal.SIGTERM, _exit_preempted)
  with cli.friendly_errors():
    maybe_initialize_distributed()
    try:
      train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except Preempted as e:
      sys.stderr.write(f"{cli.one_line(e)}\n")
      sys.exit(EXIT_PREEMPTED)


if __name__ == "__main__":
  sys.exit(app.run(main, flags_parser=cli.absl_flags_parser("config")))
