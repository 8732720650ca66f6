"""Sampling jobs whose inputs are files: upscale a folder (super-resolution), inpaint images with
masks, render semantic label maps and box layouts, on every device, one output PNG per input.

  upscale  a super-resolution model (cond.concat='lowres') turns each image of --inputs, of any
           size, into one f times larger (f = the first stage's factor, x4 for LDM-SR). Sides
           are padded (edge) to the UNet's multiple and the padding cropped away; with --tile
           the UNet and the decoder run on overlapping tiles, so large photos fit. The output
           is then back-projected onto its input (--consistency iterations, default 3:
           data/degradations.back_project), so that downsampled it matches the input.
  inpaint  fills the white region of each --masks PNG (same relative path as its image, same
           size) in its image: an inpainting model (cond.concat='inpaint') conditions on the
           masked image and also keeps the known latents at every step (--keep_known); any
           other unconditional or class model inpaints by mask-blend sampling alone. The known
           pixels are pasted back (composite), so they equal the input, and the fill is
           Poisson-blended into them (--seamless, default on: compositing.py).
           --tile bounds the denoiser's and decoder's memory; the encoder sees the whole image.
  semantic a semantic-synthesis model (cond.concat='segmentation') renders each label-map PNG
           of --inputs (one class index per pixel) at the map's size, which may be larger than
           the training size (the UNet is convolutional: the paper's landscape panoramas).
  layout   a layout-to-image model (cond.type='layout') renders each box file (.json, as the
           training sidecars: {"boxes": [{"class": c, "box": [x0, y0, x1, y1]}]}) of --inputs
           on a canvas of --image_size (default the training size), boxes in its pixels.

Outputs go to <out>/images/<the input's relative path>.png; a rerun skips the outputs already
there (the job is resumable), and input i's noise derives from (seed, i) as in sampling_job.
Every input is read and checked before any compute: a file that cannot be read, a mask of
another size than its image, a label map with classes the model lacks, a box outside the canvas,
stops the job with one line naming the file.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ldm_jax import compositing, locks
from ldm_jax.data import degradations
from ldm_jax.data.preprocess import to_float
from ldm_jax.errors import JobError
from ldm_jax.inference import Pipeline
from ldm_jax.models.build import resolve_dtype
from ldm_jax.sampling_job import (Progress, Writer, auto_batch_size, check_job, digest,
                                  global_batch)
from ldm_jax.task_inputs import (list_files, list_images, read_image, read_label_map,
                                 read_layout, read_mask)

logger = logging.getLogger("ldm_jax")
TASKS = ("upscale", "inpaint", "semantic", "layout")


@dataclasses.dataclass
class FileJob:
  """What to do with which files, and how to sample."""
  task: str
  inputs: str
  masks: str | None = None
  label: int | None = None     # inpaint with a class model: the class of every fill
  seed: int = 0
  batch_size: int = 0          # 0: auto
  sampler: str | None = None
  steps: int | None = None
  eta: float | None = None
  guidance_scale: float | None = None
  spacing: str | None = None
  tile: int = 0
  composite: bool = True
  seamless: bool = True        # inpaint with composite: Poisson-blend the fill (else paste)
  keep_known: bool = True      # inpaint with an inpainting model: mask-blend at every step too
  consistency: int = 3         # upscale: back-projection iterations onto the input (0: off)
  image_size: int = 0          # layout: the canvas side (0: the model's training size)


@dataclasses.dataclass
class _Item:
  """One input file: where it is, its noise index, and its (unpadded) size."""
  index: int          # position in the sorted input list: the noise seed
  relative: str
  size: tuple[int, int]
  mask_path: str | None = None


def _pad_to(x: np.ndarray, multiple: int) -> np.ndarray:
  h, w = x.shape[:2]
  ph, pw = -h % multiple, -w % multiple
  return np.pad(x, ((0, ph), (0, pw), (0, 0)), mode="edge") if ph or pw else x


def _padded_shape(size, multiple):
  return tuple(-(-d // multiple) * multiple for d in size)


def check_task(pipeline: Pipeline, job: FileJob) -> str:
  """'sr', 'concat_inpaint', 'blend_inpaint', 'semantic' or 'layout': how the model does the
  job, or a JobError."""
  cond = pipeline.ldm.cond
  if job.task not in TASKS:
    raise JobError(f"--task: expected one of generate, {', '.join(TASKS)}, got '{job.task}'")
  if job.task == "upscale" and job.consistency < 0:
    raise JobError(f"--consistency: expected a number of iterations >= 0, got {job.consistency}")
  if job.image_size and job.task != "layout":
    raise JobError(f"--image_size: --task={job.task} takes the size of each input; drop it")
  if job.task == "semantic":
    if cond.concat != "segmentation" or cond.context or cond.adm:
      raise JobError("--task=semantic: this model is not a semantic-synthesis model "
                     "(cond.concat='segmentation'); train one with configs/ldm_semantic.py")
    return "semantic"
  if job.task == "layout":
    if cond.context != "layout" or cond.concat:
      raise JobError("--task=layout: this model is not a layout-to-image model "
                     "(cond.type='layout'); train one with configs/ldm_layout.py")
    multiple = pipeline.ldm.first.downsample_factor * pipeline.ldm.unet_multiple
    if job.image_size % multiple:
      raise JobError(f"--image_size: {job.image_size} must be a multiple of {multiple} (the "
                     f"first stage's factor times the UNet's downsamplings)")
    return "layout"
  if job.task == "upscale":
    if cond.concat != "lowres":
      raise JobError("--task=upscale: this model is not a super-resolution model "
                     "(cond.concat='lowres'); train one with configs/ldm_sr.py (its cifar variant: "
                     "python -m ldm_jax.recipes.cifar_tasks --task=sr)")
    if cond.context or cond.adm:
      raise JobError("--task=upscale: models that also take classes or text are not supported "
                     "by this task yet")
    return "sr"
  if not job.masks:
    raise JobError("--task=inpaint: give --masks (a folder of PNGs mirroring --inputs; white = "
                   "fill)")
  if not os.path.isdir(job.masks):
    raise JobError(f"--masks: no such folder '{job.masks}'")
  if cond.context in ("text", "layout") or cond.concat not in ("", "inpaint"):
    raise JobError(f"--task=inpaint: needs an inpainting model or an unconditional or class "
                   f"model; this one takes {cond.concat or cond.context} conditions")
  classy = cond.context == "class" or cond.adm
  if classy and job.label is None:
    raise JobError(f"--task=inpaint: this model is class-conditional: give --classes=C (one "
                   f"of its {pipeline.num_classes} classes) for the fills")
  if not classy and job.label is not None:
    raise JobError("--classes: this model is not class-conditional; drop --classes")
  return "concat_inpaint" if cond.concat == "inpaint" else "blend_inpaint"


def _canvas(pipeline: Pipeline, job: FileJob) -> tuple[int, int]:
  side = job.image_size or pipeline.config.data.image_size
  return side, side


def _read_input(pipeline: Pipeline, job: FileJob, mode: str, relative: str):
  """The model input of one file: an image, a label map, or (boxes, classes)."""
  path = os.path.join(job.inputs, relative)
  if mode == "semantic":
    return read_label_map(path, pipeline.config.cond.seg_classes)
  if mode == "layout":
    return read_layout(path, _canvas(pipeline, job), pipeline.num_classes,
                       pipeline.config.data.max_boxes)
  return read_image(path, pipeline.ldm.first.channels, "inputs")


def _items(pipeline: Pipeline, job: FileJob, mode: str) -> list[_Item]:
  """Every input, decoded once to check it (and its mask) before any compute; the pixels are
  read again per batch (_load), so memory holds one batch, not the folder."""
  items, stems = [], {}
  files = (list_files(job.inputs, "inputs", (".json",), "box files (.json)") if mode == "layout"
           else list_images(job.inputs, "inputs"))
  for i, rel in enumerate(files):
    stem = os.path.splitext(rel)[0]
    if stem in stems:
      raise JobError(f"--inputs: '{stems[stem]}' and '{rel}' would both be written to "
                     f"{stem}.png (and share a mask); rename one")
    stems[stem] = rel
    path = os.path.join(job.inputs, rel)
    data = _read_input(pipeline, job, mode, rel)
    size = _canvas(pipeline, job) if mode == "layout" else data.shape[:2]
    mask_path = None
    if mode.endswith("inpaint"):
      mask_path = os.path.join(job.masks, os.path.splitext(rel)[0] + ".png")
      if not os.path.isfile(mask_path):
        raise JobError(f"--masks: no mask '{mask_path}' for image '{path}' (masks are PNGs at "
                       f"the image's relative path)")
      read_mask(mask_path, size, path)
    items.append(_Item(i, rel, size, mask_path))
  return items


def _load(pipeline: Pipeline, job: FileJob, mode: str,
          item: _Item) -> tuple[dict, np.ndarray | None, np.ndarray | None]:
  """(the model's inputs padded to its multiple, the image and mask for the composite)."""
  ldm = pipeline.ldm
  data = _read_input(pipeline, job, mode, item.relative)
  multiple = ldm.first.downsample_factor * ldm.unet_multiple
  if mode == "sr":
    lowres = to_float(data)
    return {"lowres": _pad_to(lowres, ldm.unet_multiple)}, lowres, None
  if mode == "semantic":
    return {"segmentation": _pad_to(data[..., None], multiple)[..., 0]}, None, None
  if mode == "layout":
    return {"boxes": data[0], "box_classes": data[1]}, None, None
  image = data
  mask = read_mask(item.mask_path, item.size, item.relative)
  ph, pw = -mask.shape[0] % multiple, -mask.shape[1] % multiple
  inputs = {"image": to_float(_pad_to(image, multiple)),
            "mask": np.pad(mask, ((0, ph), (0, pw), (0, 0)))}   # padding is kept, not filled
  if job.label is not None:
    inputs["label"] = np.int32(job.label)
  return inputs, to_float(image), mask


def _output_size(pipeline: Pipeline, item: _Item, mode: str) -> tuple[int, int]:
  f = pipeline.ldm.first.downsample_factor
  return (item.size[0] * f, item.size[1] * f) if mode == "sr" else item.size


def _finish(pipeline: Pipeline, job: FileJob, mode: str, item: _Item, image: np.ndarray,
            image_in: np.ndarray | None, mask: np.ndarray | None) -> np.ndarray:
  """A sample cropped to its input's output size, then composited (inpaint) or back-projected
  onto its input (upscale) as the job asks."""
  h, w = _output_size(pipeline, item, mode)
  image = image[:h, :w]
  if mode.endswith("inpaint") and job.composite:
    return compositing.composite(image_in, image, mask, job.seamless)
  if mode == "sr" and job.consistency:
    return degradations.back_project(image, image_in, job.consistency)
  return image


# Job fields that act in these modes only; elsewhere they stay out of the job's spec, so that
# they cannot block a resume (seamless acts only with composite, too).
_MODE_FIELDS = {"consistency": ("sr",), "seamless": ("concat_inpaint", "blend_inpaint"),
                "keep_known": ("concat_inpaint",)}


def _spec(pipeline: Pipeline, job: FileJob, items: list[_Item], mode: str) -> dict:
  spec = dataclasses.asdict(job)
  spec.pop("batch_size")
  spec["inputs"] = digest([(it.relative, list(it.size)) for it in items])
  spec["masks"] = bool(job.masks)
  for field, modes in _MODE_FIELDS.items():
    if mode not in modes:
      spec.pop(field)
  if not job.composite:
    spec.pop("seamless", None)
  spec["model"] = pipeline.source
  spec["dtype"] = resolve_dtype(pipeline.config.train.compute_dtype)
  return spec


def output_path(out: str, relative: str) -> str:
  return os.path.join(out, "images", os.path.splitext(relative)[0] + ".png")


def run(pipeline: Pipeline, job: FileJob, out: str, mesh: Mesh | None = None) -> dict:
  """Runs (or resumes) a file job; returns {'generated', 'skipped', 'seconds',
  'samples_per_sec', 'compilations'}."""
  mode = check_task(pipeline, job)
  inputs, output = os.path.realpath(job.inputs), os.path.realpath(out)
  if output == inputs or output.startswith(inputs + os.sep):
    raise JobError(f"--out: '{out}' lies inside --inputs '{job.inputs}'; its outputs would be "
                   f"read as inputs next time; write elsewhere")
  if job.label is not None and not 0 <= job.label < pipeline.num_classes:
    raise JobError(f"--classes: {job.label} is outside the model's {pipeline.num_classes} "
                   f"classes")
  items = _items(pipeline, job, mode)
  with locks.lock_folder(out, "sampling job", enabled=jax.process_index() == 0):
    mesh = mesh or Mesh(np.asarray(jax.devices()), ("data",))
    check_job(out, _spec(pipeline, job, items, mode), pipeline.trained_dtype)
    multihost_utils.sync_global_devices("ldm_jax file job start")
    todo = [it for it in items if not os.path.exists(output_path(out, it.relative))]
    logger.info("%s: %d input(s), %d already done, on %d %s device(s)", job.task, len(items),
                len(items) - len(todo), mesh.devices.size, mesh.devices.flat[0].platform)
    generate, params, frozen = _compile(pipeline, job, mode, mesh)
    key = jax.random.PRNGKey(job.seed)
    progress = Progress(len(items), len(items) - len(todo))
    with Writer(out) as writer:
      for group in _batches(todo, job, pipeline, mesh, mode):
        loaded = [_load(pipeline, job, mode, it) for it in group]
        cond = {k: np.stack([inputs[k] for inputs, _, _ in loaded]) for k in loaded[0][0]}
        idx = np.asarray([it.index for it in group], np.int32)
        images = np.asarray(multihost_utils.process_allgather(
            generate(params, frozen, key, *global_batch((idx, cond), mesh)), tiled=True))
        if jax.process_index() == 0:   # the writer's thread finishes each output once, while
          new = {}                     # the devices run the next batch (padding repeats the
          for it, (_, image_in, mask), image in zip(group, loaded, images):   # last item)
            new.setdefault(output_path(out, it.relative), functools.partial(
                _finish, pipeline, job, mode, it, image, image_in, mask))
          for path in {os.path.dirname(p) for p in new}:
            os.makedirs(path, exist_ok=True)
          writer.put(list(new.items()))
        progress.advance(len({it.index for it in group}))
    multihost_utils.sync_global_devices("ldm_jax file job end")
  return {"generated": writer.written, "skipped": len(items) - len(todo),
          "seconds": time.time() - progress.t0, "samples_per_sec": progress.rate,
          "compilations": generate._cache_size()}  # pylint: disable=protected-access


def _batches(items: list[_Item], job: FileJob, pipeline: Pipeline, mesh: Mesh, mode: str):
  """Batches of inputs of one padded shape, in input order within a shape; a short last batch
  is padded (by repeating its last item) to the group's batch size, a multiple of the device
  count."""
  n_dev = mesh.devices.size
  if job.batch_size and job.batch_size % n_dev:
    raise JobError(f"--batch_size ({job.batch_size}) must be divisible by the {n_dev} devices "
                   f"(or 0 to choose one)")
  ldm = pipeline.ldm
  multiple = ldm.unet_multiple * (1 if mode == "sr" else ldm.first.downsample_factor)
  by_shape: dict[tuple, list[_Item]] = {}
  for it in items:
    by_shape.setdefault(_padded_shape(it.size, multiple), []).append(it)
  for shape, group in by_shape.items():
    lat = shape if mode == "sr" else ldm.latent_shape(1, shape)[1:3]
    if job.tile:
      lat = (min(lat[0], job.tile), min(lat[1], job.tile))
    size = job.batch_size or auto_batch_size(len(group), lat, n_dev,
                                             mesh.devices.flat[0].platform)
    size = min(size, -(-len(group) // n_dev) * n_dev)
    for s in range(0, len(group), size):   # a short last chunk is padded to the batch: the
      chunk = group[s:s + size]              # same program serves it
      yield chunk + [chunk[-1]] * (size - len(chunk))


def _compile(pipeline: Pipeline, job: FileJob, mode: str, mesh: Mesh):
  rep, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  generate = jax.jit(pipeline.make_generate(
      sampler=job.sampler, steps=job.steps, eta=job.eta, guidance_scale=job.guidance_scale,
      spacing=job.spacing, image_size=_canvas(pipeline, job) if mode == "layout" else None,
      tile=job.tile, inpaint=mode == "blend_inpaint" or (mode == "concat_inpaint"
                                                          and job.keep_known),
      tile_denoising=True),
      in_shardings=(rep, rep, rep, sharded, sharded), out_shardings=sharded)
  return generate, jax.device_put(pipeline.params, rep), jax.device_put(pipeline.frozen, rep)
