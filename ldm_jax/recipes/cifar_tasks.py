"""The paper's image-conditioned tasks on CIFAR-10 on a CPU, end to end: x4 super-resolution
(32 px from 8 px) and inpainting (generated stroke-and-box masks).

  python -m ldm_jax.recipes.cifar_tasks --task=sr --workdir=runs/cifar_tasks
  python -m ldm_jax.recipes.cifar_tasks --task=inpaint --workdir=runs/cifar_tasks

1. unpacks the CIFAR-10 training archive into an image folder, and the first --eval_per_class
   test images of every class as the held-out set (ldm_jax/data/demo_sets.py);
2. trains a small KL-f4 autoencoder (32 px -> 8x8x8 latents; L1 + LPIPS + KL), shared by
   both tasks;
3. trains the task's LDM: super-resolution on BSR-degraded 8 px inputs (configs/ldm_sr.py:cifar)
   or inpainting conditioned on the masked image's latent and the mask
   (configs/ldm_inpaint.py:cifar);
4. runs sample.py's task on the held-out images and scores it next to a baseline:
   sr: PSNR and LPIPS (VGG) against the originals, of LDM-SR and of bicubic upsampling of the
   same inputs (bicubic-downsampled and BSR-degraded inputs), each also back-projected onto its
   input as sample.py's upscale does by default, and the LDM's raw samples;
   inpaint: L1 in the masked region and LPIPS of the composited image, of the LDM (Poisson-
   blended as sample.py's inpaint does by default, and pasted) and of three simple fills (the
   mean colour of the known pixels; a normalised blur of them; their harmonic interpolation),
   and the unmasked region's error without the composite next to the autoencoder's own
   reconstruction error there.
   Writes <workdir>/<task>/results.json and a picture.

Every stage resumes when rerun. --archive is the folder holding the CIFAR-10 JPEG tarballs.
"""
from __future__ import annotations

import json
import logging
import os
import time

from ldm_jax import config as config_lib
from ldm_jax import fileio
from ldm_jax.cli import ArgumentParser, friendly_errors, setup_logging
from ldm_jax.data.demo_sets import extract_cifar
from ldm_jax.recipes import check_steps, ldm_steps_help

logger = logging.getLogger("ldm_jax")
TASKS = ("sr", "inpaint")
# The sampler the LDMs' checkpoints name and the evaluation runs (DDIM-50 scored the same, in
# 2.5x the time: benchmarks/RESULTS.md); --sampler / --steps change the evaluation's.
SAMPLER, SAMPLER_STEPS = "dpmpp_2m", 20
# LDM steps per task (--ldm_steps overrides). SR's loss is flat from about 1,000 of 1,500 steps,
# and 900 keep its recipe, autoencoder included, within about 15 minutes on 2 cores.
LDM_STEPS = {"sr": 900, "inpaint": 1500}


def autoencoder_config(data_dir: str, steps: int = 800):
  """A small KL-f4 autoencoder for 32 px colour images: L1 + LPIPS + KL, no GAN (a CPU).

  8 latent channels: with 3, the 8x8x3 latent holds no more numbers than the 8 px SR input and
  reconstructs held-out images only to LPIPS 0.360, worse than bicubic upsampling (0.351); with
  8, 0.277 in the same 800 steps on L1 alone, and 0.218 with the LPIPS term (PSNR 24.2 -> 21.0
  dB; the step costs 1.35x; benchmarks/RESULTS.md)."""
  c = config_lib.defaults("autoencoder")
  c.data.source, c.data.path, c.data.split = "image_folder", data_dir, ""
  c.data.image_size, c.data.resize_mode = 32, "stretch"
  c.model.ch = 32
  c.model.ch_mult = (1, 2, 2)
  c.model.num_res_blocks = 1
  c.model.z_channels = 8
  c.model.embed_dim = 8
  c.loss.lpips_weight = 1.0
  c.loss.disc_start = 10 ** 9
  _short_run(c.train, batch=16, steps=steps, warmup=50, ema=0.99, log_every=50, ckpt_every=250)
  return c


def _short_run(t, *, batch, steps, warmup, ema, log_every, ckpt_every, min_lr_ratio=0.0):
  """The train fields both CPU recipes share: lr 1e-3 unscaled, warm-up + cosine, no periodic
  evaluation or image summaries."""
  t.batch_size, t.num_steps, t.lr, t.scale_lr = batch, steps, 1e-3, False
  t.schedule, t.warmup_steps, t.min_lr_ratio = "cosine", min(warmup, steps // 10), min_lr_ratio
  t.ema_decay, t.log_every, t.ckpt_every = ema, log_every, ckpt_every
  t.eval_every = t.image_every = 0


def ldm_config(task: str, data_dir: str, autoencoder_dir: str, steps: int | None = None):
  """The CPU LDM of `task` ('sr' or 'inpaint'): 32 px CIFAR-10 on 8x8x8 latents, LDM_STEPS[task]
  steps unless `steps` (3-7 steps/s on 2 cores, by the VM). configs/ldm_sr.py:cifar and
  ldm_inpaint.py:cifar.

  It predicts v, not eps: an eps model's estimate of x0 at the first, noisiest steps carries its
  eps error times sqrt((1 - alpha_bar) / alpha_bar) (about 15 at t = 999), and this short a run
  leaves that error large (x0 estimates at t = 999 of 7.9 dB PSNR for eps, 18.8 dB for v;
  benchmarks/RESULTS.md)."""
  c = config_lib.defaults("ldm")
  c.data.source, c.data.path, c.data.split = "image_folder", data_dir, ""
  c.data.image_size, c.data.resize_mode = 32, "stretch"
  c.first_stage.checkpoint = autoencoder_dir
  c.cond.type = "concat"
  if task == "sr":
    c.cond.concat, c.cond.degradation = "lowres", "bsr"
  else:
    c.cond.concat, c.cond.mask_coverage = "inpaint", (0.1, 0.5)
  c.cond.p_uncond = 0.0
  c.unet.model_channels = 64
  c.unet.channel_mult = (1, 2)
  c.unet.num_res_blocks = 2
  c.unet.attention_resolutions = (2,)
  c.unet.num_head_channels = 32
  c.unet.use_spatial_transformer = False
  c.unet.use_scale_shift_norm = True
  c.diffusion.scale_by_std = True
  c.diffusion.parameterization = "v"
  c.diffusion.loss_weighting = "min_snr"
  steps = LDM_STEPS[task] if steps is None else steps
  _short_run(c.train, batch=32, steps=steps, warmup=100, ema=0.995, log_every=100,
             ckpt_every=500, min_lr_ratio=0.1)
  c.sample.sampler, c.sample.steps, c.sample.guidance_scale = SAMPLER, SAMPLER_STEPS, 1.0
  return c


class _Scorer:
  """PSNR / L1 / LPIPS of image sets against the held-out originals (float [-1, 1])."""

  def __init__(self, target):
    from ldm_jax.models.lpips import load_lpips_params, make_lpips_fn  # pylint: disable=g-import-not-at-top
    self.target, self.lpips = target, make_lpips_fn(load_lpips_params())

  def lpips_of(self, images):
    import numpy as np  # pylint: disable=g-import-not-at-top
    return float(np.mean(np.concatenate([np.asarray(self.lpips(images[i:i + 100],
                                                               self.target[i:i + 100]))
                                         for i in range(0, len(images), 100)])))

  def psnr_of(self, images):
    import numpy as np  # pylint: disable=g-import-not-at-top
    from ldm_jax.evaluation.metrics import psnr  # pylint: disable=g-import-not-at-top
    return float(np.mean(np.asarray(psnr(images, self.target))))

  def l1_in(self, images, region):
    """Mean |difference| in [0, 1] units over the pixels where `region` (N, H, W, 1) is 1."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    diff = np.abs(images - self.target).mean(-1, keepdims=True) / 2
    return float((diff * region).sum() / max(region.sum(), 1))


def _write_folder(folder: str, images_u8) -> list[str]:
  from ldm_jax.training.reporting import save_png  # pylint: disable=g-import-not-at-top
  names = [f"{i:05d}.png" for i in range(len(images_u8))]
  for name, img in zip(names, images_u8):
    path = os.path.join(folder, name)
    if not os.path.exists(path):
      os.makedirs(folder, exist_ok=True)
      save_png(path, img)
  return names


def _read_outputs(out: str, names):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from ldm_jax import image_tasks  # pylint: disable=g-import-not-at-top
  from ldm_jax.data.preprocess import to_float  # pylint: disable=g-import-not-at-top
  return to_float(np.stack([np.asarray(Image.open(image_tasks.output_path(out, n)))
                            for n in names]))


def _reconstruction(pipeline, target):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  ae, first = pipeline.frozen["autoencoder"], pipeline.ldm.first
  return np.clip(np.concatenate([np.asarray(first.decode(ae, first.latent(
      ae, jnp.asarray(target[i:i + 100]), None))) for i in range(0, len(target), 100)]), -1, 1)


def evaluate_sr(task_dir: str, pipeline, hi, sampler: str, steps: int) -> tuple[dict, list]:
  """PSNR/LPIPS of LDM-SR and of bicubic upsampling, for bicubic and BSR 8 px inputs; each also
  back-projected onto its input (sample.py's default --consistency, applied here to the raw
  samples read back, so up to their 8-bit rounding), and the LDM's raw samples."""
  # pylint: disable=g-import-not-at-top
  import numpy as np
  from PIL import Image
  from ldm_jax import image_tasks
  from ldm_jax.data import degradations
  from ldm_jax.data.preprocess import to_float, to_uint8
  target = to_float(hi)
  scorer, results, rows = _Scorer(target), {}, []
  recon = _reconstruction(pipeline, target)
  results["autoencoder_psnr"], results["autoencoder_lpips"] = (scorer.psnr_of(recon),
                                                               scorer.lpips_of(recon))
  for kind in ("bicubic", "bsr"):
    low = np.stack([to_uint8(degradations.degrade(kind, img, 8, np.random.default_rng(i)))
                    for i, img in enumerate(hi)])
    folder = os.path.join(task_dir, "eval", f"inputs_{kind}")
    names = _write_folder(folder, low)
    out = os.path.join(task_dir, "eval", f"upscaled_{kind}_{sampler}_{steps}")
    image_tasks.run(pipeline, image_tasks.FileJob("upscale", folder, sampler=sampler,
                                                  steps=steps, consistency=0), out)
    raw = _read_outputs(out, names)
    up = lambda mode: to_float(np.stack([np.asarray(Image.fromarray(x).resize(  # noqa: E731
        (32, 32), mode)) for x in low]))
    project = lambda images: np.stack([degradations.back_project(  # noqa: E731
        x, to_float(y), image_tasks.FileJob.consistency) for x, y in zip(images, low)])
    bic, sr = up(Image.Resampling.BICUBIC), project(raw)
    for name, images in (("bicubic_upsampling", bic), ("bicubic_back_projected", project(bic)),
                         ("ldm_sr_raw", raw), ("ldm_sr", sr)):
      results[f"{kind}_inputs_{name}_psnr"] = scorer.psnr_of(images)
      results[f"{kind}_inputs_{name}_lpips"] = scorer.lpips_of(images)
    rows += [up(Image.Resampling.NEAREST)[:8], bic[:8], sr[:8], target[:8]]
  return results, rows


def evaluate_inpaint(task_dir: str, pipeline, hi, sampler: str,
                     steps: int) -> tuple[dict, list]:
  """Masked-region L1/LPIPS of the LDM (Poisson-blended and pasted) and three simple fills;
  the unmasked region's error."""
  # pylint: disable=g-import-not-at-top
  import numpy as np
  from scipy import ndimage
  from ldm_jax import compositing, image_tasks
  from ldm_jax.data import masks
  from ldm_jax.data.preprocess import to_float
  target = to_float(hi)
  scorer, results = _Scorer(target), {}
  fill = np.stack([masks.random_mask(np.random.default_rng(i), 32, 32, (0.1, 0.5))
                   for i in range(len(hi))])
  results["mask_coverage_mean"] = float(fill.mean())
  inputs = os.path.join(task_dir, "eval", "images")
  names = _write_folder(inputs, hi)
  mask_dir = os.path.join(task_dir, "eval", "masks")
  _write_folder(mask_dir, (fill[..., 0] * 255).astype(np.uint8))
  # One raw run; compositing here equals sample.py's composite up to the 8-bit rounding of the
  # raw output (exactly, for the plain paste: the masks are binary). Known latents kept at every
  # step (sample.py's default). Folders are named by sampler and steps: a rerun with others
  # samples afresh instead of scoring what the folder holds (older workdirs: inpainted_kept,
  # 50 DDIM steps; inpainted_raw, without keeping the known latents).
  out = os.path.join(task_dir, "eval", f"inpainted_kept_{sampler}_{steps}")
  image_tasks.run(pipeline, image_tasks.FileJob("inpaint", inputs, mask_dir, sampler=sampler,
                                                steps=steps, composite=False), out)
  known = 1.0 - fill
  kept = target * known

  def paste(fills, seamless=False):   # every fill is scored with the known pixels back
    fills = np.broadcast_to(fills, target.shape)
    return np.stack([compositing.composite(*a, seamless) for a in zip(target, fills, fill)])

  raw = _read_outputs(out, names)
  mean_colour = kept.sum((1, 2), keepdims=True) / known.sum((1, 2), keepdims=True)
  sigma = (0, 3, 3, 0)
  blur = ndimage.gaussian_filter(kept, sigma) / np.maximum(
      ndimage.gaussian_filter(np.broadcast_to(known, target.shape), sigma), 1e-3)
  ldm, mean_fill, blur_fill = paste(raw, seamless=True), paste(mean_colour), paste(blur)
  for name, images in (("ldm", ldm), ("ldm_pasted", paste(raw)),
                       ("mean_colour_fill", mean_fill), ("blur_fill", blur_fill),
                       ("harmonic_fill", paste(mean_colour, seamless=True))):
    results[f"{name}_masked_l1"] = scorer.l1_in(images, fill)
    results[f"{name}_lpips"] = scorer.lpips_of(images)
  recon = _reconstruction(pipeline, target)
  results["unmasked_l1_without_composite"] = scorer.l1_in(raw, known)
  results["unmasked_l1_autoencoder_reconstruction"] = scorer.l1_in(recon, known)
  return results, [kept[:8], mean_fill[:8], blur_fill[:8], ldm[:8], target[:8]]


def run(task: str, workdir: str, archive_dir: str, *, ae_steps: int = 800,
        ldm_steps: int | None = None, eval_per_class: int = 50, sampler: str = SAMPLER,
        steps: int = SAMPLER_STEPS) -> dict:
  """Runs (or resumes) the stages of `task` (LDM_STEPS[task] LDM steps unless `ldm_steps`);
  returns the results it also writes."""
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  from ldm_jax.data.sources import ImageFolderSource
  from ldm_jax.diffusion.samplers import SAMPLERS
  from ldm_jax.errors import ConfigError
  from ldm_jax.inference import load_pipeline
  from ldm_jax.training.loop import train_and_evaluate
  from ldm_jax.training.reporting import image_grid, save_png
  if task not in TASKS:
    raise ValueError(f"--task: expected one of {', '.join(TASKS)}, got '{task}'")
  if sampler not in SAMPLERS:   # checked before the training they would follow
    raise ConfigError(f"--sampler: expected one of {', '.join(SAMPLERS)}, got '{sampler}'")
  ldm_steps = LDM_STEPS[task] if ldm_steps is None else ldm_steps
  check_steps(("--steps", steps), ("--ae_steps", ae_steps), ("--ldm_steps", ldm_steps))
  workdir = os.path.abspath(workdir)
  task_dir = os.path.join(workdir, task)
  times, t0 = {}, time.time()
  logger.info("[1/4] CIFAR-10 images -> %s/data", workdir)
  train_dir = extract_cifar(os.path.join(archive_dir, "cifar10-train-jpeg.tar.gz"),
                            os.path.join(workdir, "data", "train"))
  test_dir = extract_cifar(os.path.join(archive_dir, "cifar10-test-jpeg.tar.gz"),
                           os.path.join(workdir, "data", "test"), per_class=eval_per_class)
  ae_dir, ldm_dir = os.path.join(workdir, "autoencoder"), os.path.join(task_dir, "ldm")
  logger.info("[2/4] autoencoder -> %s", ae_dir)
  t = time.time()
  train_and_evaluate(autoencoder_config(train_dir, ae_steps), ae_dir, devices=jax.devices())
  times["autoencoder_s"] = time.time() - t
  logger.info("[3/4] %s LDM -> %s", task, ldm_dir)
  t = time.time()
  train_and_evaluate(ldm_config(task, train_dir, ae_dir, ldm_steps), ldm_dir,
                     devices=jax.devices())
  times["ldm_s"] = time.time() - t
  logger.info("[4/4] %s on %d held-out test images", task, 10 * eval_per_class)
  t = time.time()
  source = ImageFolderSource(test_dir, 3)
  hi = np.stack([source[i]["image"] for i in range(len(source))])
  pipeline = load_pipeline(ldm_dir)
  evaluate = evaluate_sr if task == "sr" else evaluate_inpaint
  results, rows = evaluate(task_dir, pipeline, hi, sampler, steps)
  picture = os.path.join(task_dir, f"{task}_cifar.png")
  save_png(picture, image_grid(np.concatenate(rows), ncols=8))
  times["evaluation_s"] = time.time() - t
  # ldm_checkpoint names the step sampled: a workdir trained further before keeps its steps.
  results.update(times, total_s=time.time() - t0, eval_images=len(hi), ae_steps=ae_steps,
                 ldm_steps=ldm_steps, ldm_checkpoint=pipeline.source,
                 sampler=f"{sampler} {steps} steps", picture=picture)
  fileio.atomic_write_text(os.path.join(task_dir, "results.json"), json.dumps(results, indent=2))
  return results


def _summary(task: str, r: dict) -> str:
  if task == "sr":
    lines = []
    for k in ("bicubic", "bsr"):
      fig = lambda n: (f"PSNR {r[f'{k}_inputs_{n}_psnr']:.2f} dB, "  # noqa: E731
                       f"LPIPS {r[f'{k}_inputs_{n}_lpips']:.3f}")
      lines += [f"  {k} inputs: LDM-SR {fig('ldm_sr')} (raw samples {fig('ldm_sr_raw')})",
                f"    bicubic upsampling {fig('bicubic_upsampling')} (back-projected "
                f"{fig('bicubic_back_projected')})"]
    lines.append(f"  autoencoder ceiling: PSNR {r['autoencoder_psnr']:.2f} dB, LPIPS "
                 f"{r['autoencoder_lpips']:.3f}")
  else:
    lines = [f"  {n}: masked-region L1 {r[f'{n}_masked_l1']:.4f}, LPIPS (composite) "
             f"{r[f'{n}_lpips']:.3f}"
             for n in ("ldm", "ldm_pasted", "mean_colour_fill", "blur_fill", "harmonic_fill")]
    lines.append(f"  unmasked region without the composite: L1 "
                 f"{r['unmasked_l1_without_composite']:.4f} (autoencoder reconstruction "
                 f"{r['unmasked_l1_autoencoder_reconstruction']:.4f})")
  return "\n".join(lines)


def main(argv=None):
  parser = ArgumentParser(prog="python -m ldm_jax.recipes.cifar_tasks", description=__doc__)
  parser.add_argument("--task", required=True, choices=TASKS)
  parser.add_argument("--archive", default="../shared/data/cifar10",
                      help="Folder holding cifar10-train-jpeg.tar.gz and "
                           "cifar10-test-jpeg.tar.gz.")
  parser.add_argument("--workdir", default="runs/cifar_tasks")
  parser.add_argument("--ae_steps", type=int, default=800)
  parser.add_argument("--ldm_steps", type=int, default=None, help=ldm_steps_help(LDM_STEPS))
  parser.add_argument("--eval_per_class", type=int, default=50)
  parser.add_argument("--sampler", default=SAMPLER,
                      help="Sampler of the task's held-out sampling (ldm_jax.diffusion.samplers"
                           ".SAMPLERS).")
  parser.add_argument("--steps", type=int, default=SAMPLER_STEPS, help="Sampler steps.")
  args = parser.parse_args(argv)
  setup_logging()
  with friendly_errors():
    r = run(args.task, args.workdir, args.archive, ae_steps=args.ae_steps,
            ldm_steps=args.ldm_steps, eval_per_class=args.eval_per_class, sampler=args.sampler,
            steps=args.steps)
  print(f"\n{args.task} recipe done in {r['total_s'] / 60:.1f} min ({r['eval_images']} held-out "
        f"CIFAR-10 test images)\n{_summary(args.task, r)}\n  picture: {r['picture']}")


if __name__ == "__main__":
  main()
