"""Random-access example sources: a user's image folder, MNIST IDX files, tfds datasets, arrays.

Every source has `len(source)` and `source[i] -> dict` with an 'image' (uint8, HWC) and, when the
dataset has them, a 'label' (int) and a 'caption' (str). Random access is what makes the input
pipeline deterministic and resumable: the pipeline only ever asks for example indices.
"""
from __future__ import annotations

import gzip
import importlib.resources
import io
import os
import re
import struct
from typing import Any

import numpy as np
from PIL import Image

from ldm_jax.data import folder_index, sidecars
from ldm_jax.data.folder_index import IMAGE_EXTENSIONS  # noqa: F401  (re-exported)
from ldm_jax.errors import BadImageError, DataError  # noqa: F401  (DataError re-exported)


class Source:
  """Base class: a sized, indexable collection of examples."""

  num_classes: int = 0
  description: str = ""

  def __len__(self) -> int:
    raise NotImplementedError

  def __getitem__(self, index: int) -> dict[str, Any]:
    raise NotImplementedError

  def caption(self, index: int) -> str:
    """Example `index`'s caption ('' if none); sources that know it without decoding the image
    override this (building a tokenizer reads every caption)."""
    return self[index].get("caption", "")


def _to_channels(image: np.ndarray, channels: int) -> np.ndarray:
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == channels:
    return image
  if channels == 3 and image.shape[-1] == 1:
    return np.repeat(image, 3, axis=-1)
  if channels == 1 and image.shape[-1] in (3, 4):
    rgb = image[..., :3].astype(np.float32)
    grey = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.clip(np.round(grey), 0, 255).astype(np.uint8)[..., None]
  if channels == 3 and image.shape[-1] == 4:
    return image[..., :3]
  raise DataError(f"cannot convert an image with {image.shape[-1]} channels to {channels}")


class ImageFolderSource(Source):
  """Images under a folder: one sub-folder per class (labels sorted by name), or flat, with the
  sidecar conditions of ldm_jax/data/sidecars.py (captions, boxes, masks, segmentation maps).

  Images of any size and format that PIL reads; they are resized by the pipeline. Nested
  folders below the class folders are searched too; hidden files and folders are skipped. The
  file list comes from an index (ldm_jax/data/folder_index.py) kept in `index_dir`, or is built
  in memory when index_dir is ''. `mask_dir` and `segmentation_dir` mirror `root`: the same
  relative paths with a .png extension. Only strings and lists are kept, so the source pickles
  cheaply to worker processes.
  """

  def __init__(self, root: str, channels: int = 3, *, index_dir: str = "",
               rebuild_index: bool = False, mask_dir: str = "", segmentation_dir: str = ""):
    if not sidecars.is_dir(root):
      raise DataError(f"data.path: image folder '{root}' does not exist")
    for field, folder in (("mask_dir", mask_dir), ("segmentation_dir", segmentation_dir)):
      if folder and not sidecars.is_dir(folder):
        raise DataError(f"data.{field}: folder '{folder}' does not exist (it mirrors the image "
                        f"folder '{root}')")
    index = folder_index.open_index(root, index_dir, rebuild_index)
    self.root = root
    self.channels = channels
    self.mask_dir, self.segmentation_dir = mask_dir, segmentation_dir
    self.relative = index.files
    self.files = [sidecars.join(root, rel) for rel in index.files]
    self.sizes = np.asarray(index.sizes, np.int64)
    self.classes = index.classes
    self.labels = np.asarray(index.labels, np.int32) if index.classes else None
    self.captions = index.captions
    self.boxes = index.boxes
    self.num_classes = len(self.classes)
    extras = [name for name, present in (("captions", self.captions is not None),
                                         ("boxes", self.boxes is not None),
                                         ("masks", bool(mask_dir)),
                                         ("segmentation maps", bool(segmentation_dir)))
              if present]
    self.description = (f"image folder {root}: {len(self.files)} images" +
                        (f", {len(self.classes)} classes" if self.classes else ", no classes") +
                        "".join(f", {e}" for e in extras))

  def __len__(self):
    return len(self.files)

  def caption(self, index):
    return self.captions[index] if self.captions is not None else ""

  def __getitem__(self, index):
    path = self.files[index]
    image = decode_image(path, self.channels)
    example = {"image": image}
    if self.labels is not None:
      example["label"] = int(self.labels[index])
    if self.captions is not None:
      example["caption"] = self.captions[index]
    png = self.relative[index].rsplit(".", 1)[0] + ".png"
    if self.mask_dir:
      example["mask"] = sidecars.read_mask(sidecars.join(self.mask_dir, png), path,
                                           image.shape[:2])
    if self.segmentation_dir:
      example["segmentation"] = sidecars.read_segmentation(
          sidecars.join(self.segmentation_dir, png), path, image.shape[:2])
    if self.boxes is not None:
      boxes = np.asarray(self.boxes[index], np.float32).reshape(-1, 5)
      example["boxes"] = boxes[:, 1:]
      example["box_classes"] = boxes[:, 0].astype(np.int32)
    return example


def decode_image(path: str, channels: int) -> np.ndarray:
  """The uint8 (H, W, channels) pixels of an image file, decoded in full (a truncated file
  fails here, not later); BadImageError names the file when it cannot be read or decoded."""
  try:
    data = sidecars.read_bytes(path)
  except OSError as e:
    hint = (" (the folder changed since it was indexed: set data.rebuild_index=True)"
            if isinstance(e, FileNotFoundError) else "")
    raise BadImageError(f"data: cannot read image '{path}': {e}{hint}", path) from e
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.load()
      image = np.asarray(im.convert("L" if channels == 1 else "RGB"), np.uint8)
  except Exception as e:  # PIL raises many types for bad files
    if not data:
      reason = "the file is empty (0 bytes)"
    elif isinstance(e, Image.UnidentifiedImageError):
      reason = "not an image format Pillow reads"
    else:
      reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise BadImageError(f"data: cannot read image '{path}': {reason}", path) from e
  return _to_channels(image, channels)


def read_idx(path: str) -> np.ndarray:
  """Reads an IDX file (optionally gzipped), the format of the MNIST distribution."""
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise DataError(f"data: cannot read IDX file '{path}': {e}") from e
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
    raise DataError(f"data: '{path}' is not an unsigned-byte IDX file")
  ndim = data[3]
  dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
  body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if body.size != int(np.prod(dims)):
    raise DataError(f"data: '{path}' is truncated: expected {int(np.prod(dims))} bytes of "
                    f"data, found {body.size}")
  return body.reshape(dims)


class ArraySource(Source):
  """In-memory arrays: images (N, H, W, C) uint8, optional labels and captions."""

  def __init__(self, images, labels=None, captions=None, num_classes=0, description="arrays",
               segmentations=None):
    self.images = np.asarray(images)
    if self.images.ndim == 3:
      self.images = self.images[..., None]
    self.labels = None if labels is None else np.asarray(labels, np.int32)
    self.captions = captions
    self.segmentations = segmentations
    self.num_classes = int(num_classes or (int(self.labels.max()) + 1
                                           if self.labels is not None else 0))
    self.description = f"{description}: {len(self.images)} images"

  def __len__(self):
    return len(self.images)

  def __getitem__(self, index):
    example = {"image": self.images[index]}
    if self.labels is not None:
      example["label"] = int(self.labels[index])
    if self.captions is not None:
      example["caption"] = self.captions[index]
    if self.segmentations is not None:
      example["segmentation"] = self.segmentations[index]
    return example


def mnist_source(folder: str, split: str, channels: int = 1) -> ArraySource:
  """MNIST from the canonical IDX files in `folder` ('train' or 't10k')."""
  if not os.path.isdir(folder):
    raise DataError(f"data.path: MNIST folder '{folder}' does not exist")
  prefix = {"train": "train", "t10k": "t10k", "test": "t10k"}.get(split)
  if prefix is None:
    raise DataError(f"data.split: MNIST splits are 'train' and 't10k', got '{split}'")
  paths = {}
  for kind, stem in (("images", "images-idx3-ubyte"), ("labels", "labels-idx1-ubyte")):
    candidates = [os.path.join(folder, f"{prefix}-{stem}{ext}") for ext in (".gz", "")]
    found = [c for c in candidates if os.path.exists(c)]
    if not found:
      raise DataError(f"data.path: '{folder}' has no {candidates[0]} (MNIST {split} {kind})")
    paths[kind] = found[0]
  images = _to_channels(read_idx(paths["images"])[..., None], channels)
  labels = read_idx(paths["labels"])
  if len(labels) != len(images):
    raise DataError(f"data: MNIST {split} has {len(images)} images but {len(labels)} labels")
  return ArraySource(images, labels, num_classes=10, description=f"MNIST {split} ({folder})")


def packaged_mnist_dir() -> str:
  """The folder of the MNIST test-set IDX files shipped inside ldm_jax (no download)."""
  return str(importlib.resources.files("ldm_jax") / "assets")


class TfdsSource(Source):
  """A tensorflow-datasets catalog dataset read by random access from ArrayRecord files."""

  def __init__(self, name, split, data_dir="", manual_dir="", prepare=True, image_key="image",
               label_key="label", caption_key="", channels=3, segmentation_key="",
               boxes_key="", box_classes_key=""):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    try:
      builder = tfds.builder(name, data_dir=data_dir or None, file_format="array_record")
    except Exception as e:
      raise DataError(f"data.tfds_name: cannot make tfds builder '{name}': {e}") from e
    builder = _prepare_once(builder, name, data_dir, manual_dir, prepare)
    if builder.info.file_format is not None and "array_record" not in str(
        builder.info.file_format).lower():
      raise DataError(f"data.tfds_name: '{name}' in {builder.data_dir} is prepared as "
                      f"{builder.info.file_format}; random access needs ArrayRecord: prepare it "
                      f"again into another data_dir (data.prepare=True does)")
    self.source = builder.as_data_source(split=split)
    features = builder.info.features
    if image_key not in features:
      raise DataError(f"data.image_key: tfds '{name}' has no feature '{image_key}' (features: "
                      f"{sorted(features.keys())})")
    self.image_key, self.label_key, self.caption_key = image_key, label_key, caption_key
    self.segmentation_key = segmentation_key
    self.boxes_key, self.box_classes_key = boxes_key, box_classes_key
    for field, key in (("boxes_key", boxes_key), ("box_classes_key", box_classes_key)):
      if key and key.split("/")[0] not in features:
        raise DataError(f"data.{field}: tfds '{name}' has no feature '{key.split('/')[0]}' "
                        f"(features: {sorted(features.keys())})")
    if segmentation_key and segmentation_key not in features:
      raise DataError(f"data.segmentation_key: tfds '{name}' has no feature "
                      f"'{segmentation_key}' (features: {sorted(features.keys())})")
    self.channels = channels
    self.num_classes = 0
    if label_key:
      if label_key not in features:
        raise DataError(f"data.label_key: tfds '{name}' has no feature '{label_key}' "
                        f"(features: {sorted(features.keys())}); set data.label_key='' for "
                        f"unlabelled data")
      self.num_classes = int(getattr(features[label_key], "num_classes", 0) or 0)
    self.description = f"tfds {name} {split}: {len(self.source)} examples"

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    raw = self.source[int(index)]
    image = np.asarray(raw[self.image_key])
    example = {"image": _to_channels(image.astype(np.uint8), self.channels)}
    if self.label_key:
      example["label"] = int(raw[self.label_key])
    if self.segmentation_key:
      example["segmentation"] = np.asarray(raw[self.segmentation_key])
    if self.boxes_key:
      example["boxes"], example["box_classes"] = tfds_boxes(
          _nested(raw, self.boxes_key), _nested(raw, self.box_classes_key)
          if self.box_classes_key else None, image.shape[:2])
    if self.caption_key:
      value = np.asarray(_nested(raw, self.caption_key)).reshape(-1)
      text = value[0] if value.size else b""
      example["caption"] = text.decode("utf-8") if isinstance(text, bytes) else str(text)
    return example


def _nested(raw, key: str):
  """raw['a']['b'] for key 'a/b' (tfds nests sequence features such as objects/bbox)."""
  for part in key.split("/"):
    raw = raw[part]
  return raw


def tfds_boxes(bbox, classes, shape) -> tuple[np.ndarray, np.ndarray]:
  """tfds BBoxFeature rows (ymin, xmin, ymax, xmax) in [0, 1] and their classes -> boxes
  (N, 4) [x0, y0, x1, y1] in pixels of an image of `shape` (H, W), and int32 classes (zeros
  without a class feature): the layout of the folder's box files."""
  h, w = shape
  b = np.asarray(bbox, np.float32).reshape(-1, 4)
  boxes = np.stack([b[:, 1] * w, b[:, 0] * h, b[:, 3] * w, b[:, 2] * h], axis=-1)
  labels = (np.zeros(len(b), np.int32) if classes is None
            else np.asarray(classes, np.int32).reshape(-1))
  return boxes, labels


def _prepare_once(builder, name, data_dir, manual_dir, prepare):
  """Prepares a tfds dataset on process 0 only; the other hosts wait at a barrier, then open
  what it wrote (data_dir must be shared, like the workdir). Every host reaches the barrier,
  prepared or not, so none waits for a host that skipped it."""
  import jax  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  failure = None
  if jax.process_index() == 0 and not builder.is_prepared():
    if not prepare:
      failure = (f"data.tfds_name: '{name}' is not prepared in {builder.data_dir}; set "
                 f"data.prepare=True to build it")
    else:
      config = tfds.download.DownloadConfig(manual_dir=manual_dir or None)
      try:
        builder.download_and_prepare(download_config=config)
      except Exception as e:  # tfds raises many types; the message names the cause
        failure = (f"data: preparing tfds '{name}' failed (data_dir='{data_dir}', "
                   f"manual_dir='{manual_dir}'): {e}")
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f"ldm_jax tfds prepare {name}")
  if failure is not None:
    raise DataError(failure)
  if jax.process_index() != 0:   # read what process 0 wrote, not what this host saw before
    builder = tfds.builder(name, data_dir=data_dir or None, file_format="array_record")
  if not builder.is_prepared():
    raise DataError(f"data.tfds_name: '{name}' is not prepared in {builder.data_dir} (process "
                    f"0 prepares it: see its log; data.data_dir must be a folder every host "
                    f"sees)")
  return builder


class Subset(Source):
  """Examples [start, stop) of another source."""

  def __init__(self, source: Source, start: int, stop: int):
    self.source, self.start, self.stop = source, start, stop
    self.num_classes = source.num_classes
    self.description = f"{source.description} [{start}:{stop}]"

  def __len__(self):
    return self.stop - self.start

  def __getitem__(self, index):
    if not 0 <= index < len(self):
      raise IndexError(index)
    return self.source[self.start + index]

  def caption(self, index):
    if not 0 <= index < len(self):
      raise IndexError(index)
    return self.source.caption(self.start + index)


_SPLIT = re.compile(r"^(?P<name>[^\[\]]*)(\[(?P<start>[^:\]]*):(?P<stop>[^\]]*)\])?$")


def parse_split(split: str):
  """'train[:90%]' -> ('train', ':90%' parts) as (name, start, stop) strings."""
  m = _SPLIT.match(split.strip())
  if not m:
    raise DataError(f"data.split: cannot parse '{split}' (expected 'name' or 'name[a:b]' with "
                    f"integers or percentages)")
  return m.group("name"), m.group("start"), m.group("stop")


def _bound(text, n, default, split):
  if text is None or text == "":
    return default
  try:
    value = float(text[:-1]) * n / 100 if text.endswith("%") else int(text)
  except ValueError as e:
    raise DataError(f"data.split: bad slice bound '{text}' in '{split}'") from e
  value = int(round(value))
  return max(0, min(n, value + n if value < 0 else value))


def slice_source(source: Source, split: str, start, stop) -> Source:
  if start is None and stop is None:
    return source
  n = len(source)
  a, b = _bound(start, n, 0, split), _bound(stop, n, n, split)
  if b <= a:
    raise DataError(f"data.split: '{split}' selects no examples of the {n} available")
  return Subset(source, a, b)


def open_source(data_config, split: str, *, index_dir: str = "") -> Source:
  """The source for `split` of the configured dataset, with any slice applied.

  image_folder keeps its file index in data.index_dir, else in `index_dir` (the training loop
  passes <workdir>/data_index); with both '' the file list is built in memory."""
  d = data_config
  name, start, stop = parse_split(split)
  if d.source == "tfds":
    # tfds understands the full split syntax itself.
    return TfdsSource(d.tfds_name, split, d.data_dir, d.manual_dir, d.prepare, d.image_key,
                      d.label_key, d.caption_key, d.channels, d.segmentation_key,
                      d.get("boxes_key", ""), d.get("box_classes_key", ""))
  if d.source == "image_folder":
    within = lambda folder: sidecars.join(folder, name) if folder and name else folder  # noqa: E731
    root = within(d.path)
    if name and not sidecars.is_dir(root):
      raise DataError(f"data.split: image folder '{d.path}' has no sub-folder '{name}' "
                      f"(use split='' for the folder itself)")
    source = ImageFolderSource(
        root, d.channels, index_dir=getattr(d, "index_dir", "") or index_dir,
        rebuild_index=getattr(d, "rebuild_index", False),
        mask_dir=within(getattr(d, "mask_dir", "")),
        segmentation_dir=within(getattr(d, "segmentation_dir", "")))
  elif d.source == "mnist":
    source = mnist_source(d.path, name, d.channels)
  elif d.source == "packaged_mnist":
    if name not in ("t10k", "test"):
      raise DataError(f"data.split: the packaged MNIST digits are the 't10k' split (10,000 "
                      f"test digits), got '{name}'")
    source = mnist_source(packaged_mnist_dir(), "t10k", d.channels)
  else:
    raise DataError(f"data.source: unknown source '{d.source}'")
  return slice_source(source, split, start, stop)
