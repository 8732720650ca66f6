"""The quickstart: both stages end to end on real digits, on a laptop CPU, with no download.

  python -m ldm_jax.quickstart --workdir=runs/quickstart

1. trains a KL-f4 autoencoder on 8,000 MNIST digits shipped inside the package;
2. trains a class-conditional LDM (with condition dropout) on its latents;
3. samples 50 digits of every class with classifier-free guidance and writes a grid;
4. evaluates the samples with a digit classifier trained here on the same 8,000 digits: its
   accuracy on the samples (does a sample of class k look like a k?) and the Frechet distance
   between classifier features of samples and of 1,000 held-out digits, next to the distance
   between two held-out real splits as the floor.

Every stage resumes: rerunning the command continues where it stopped. A mistake stops with one
line on stderr and exit status 2; --verbose (or LDM_JAX_VERBOSE=1) adds the traceback.
"""
from __future__ import annotations

import json
import logging
import os
import time

from ldm_jax import config as config_lib
from ldm_jax.cli import ArgumentParser, friendly_errors, setup_logging
from ldm_jax.data import presets

logger = logging.getLogger("ldm_jax")

# Splits of the 10,000 packaged MNIST test digits: the first 8,000 (or fewer, train_digits)
# train the autoencoder, the LDM and the classifier.
REFERENCE = "t10k[8000:9000]"  # real digits the samples are compared with (never trained on)
FLOOR = "t10k[9000:]"          # a second real split: the real-vs-real distance floor


def _train_split(digits: int) -> str:
  if not 0 < digits <= 8000:
    raise ValueError(f"--train_digits: between 1 and 8000, got {digits}")
  return f"t10k[:{digits}]"


def autoencoder_config(steps: int = 300, train_digits: int = 8000):
  """A small KL-f4 autoencoder: 32 px digits -> 8x8x3 latents."""
  c = config_lib.defaults("autoencoder")
  presets.use_packaged_mnist(c, image_size=32)
  c.data.split, c.data.eval_split = _train_split(train_digits), REFERENCE
  c.model.ch = 32
  c.model.ch_mult = (1, 1, 2)
  c.model.num_res_blocks = 1
  c.model.z_channels = 3
  c.model.embed_dim = 3
  c.loss.lpips_weight = 0.0      # digits need no perceptual term (a CPU step 1.35x)
  c.loss.disc_start = 10 ** 9    # no GAN in a few hundred steps
  c.train.batch_size = 16
  c.train.num_steps = steps
  c.train.lr = 1e-3
  c.train.scale_lr = False
  c.train.schedule = "cosine"
  c.train.warmup_steps = min(30, steps // 10)
  c.train.log_every = 50
  c.train.ckpt_every = 100
  c.train.eval_every = steps
  c.train.eval_batches = 16
  c.train.image_every = steps
  return c


def ldm_config(autoencoder_dir: str, steps: int = 1000, train_digits: int = 8000):
  """A small class-conditional LDM on the autoencoder's latents, guidance-ready.

  Tuned for a few minutes of a 2-core CPU (1,000 steps: 3.6 min on a Zen 5 VM, about twice that
  on the slower VMs; 500 steps scored 91.6% against 1,000's 99.4%, README): the class enters
  through the time embedding (adm) and FiLM (scale-shift norm) in every ResBlock, Min-SNR
  weighting keeps the easy low-noise steps from dominating the gradient, and a large batch takes
  a high learning rate. Each of these is worth several points of sample accuracy; see
  benchmarks/RESULTS.md.
  """
  c = config_lib.defaults("ldm")
  presets.use_packaged_mnist(c, image_size=32)
  c.data.split, c.data.eval_split = _train_split(train_digits), ""
  c.first_stage.checkpoint = autoencoder_dir
  c.first_stage.precompute_latents = True
  c.unet.model_channels = 32
  c.unet.channel_mult = (1, 2, 2)
  c.unet.num_res_blocks = 1
  c.unet.attention_resolutions = (2, 4)
  c.unet.num_head_channels = 32
  c.unet.use_scale_shift_norm = True
  c.cond.type = "adm"
  c.cond.p_uncond = 0.1
  c.diffusion.scale_by_std = True
  c.diffusion.loss_weighting = "min_snr"
  c.train.batch_size = 128
  c.train.num_steps = steps
  c.train.lr = 3e-3
  c.train.scale_lr = False
  c.train.schedule = "cosine"
  c.train.warmup_steps = min(60, steps // 10)
  c.train.min_lr_ratio = 0.1
  c.train.ema_decay = 0.99      # a short run: a slower average lags the improving model
  c.train.log_every = 100
  c.train.ckpt_every = 250
  c.train.image_every = 0
  c.sample.sampler = "dpmpp_2m"
  c.sample.steps = 20
  c.sample.guidance_scale = 5.0
  return c


def _real_digits(split: str):
  """(images in [-1, 1] as the models see them, labels) of a packaged-MNIST split."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ldm_jax.data.preprocess import image_example_fn, to_float  # pylint: disable=g-import-not-at-top
  from ldm_jax.data.sources import open_source  # pylint: disable=g-import-not-at-top
  c = config_lib.defaults("autoencoder")
  presets.use_packaged_mnist(c, image_size=32)
  source = open_source(c.data, split)
  fn = image_example_fn(c.data, train=False)
  examples = [fn(source[i], None) for i in range(len(source))]
  return (to_float(np.stack([e["image"] for e in examples])),
          np.asarray([e["label"] for e in examples], np.int32))


def run(workdir: str, *, ae_steps: int = 300, ldm_steps: int = 1000, per_class: int = 50,
        classifier_steps: int = 500, train_digits: int = 8000, devices=None) -> dict:
  """Runs (or resumes) the four stages; returns the results it also writes to results.json.

  `devices` defaults to all of them (one on a CPU machine)."""
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  from ldm_jax import sampling_job
  from ldm_jax.evaluation import digits
  from ldm_jax.inference import load_pipeline
  from ldm_jax.training.loop import train_and_evaluate
  workdir = os.path.abspath(workdir)
  times, t0 = {}, time.time()
  ae_dir, ldm_dir = os.path.join(workdir, "autoencoder"), os.path.join(workdir, "ldm")
  samples_dir = os.path.join(workdir, "samples")

  logger.info("[1/4] autoencoder -> %s", ae_dir)
  devices = list(devices or jax.devices())
  train_and_evaluate(autoencoder_config(ae_steps, train_digits), ae_dir, devices=devices)
  times["autoencoder_s"] = time.time() - t0

  logger.info("[2/4] latent diffusion model -> %s", ldm_dir)
  t = time.time()
  train_and_evaluate(ldm_config(ae_dir, ldm_steps, train_digits), ldm_dir, devices=devices)
  times["ldm_s"] = time.time() - t

  logger.info("[3/4] %d guided samples of every class -> %s", per_class, samples_dir)
  t = time.time()
  mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
  pipeline = load_pipeline(ldm_dir)
  job = sampling_job.job_for(pipeline, per_class=per_class,
                             batch_size=len(devices) * max(1, 100 // len(devices)))
  sampling = sampling_job.run(pipeline, job, samples_dir, mesh)
  times["sampling_s"] = time.time() - t

  logger.info("[4/4] evaluation with a digit classifier")
  t = time.time()
  train_images, train_labels = _real_digits(_train_split(train_digits))
  classifier_path = os.path.join(workdir, "classifier", "digits.msgpack")
  if os.path.exists(classifier_path):
    classifier = digits.load_classifier(classifier_path, train_images.shape[1:])
  else:
    classifier = digits.train_classifier(train_images, train_labels, steps=classifier_steps)
    digits.save_classifier(classifier, classifier_path)
  reference, reference_labels = _real_digits(REFERENCE)
  floor, _ = _real_digits(FLOOR)
  data = np.load(os.path.join(samples_dir, "samples.npz"))
  samples = data["images"].astype(np.float32) / 127.5 - 1.0
  results = digits.evaluate_samples(classifier, samples, data["labels"], reference, floor)
  preds, _ = digits.classify(classifier, reference)
  results["classifier_accuracy_real"] = float(np.mean(preds == reference_labels))
  times["evaluation_s"] = time.time() - t
  results.update(times, total_s=time.time() - t0, sampling_samples_per_sec=
                 sampling["samples_per_sec"],
                 sampler=f"{pipeline.config.sample.sampler}, {pipeline.config.sample.steps} steps",
                 guidance_scale=float(pipeline.config.sample.guidance_scale),
                 grid=os.path.join(samples_dir, "grid.png"),
                 autoencoder_checkpoints=os.path.join(ae_dir, "checkpoints"),
                 ldm_checkpoints=os.path.join(ldm_dir, "checkpoints"))
  with open(os.path.join(workdir, "results.json"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2)
  return results


def main(argv=None):
  parser = ArgumentParser(prog="python -m ldm_jax.quickstart", description=__doc__)
  parser.add_argument("--workdir", default="runs/quickstart")
  parser.add_argument("--ae_steps", type=int, default=300)
  parser.add_argument("--ldm_steps", type=int, default=1000)
  parser.add_argument("--per_class", type=int, default=50)
  parser.add_argument("--classifier_steps", type=int, default=500)
  parser.add_argument("--train_digits", type=int, default=8000,
                      help="Train on the first N of the 8,000 training digits.")
  args = parser.parse_args(argv)
  setup_logging()
  with friendly_errors():
    r = run(args.workdir, ae_steps=args.ae_steps, ldm_steps=args.ldm_steps,
            per_class=args.per_class, classifier_steps=args.classifier_steps,
            train_digits=args.train_digits)
  print(f"\nquickstart done in {r['total_s'] / 60:.1f} min\n"
        f"  samples of every class (guidance {r['guidance_scale']:g}): {r['grid']}\n"
        f"  classifier accuracy on the samples: {r['sample_accuracy']:.1%} "
        f"(on real held-out digits: {r['classifier_accuracy_real']:.1%})\n"
        f"  Frechet distance on classifier features: samples vs real "
        f"{r['frechet_samples_vs_real']:.2f}, real vs real {r['frechet_real_vs_real']:.2f}\n"
        f"  checkpoints: {r['autoencoder_checkpoints']}, {r['ldm_checkpoints']}\n"
        f"  all numbers: {os.path.join(os.path.abspath(args.workdir), 'results.json')}")


if __name__ == "__main__":
  main()
