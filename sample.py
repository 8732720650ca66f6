"""Batch sampling from a trained LDM (a stage-2 workdir or an export) on all devices and hosts.

  python sample.py --checkpoint=runs/ldm_kl8_imagenet --out=samples/cin --per_class=10 \
      --guidance_scale=1.5 --steps=50
  python sample.py --checkpoint=exports/ldm --out=samples/u --num_samples=5000 --sampler=dpmpp_2m \
      --steps=20
  python sample.py --checkpoint=runs/ldm_coco --out=samples/t --prompts=prompts.txt --per_prompt=4
  python sample.py --checkpoint=stable-diffusion-v1-5/ --out=samples/sd --prompts=prompts.txt \
      --guidance_scale=7.5 --negative_prompt="blurry" --steps=50
  python sample.py --checkpoint=v2-1_768-ema-pruned.safetensors --prediction=v \
      --tokenizer=sd21/tokenizer --out=samples/sd21 --prompts=prompts.txt --image_size=768

  python sample.py --checkpoint=runs/ldm_sr_cifar --out=up --task=upscale --inputs=photos/
  python sample.py --checkpoint=runs/ldm_inpaint --out=filled --task=inpaint --inputs=imgs/ \
      --masks=masks/
  python sample.py --checkpoint=runs/ldm_semantic --out=scenes --task=semantic --inputs=maps/
  python sample.py --checkpoint=runs/ldm_layout --out=canvases --task=layout --inputs=layouts/

--task picks the mode: generate (unconditional, per class, per prompt), upscale (a
super-resolution model on a folder of images of any size), inpaint (images + white-is-fill mask
PNGs; an inpainting model, or mask-blend sampling with any unconditional or class model),
semantic (a folder of label-map PNGs, any size), layout (a folder of .json box files).
generate writes <out>/images/NNNNNN.png, <out>/samples.npz and <out>/grid.png; the file tasks
write <out>/images/<input's relative path>.png. Rerunning the same command
resumes an interrupted job: only missing samples are generated, and they are the same pixels.
--batch_size, --dtype and --attention default to what runs fastest on the devices found (see
--help). The devices compute the next batch while a background thread writes the last one.
A mistake (a bad flag, a job the model cannot do, an --out holding another job) stops with one
line on stderr naming the flag and the fix, exit status 2; --verbose (or LDM_JAX_VERBOSE=1) adds
the traceback.
"""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

from ldm_jax import cli  # noqa: E402
from ldm_jax.errors import JobError  # noqa: E402

flags.DEFINE_string("checkpoint", None, "A stage-2 training workdir, an inference export, or a "
                    "Stable Diffusion 1.x/2.x checkpoint: a diffusers pipeline folder or a "
                    "single .safetensors/.ckpt file (converted in memory; see --prediction, "
                    "--tokenizer).")
flags.DEFINE_string("negative_prompt", None, "Stable Diffusion (CLIP) models: the prompt guidance "
                    "steers away from, in place of the empty prompt.")
flags.DEFINE_enum("prediction", None, ["eps", "v"], "Stable Diffusion single files: what the "
                  "UNet predicts (SD 2.x files need it: 512-base eps, 768-v v); overrides a "
                  "folder's scheduler config.")
flags.DEFINE_float("scale_factor", None, "Stable Diffusion checkpoints: the latent scale "
                   "(default: the VAE config's; 0.18215 for single files).")
flags.DEFINE_string("tokenizer", None, "Stable Diffusion single files: the CLIP tokenizer folder "
                    "(vocab.json, merges.txt), e.g. a pipeline folder's tokenizer/.")
flags.DEFINE_string("yaml", None, "Stable Diffusion single files: the CompVis YAML (otherwise "
                    "the model is read from the checkpoint's keys and shapes).")
flags.DEFINE_enum("task", "generate", ["generate", "upscale", "inpaint", "semantic", "layout"],
                  "generate: samples from noise (--num_samples, --per_class, --prompts); "
                  "upscale: a super-resolution model upscales every image of --inputs (any "
                  "size; --tile bounds memory); inpaint: fills the white region of each "
                  "--masks PNG in its --inputs image (one --classes value for class models); "
                  "semantic: a semantic-synthesis model renders every label-map PNG of --inputs "
                  "(one class index per pixel, any size); layout: a layout-to-image model "
                  "renders every box file of --inputs ({\"boxes\": [{\"class\": c, \"box\": "
                  "[x0, y0, x1, y1]}]} in pixels of an --image_size canvas).")
flags.DEFINE_string("inputs", None, "upscale/inpaint/semantic/layout: folder of input images, "
                    "label maps or box files (nested folders too); outputs keep their relative "
                    "paths.")
flags.DEFINE_string("masks", None, "inpaint: folder of mask PNGs at the images' relative paths, "
                    "the images' size; white (>= 128) = fill, black = keep.")
flags.DEFINE_bool("composite", True, "inpaint: paste the known pixels back, so the output "
                  "equals the input outside the mask (else the decoder's reconstruction).")
flags.DEFINE_bool("seamless", True, "inpaint with --composite: Poisson-blend the fill into the "
                  "known pixels (it gets the smooth correction that makes it meet them without "
                  "a seam or colour shift); --noseamless pastes it as sampled.")
flags.DEFINE_bool("keep_known", True, "inpaint with an inpainting model (cond.concat="
                  "'inpaint'): also replace the known region's latents, noised to the current "
                  "level, at every step (mask-blend, as for other models), so the fill is "
                  "sampled around the input's own latents; --nokeep_known uses the concat "
                  "condition alone.")
flags.DEFINE_integer("consistency", 3, "upscale: iterations of back-projection onto the input "
                     "(the output plus the bicubic upsampling of its downsampling's residual), "
                     "so that the output downsampled matches the input; 0 = the raw sample. It "
                     "assumes a bicubic downsampling and carries some of a noisy input's noise "
                     "back (on the CIFAR recipe's BSR inputs it still helps: RESULTS.md).")
flags.DEFINE_string("out", None, "Output folder (resumable).")
flags.DEFINE_integer("num_samples", 0, "Samples of an unconditional model (or spread over all "
                     "classes of a class-conditional one).")
flags.DEFINE_integer("per_class", 0, "Samples per class (class-conditional models).")
flags.DEFINE_list("classes", [], "Only these classes (default: all).")
flags.DEFINE_string("prompts", None, "Text file of prompts, one per line (text models).")
flags.DEFINE_integer("per_prompt", 1, "Samples per prompt.")
flags.DEFINE_integer("batch_size", 0, "Global batch, divisible by the number of devices. 0 (auto) "
                     "fills them: 64 per GPU/TPU device for latents up to 32x32, fewer in "
                     "proportion to the latent area beyond (16 at 64x64); 16 in all on CPU; "
                     "rounded down to a multiple of the device count, at most the job's size.")
flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"],
                  "Compute dtype of the UNet, conditioning encoder and decoder (the weights stay "
                  "as stored); auto: bfloat16 on GPU/TPU, float32 on CPU. It changes the pixels, "
                  "so a resumed job must use the same.")
flags.DEFINE_enum("attention", "auto", ["auto", "xla", "cudnn"],
                  "Attention kernel of the UNet and autoencoder; auto: cuDNN flash attention on "
                  "NVIDIA GPUs where it applies (bfloat16), XLA otherwise.")
flags.DEFINE_enum("sampler", None, ["ddim", "ddpm", "plms", "dpmpp_2m"],
                  "Default: the model config's sample.sampler.")
flags.DEFINE_integer("steps", None, "Sampling steps (default: sample.steps).")
flags.DEFINE_float("eta", None, "DDIM eta (default: sample.eta).")
flags.DEFINE_float("guidance_scale", None, "Classifier-free guidance (default: "
                   "sample.guidance_scale; 1 = none).")
flags.DEFINE_enum("spacing", None, ["auto", "uniform", "quad", "logsnr"], "Timestep grid.")
flags.DEFINE_integer("seed", 0, "Seed of the job; sample i's noise derives from (seed, i).")
flags.DEFINE_integer("image_size", None, "Sample larger (or smaller) images than the training "
                     "size: the UNet runs convolutionally on the larger latent (generate, and "
                     "the canvas of --task=layout).")
flags.DEFINE_integer("tile", 0, "Decode latents (and, for upscale/inpaint, denoise them) in "
                     "overlapping tiles of this many latent pixels: bounds the decoder's (and "
                     "UNet's) memory for large images; 0 = whole.")
flags.DEFINE_bool("verbose", False, cli.VERBOSE_HELP)
flags.mark_flags_as_required(["checkpoint", "out"])
FLAGS = flags.FLAGS


def _prompts(path):
  """--prompts' lines (None without it); a missing file is a JobError naming the flag."""
  if not path:
    return None
  if not os.path.isfile(path):
    raise JobError(f"--prompts: no such file '{path}' (give a text file, one prompt per line)")
  with open(path, encoding="utf-8") as f:
    return [line.strip() for line in f if line.strip()]


def _classes(values):
  """--classes as ints; anything else is a JobError naming the flag."""
  try:
    return [int(c) for c in values]
  except ValueError:
    raise JobError(f"--classes: expected class numbers separated by commas (e.g. "
                   f"--classes=0,7), got {','.join(values)}") from None


def _check_task_flags(classes):
  """Flags that do not fit --task, as a JobError naming them."""
  if FLAGS.task == "generate":
    for name in ("inputs", "masks"):
      if getattr(FLAGS, name):
        raise JobError(f"--{name}: only the file tasks (--task=upscale/inpaint/semantic/"
                       f"layout) read input files (add --task)")
    return
  if not FLAGS.inputs:
    raise JobError(f"--task={FLAGS.task}: give --inputs (a folder of "
                   f"{'box files' if FLAGS.task == 'layout' else 'images'})")
  if FLAGS.masks and FLAGS.task != "inpaint":
    raise JobError("--masks: only --task=inpaint reads masks")
  for name in ("num_samples", "per_class", "prompts") + (
      ("image_size",) if FLAGS.task != "layout" else ()):
    if getattr(FLAGS, name):
      raise JobError(f"--{name}: --task={FLAGS.task} makes one output per input file; drop it")
  if classes and FLAGS.task in ("semantic", "layout"):
    raise JobError(f"--classes: --task={FLAGS.task} takes its classes from the input files; "
                   f"drop it")
  if len(classes) > 1:
    raise JobError(f"--classes: --task={FLAGS.task} takes one class for every fill, got "
                   f"{len(classes)}")


def _run_file_job(pipeline, classes):
  from ldm_jax import image_tasks  # pylint: disable=g-import-not-at-top
  job = image_tasks.FileJob(
      FLAGS.task, FLAGS.inputs, FLAGS.masks, classes[0] if classes else None, seed=FLAGS.seed,
      batch_size=FLAGS.batch_size, sampler=FLAGS.sampler, steps=FLAGS.steps, eta=FLAGS.eta,
      guidance_scale=FLAGS.guidance_scale, spacing=FLAGS.spacing, tile=FLAGS.tile,
      composite=FLAGS.composite, seamless=FLAGS.seamless, keep_known=FLAGS.keep_known,
      consistency=FLAGS.consistency,
      image_size=FLAGS.image_size or 0)
  result = image_tasks.run(pipeline, job, FLAGS.out)
  print(f"{FLAGS.task}: {result['generated']} images written to {FLAGS.out}/images "
        f"({result['skipped']} were already there), {result['samples_per_sec']:.2f} images/s, "
        f"{result['compilations']} compilation(s)")


def main(argv):
  del argv  # cli.absl_flags_parser refuses positional arguments
  # pylint: disable=g-import-not-at-top
  from ldm_jax import sampling_job
  from ldm_jax.inference import load_pipeline
  from ldm_jax.parallel.mesh import maybe_initialize_distributed
  cli.setup_logging()
  with cli.friendly_errors():
    maybe_initialize_distributed()
    classes, prompts = _classes(FLAGS.classes), _prompts(FLAGS.prompts)
    _check_task_flags(classes)
    sd_options = {k: getattr(FLAGS, k) for k in ("prediction", "scale_factor", "tokenizer",
                                                  "yaml") if getattr(FLAGS, k) is not None}
    pipeline = load_pipeline(FLAGS.checkpoint, dtype=FLAGS.dtype, attention=FLAGS.attention,
                             sd_options=sd_options)
    if FLAGS.negative_prompt is not None and pipeline.ldm.cond.clip is None:
      raise JobError("--negative_prompt: only Stable Diffusion (CLIP text encoder) models take "
                     "a negative prompt")
    if FLAGS.task != "generate":
      _run_file_job(pipeline, classes)
      return
    job = sampling_job.job_for(
        pipeline, num_samples=FLAGS.num_samples, per_class=FLAGS.per_class,
        classes=classes, prompts=prompts, per_prompt=FLAGS.per_prompt,
        seed=FLAGS.seed, batch_size=FLAGS.batch_size, sampler=FLAGS.sampler, steps=FLAGS.steps,
        eta=FLAGS.eta, guidance_scale=FLAGS.guidance_scale, spacing=FLAGS.spacing,
        image_size=FLAGS.image_size, tile=FLAGS.tile, negative_prompt=FLAGS.negative_prompt)
    result = sampling_job.run(pipeline, job, FLAGS.out)
  print(f"{result['generated']} samples written to {FLAGS.out}/images "
        f"({result['skipped']} were already there), {result['samples_per_sec']:.2f} samples/s "
        f"in batches of {result['batch_size']} ({pipeline.config.train.compute_dtype}), "
        f"{result['compilations']} compilation(s); grid: {FLAGS.out}/grid.png")


if __name__ == "__main__":
  sys.exit(app.run(main, flags_parser=cli.absl_flags_parser()))
