"""The paper's map-, layout- and text-conditioned tasks on MNIST digits on a CPU, end to end.

  python -m ldm_jax.recipes.digit_tasks --task=semantic --workdir=runs/digit_tasks
  python -m ldm_jax.recipes.digit_tasks --task=layout --workdir=runs/digit_tasks
  python -m ldm_jax.recipes.digit_tasks --task=text --workdir=runs/digit_tasks

1. builds the task's dataset from the MNIST digits shipped in the package (the first 8,000
   train, later ones are held out; ldm_jax/data/digit_sets.py): digits with label maps, 48 px
   canvases of 1-3 digits with box files, or digits with captions;
2. trains the quickstart's KL-f4 autoencoder, shared by the three tasks (or reuses one:
   --autoencoder=runs/quickstart/autoencoder);
3. trains the task's LDM (configs/ldm_semantic.py:mnist, ldm_layout.py:mnist,
   ldm_txt2img_folder.py:mnist);
4. samples held-out conditions through sample.py's code and scores them, next to a baseline:
   semantic: IoU between the binarised sample and the requested shape, against the IoU with
   another digit's map (what an unconditioned shape scores) and the autoencoder's own;
   layout: the digit classifier's accuracy on crops at the requested boxes, against the
   same crops of samples made for other layouts, and of the real canvases;
   text: the classifier's accuracy on samples for the digit each prompt names, against chance.
   Writes <workdir>/<task>/results.json and a picture (semantic adds a panorama: a 32x96 map
   sampled at three times the training width).

Every stage resumes when rerun.
"""
from __future__ import annotations

import json
import logging
import os
import time

from ldm_jax import fileio
from ldm_jax.cli import ArgumentParser, friendly_errors, setup_logging
from ldm_jax.data import digit_sets
from ldm_jax.data.demo_sets import build_digits
from ldm_jax.recipes import check_steps, ldm_steps_help

logger = logging.getLogger("ldm_jax")
TASKS = ("semantic", "layout", "text")
TRAIN = (0, 8000)            # packaged MNIST digits the datasets are built from
HELD_OUT_START = 8000        # held-out conditions come from digits 8000 on
CANVAS = 48                  # layout canvases: 64 px (the builder's default) costs 2x on a CPU
# LDM steps per task (--ldm_steps overrides): each recipe within about 15 minutes (layout 17) on
# the slower of this project's 2-core VMs (2.2-8.5 min on a fast one). Layouts learn slowest: the
# classifier's accuracy at the boxes is 22% after 800 steps, 27% after 1,200, 39% after 1,600.
LDM_STEPS = {"semantic": 800, "layout": 1200, "text": 800}


def ldm_config(task: str, data_dir: str, autoencoder_dir: str, steps: int | None = None):
  """The CPU LDM of `task` on the quickstart's KL-f4 latents (32 px digits -> 8x8x3; 48 px
  canvases -> 12x12x3): the quickstart's UNet and training schedule (LDM_STEPS[task] steps
  unless `steps`), with the task's conditioning in place of its class label. `data_dir`: the
  folder digit_sets built."""
  from ldm_jax import quickstart  # pylint: disable=g-import-not-at-top
  c = quickstart.ldm_config(autoencoder_dir, LDM_STEPS[task] if steps is None else steps)
  c.data.source, c.data.path, c.data.split, c.data.eval_split = "image_folder", data_dir, "", ""
  if task == "semantic":
    c.data.path = os.path.join(data_dir, "images")
    c.data.segmentation_dir = os.path.join(data_dir, "maps")
  c.data.image_size = CANVAS if task == "layout" else 32
  c.train.eval_every = 0
  c.cond.type, c.cond.p_uncond = task, 0.1
  if task == "semantic":   # the reference's semantic model: no condition dropout, no guidance
    c.cond.type, c.cond.concat = "concat", "segmentation"
    c.cond.seg_classes, c.cond.rescaler_stages = digit_sets.SEMANTIC_CLASSES, 2
    c.cond.p_uncond, c.sample.guidance_scale = 0.0, 1.0
    c.unet.use_spatial_transformer = False      # plain self-attention blocks: no context
  else:
    c.cond.embed_dim, c.cond.text_depth, c.cond.text_heads = 64, 2, 4
    c.sample.guidance_scale = 3.0
    c.unet.use_spatial_transformer = True
    c.unet.attention_resolutions = (1, 2, 4)    # cross-attention at every level: where, what
  if task == "layout":
    c.cond.num_classes, c.cond.layout_grid, c.data.max_boxes = 10, 16, 3
    c.train.batch_size = 64                     # 12x12 latents: the quickstart's pixels/step
    c.unet.coord_channels = True                # where the boxes are (see benchmarks/RESULTS)
    c.unet.attention_coords = True              # queries know their position ...
    c.cond.layout_bind_objects = True           # ... and box tokens their digit and box
    c.sample.guidance_scale = 6.0               # (800 steps: 15.4% at 1, 18.7% at 3, 22.7% at 6)
  if task == "text":
    c.cond.text_tokenizer, c.cond.text_vocab_size, c.cond.text_max_length = "train", 256, 16
  return c


def _build(task: str, workdir: str, held_out: int) -> tuple[str, str]:
  """(training data folder, held-out folder) of `task`, built once."""
  kind = {"text": "captions"}.get(task, task)
  root = os.path.join(workdir, "data", kind)
  train = build_digits(kind, os.path.join(root, "train"), start=TRAIN[0], count=TRAIN[1],
                       seed=0, canvas=CANVAS)
  test = build_digits(kind, os.path.join(root, "test"), start=HELD_OUT_START, count=held_out,
                      seed=1, canvas=CANVAS)
  return train, test


def _read(paths):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  return np.stack([np.asarray(Image.open(p)) for p in paths])


def _classifier(workdir: str):
  from ldm_jax import quickstart  # pylint: disable=g-import-not-at-top
  from ldm_jax.evaluation import digits  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "classifier", "digits.msgpack")
  if os.path.exists(path):
    return digits.load_classifier(path, (32, 32, 1))
  images, labels = quickstart._real_digits(f"t10k[:{TRAIN[1]}]")  # pylint: disable=protected-access
  variables = digits.train_classifier(images, labels, steps=500)
  digits.save_classifier(variables, path)
  return variables


def _accuracy(classifier, images_u8, labels) -> float:
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ldm_jax.evaluation import digits  # pylint: disable=g-import-not-at-top
  x = images_u8.astype(np.float32)[..., None] / 127.5 - 1.0
  preds, _ = digits.classify(classifier, x)
  return float(np.mean(preds == np.asarray(labels)))


def evaluate_semantic(task_dir, pipeline, test_dir, classifier) -> tuple[dict, list]:
  """IoU of the binarised samples (>= 128) with the requested digit shapes (map > 0)."""
  # pylint: disable=g-import-not-at-top
  import numpy as np
  from ldm_jax import image_tasks
  from ldm_jax.data.preprocess import to_uint8
  from ldm_jax.recipes.cifar_tasks import _reconstruction
  from ldm_jax.task_inputs import list_images
  maps_dir = os.path.join(test_dir, "maps")
  names = list_images(maps_dir, "inputs")
  out = os.path.join(task_dir, "eval", "samples")
  image_tasks.run(pipeline, image_tasks.FileJob("semantic", maps_dir), out)
  maps = _read([os.path.join(maps_dir, n) for n in names])
  samples = _read([image_tasks.output_path(out, n) for n in names])
  real = _read([os.path.join(test_dir, "images", n) for n in names])
  recon = to_uint8(_reconstruction(pipeline, real[..., None].astype(np.float32) / 127.5 - 1))

  def iou(images, shapes):
    a, b = images >= 128, shapes > 0
    return float(np.mean((a & b).sum((1, 2)) / np.maximum((a | b).sum((1, 2)), 1)))
  labels = np.asarray([int(n.split(os.sep)[0]) for n in names])
  results = {"iou_samples_vs_requested_map": iou(samples, maps),
             "iou_samples_vs_another_digits_map": iou(samples, np.roll(maps, 1, axis=0)),
             "iou_autoencoder_reconstruction_vs_map": iou(recon[..., 0], maps),
             "classifier_accuracy_samples_vs_map_class": _accuracy(classifier, samples, labels),
             "num_samples": len(names)}
  # A panorama: three held-out maps side by side, sampled at three times the training width.
  firsts = [int(np.flatnonzero(labels == d)[0]) for d in range(10) if np.any(labels == d)]
  pano_dir = os.path.join(task_dir, "eval", "panorama_map")
  pano_map = np.concatenate([maps[firsts[d]] for d in (2, 5, 7)], axis=1)
  from ldm_jax.training.reporting import save_png  # pylint: disable=g-import-not-at-top
  os.makedirs(pano_dir, exist_ok=True)
  save_png(os.path.join(pano_dir, "panorama.png"), pano_map.astype(np.uint8))
  image_tasks.run(pipeline, image_tasks.FileJob("semantic", pano_dir),
                  os.path.join(task_dir, "eval", "panorama"))
  show = lambda m: (m > 0).astype(np.uint8) * 255  # noqa: E731
  return results, [show(maps[firsts]), samples[firsts], real[firsts]]


def _crops(images_u8, layouts) -> tuple:
  """Crops at each box, resized to 28 px and padded to 32 (how the classifier saw digits)."""
  # pylint: disable=g-import-not-at-top
  import numpy as np
  from PIL import Image
  crops, labels = [], []
  for image, boxes in zip(images_u8, layouts):
    for b in boxes:
      x0, y0, x1, y1 = b["box"]
      crop = Image.fromarray(image[y0:y1, x0:x1]).resize((28, 28), Image.BILINEAR)
      crops.append(digit_sets.pad_digit(np.asarray(crop)))
      labels.append(b["class"])
  return np.stack(crops), np.asarray(labels)


def evaluate_layout(task_dir, pipeline, test_dir, classifier) -> tuple[dict, list]:
  """Classifier accuracy on crops of the samples at their layouts' boxes."""
  from ldm_jax import image_tasks  # pylint: disable=g-import-not-at-top
  from ldm_jax.task_inputs import list_files  # pylint: disable=g-import-not-at-top
  names = list_files(test_dir, "inputs", (".json",), "box files")
  out = os.path.join(task_dir, "eval", "samples")
  image_tasks.run(pipeline, image_tasks.FileJob("layout", test_dir), out)
  layouts = []
  for n in names:
    with open(os.path.join(test_dir, n), encoding="utf-8") as f:
      layouts.append(json.load(f)["boxes"])
  samples = _read([image_tasks.output_path(out, n) for n in names])
  real = _read([os.path.join(test_dir, n.replace(".json", ".png")) for n in names])
  shifted = [layouts[(i + 1) % len(layouts)] for i in range(len(layouts))]
  results = {"accuracy_samples_at_requested_boxes": _accuracy(classifier, *_crops(samples,
                                                                                  layouts)),
             "accuracy_other_layouts_samples_at_these_boxes":
                 _accuracy(classifier, *_crops(samples, shifted)),
             "accuracy_real_canvases_at_boxes": _accuracy(classifier, *_crops(real, layouts)),
             "num_layouts": len(names), "num_boxes": sum(len(b) for b in layouts)}
  return results, [_outlined(samples[:10], layouts[:10]), real[:10]]


def _outlined(images_u8, layouts):
  """Copies of the images with their boxes drawn in grey (for the picture)."""
  out = images_u8.copy()
  for image, boxes in zip(out, layouts):
    for b in boxes:
      x0, y0, x1, y1 = b["box"]
      image[y0, x0:x1] = image[y1 - 1, x0:x1] = image[y0:y1, x0] = image[y0:y1, x1 - 1] = 96
  return out


def evaluate_text(task_dir, pipeline, per_prompt, classifier) -> tuple[dict, list]:
  """Classifier accuracy on samples for "a handwritten <digit>" prompts."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ldm_jax import sampling_job  # pylint: disable=g-import-not-at-top
  prompts = [digit_sets.PROMPT_TEMPLATE.format(word=w) for w in digit_sets.NUMBER_WORDS]
  out = os.path.join(task_dir, "eval", "samples")
  job = sampling_job.job_for(pipeline, prompts=prompts, per_prompt=per_prompt, batch_size=100)
  sampling_job.run(pipeline, job, out)
  data = np.load(os.path.join(out, "samples.npz"))
  images = data["images"][..., 0]
  labels = np.repeat(np.arange(10), per_prompt)
  results = {"accuracy_samples_for_named_digit": _accuracy(classifier, images, labels),
             "chance": 0.1, "prompts": prompts, "num_samples": len(images)}
  return results, [images[labels == d][:10] for d in range(10)]


def run(task: str, workdir: str, *, autoencoder: str = "", ae_steps: int = 300,
        ldm_steps: int | None = None, held_out: int = 300) -> dict:
  """Runs (or resumes) the stages of `task` (LDM_STEPS[task] steps unless `ldm_steps`);
  returns the results it also writes."""
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  from ldm_jax import quickstart
  from ldm_jax.inference import load_pipeline
  from ldm_jax.training.loop import train_and_evaluate
  from ldm_jax.training.reporting import image_grid, save_png
  if task not in TASKS:
    raise ValueError(f"--task: expected one of {', '.join(TASKS)}, got '{task}'")
  ldm_steps = LDM_STEPS[task] if ldm_steps is None else ldm_steps
  check_steps(("--ldm_steps", ldm_steps), *([] if autoencoder else [("--ae_steps", ae_steps)]))
  workdir = os.path.abspath(workdir)
  task_dir = os.path.join(workdir, task)
  times, t0 = {}, time.time()
  logger.info("[1/4] %s digit dataset -> %s/data", task, workdir)
  train_dir, test_dir = _build(task, workdir, held_out)
  ae_dir = autoencoder or os.path.join(workdir, "autoencoder")
  if not autoencoder:
    logger.info("[2/4] autoencoder -> %s", ae_dir)
    train_and_evaluate(quickstart.autoencoder_config(ae_steps), ae_dir, devices=jax.devices())
  times["autoencoder_s"] = time.time() - t0
  ldm_dir = os.path.join(task_dir, "ldm")
  logger.info("[3/4] %s LDM -> %s", task, ldm_dir)
  t = time.time()
  train_and_evaluate(ldm_config(task, train_dir, ae_dir, ldm_steps), ldm_dir,
                     devices=jax.devices())
  times["ldm_s"] = time.time() - t
  logger.info("[4/4] %s on held-out conditions", task)
  t = time.time()
  pipeline, classifier = load_pipeline(ldm_dir), _classifier(workdir)
  if task == "semantic":
    results, rows = evaluate_semantic(task_dir, pipeline, test_dir, classifier)
  elif task == "layout":
    results, rows = evaluate_layout(task_dir, pipeline, test_dir, classifier)
  else:
    results, rows = evaluate_text(task_dir, pipeline, max(1, held_out // 10), classifier)
  picture = os.path.join(task_dir, f"{task}_digits.png")
  save_png(picture, image_grid(np.concatenate(rows)[..., None], ncols=10))
  times["evaluation_s"] = time.time() - t
  # ldm_checkpoint names the step sampled: a workdir trained further before keeps its steps.
  results.update(times, total_s=time.time() - t0, ldm_steps=ldm_steps,
                 ldm_checkpoint=pipeline.source, picture=picture,
                 sampler=f"{pipeline.config.sample.sampler} {pipeline.config.sample.steps} "
                         f"steps, guidance {pipeline.config.sample.guidance_scale:g}")
  fileio.atomic_write_text(os.path.join(task_dir, "results.json"), json.dumps(results, indent=2))
  return results


def main(argv=None):
  parser = ArgumentParser(prog="python -m ldm_jax.recipes.digit_tasks", description=__doc__)
  parser.add_argument("--task", required=True, choices=TASKS)
  parser.add_argument("--workdir", default="runs/digit_tasks")
  parser.add_argument("--autoencoder", default="", help="Reuse this trained autoencoder "
                      "workdir (e.g. runs/quickstart/autoencoder) instead of training one.")
  parser.add_argument("--ae_steps", type=int, default=300)
  parser.add_argument("--ldm_steps", type=int, default=None, help=ldm_steps_help(LDM_STEPS))
  parser.add_argument("--held_out", type=int, default=300,
                      help="Held-out maps / layouts (text: prompts x held_out/10 samples).")
  args = parser.parse_args(argv)
  setup_logging()
  with friendly_errors():
    r = run(args.task, args.workdir, autoencoder=args.autoencoder, ae_steps=args.ae_steps,
            ldm_steps=args.ldm_steps, held_out=args.held_out)
  figures = {k: v for k, v in r.items() if isinstance(v, float) and not k.endswith("_s")}
  print(f"\n{args.task} recipe done in {r['total_s'] / 60:.1f} min\n" +
        "\n".join(f"  {k}: {v:.3f}" for k, v in figures.items()) + f"\n  picture: {r['picture']}")


if __name__ == "__main__":
  main()
