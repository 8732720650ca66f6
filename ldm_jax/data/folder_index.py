"""The file list of an image folder, built once into an index file that hosts and restarts reuse.

Walking a tree of a million images takes minutes on a network file system or a bucket, and
without an index every host did it at every start. The index holds what the walk found: each
image's relative path, class label and size in bytes, and the sidecar facts read once at build
time (captions, boxes; see ldm_jax/data/sidecars.py), so training reads no small files per step.

File format: line 1 is a JSON header {"format", "sha256"}, line 2 the JSON body; sha256 is the
hash of the body's bytes, so a damaged or hand-edited index is noticed and rebuilt.

Staleness: the body records the folder's top-level listing (entry names, and for local folders
their modification times). A new or removed class folder, or files added to or removed from a
class folder, changes it and the index is rebuilt; edits deeper in the tree or inside existing
files (a caption rewritten in place) do not: data.rebuild_index=True forces a rebuild.

Several hosts: process 0 checks, builds and writes the index (atomically); the others wait at a
barrier and read it.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import sys

from ldm_jax import fileio
from ldm_jax.data import sidecars
from ldm_jax.errors import DataError

logger = logging.getLogger("ldm_jax")

FORMAT = "ldm_jax-folder-index-1"
INDEX_SUFFIX = ".index.json"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
SIDECAR_EXTENSIONS = (".txt", ".json")
PROGRESS_EVERY = 10_000
_READERS = 16   # threads reading sidecar files and sizes (latency-bound on buckets and NFS)


@dataclasses.dataclass
class FolderIndex:
  """What an image folder holds; `labels` is None for a flat folder, `captions` None when no
  image has a caption, `boxes` None when no image has a box file (else [] for those without)."""
  root: str
  listing: dict
  ignore: list
  classes: list
  files: list              # relative paths with '/', sorted
  sizes: list              # bytes
  labels: list | None = None
  captions: list | None = None
  boxes: list | None = None   # per image [[class, x0, y0, x1, y1], ...]


def absolute(root: str) -> str:
  return root.rstrip("/") if sidecars.is_remote(root) else os.path.abspath(root)


def index_path(index_dir: str, root: str) -> str:
  """The index file of `root` in `index_dir`: the folder's name plus a hash of its absolute
  path or URL, so several folders (and splits) share one index_dir."""
  root = absolute(root)
  digest = hashlib.sha256(root.encode("utf-8")).hexdigest()[:16]
  name = "".join(c if c.isalnum() or c in "-_" else "_" for c in os.path.basename(root))
  return sidecars.join(index_dir, f"{name or 'root'}-{digest}{INDEX_SUFFIX}")


def _skipped(name: str, ignore) -> bool:
  return name.startswith(".") or name.endswith(INDEX_SUFFIX) or name in ignore


def top_level_listing(root: str, ignore=()) -> dict:
  """{name: mtime in ns (None for URLs)} of the entries directly under `root`."""
  if sidecars.is_remote(root):
    from etils import epath  # pylint: disable=g-import-not-at-top
    return {p.name: None for p in epath.Path(root).iterdir() if not _skipped(p.name, ignore)}
  with os.scandir(root) as entries:
    return {e.name: e.stat().st_mtime_ns for e in entries if not _skipped(e.name, ignore)}


def _progress(count: int, root: str):
  if count % PROGRESS_EVERY == 0:
    logger.info("indexing %s: %d images so far", root, count)


def walk_images(root: str, ignore=()) -> tuple[list, set]:
  """Walks the whole tree once: ([(relative path, bytes)] of the images, sorted by path, and the
  set of relative paths of the .txt/.json files that may be sidecars). Hidden entries and the
  top-level names in `ignore` are skipped."""
  if sidecars.is_remote(root):
    return _walk_remote(root, ignore)
  images, others, seen = [], set(), set()
  stack = [""]
  while stack:
    rel_dir = stack.pop()
    folder = os.path.join(root, *rel_dir.split("/")) if rel_dir else root
    info = os.stat(folder)
    if (info.st_dev, info.st_ino) in seen:   # a symlink loop
      continue
    seen.add((info.st_dev, info.st_ino))
    with os.scandir(folder) as it:
      entries = sorted(it, key=lambda e: e.name)
    subdirs = []
    for e in entries:
      if _skipped(e.name, ignore if not rel_dir else ()):
        continue
      rel = f"{rel_dir}/{e.name}" if rel_dir else e.name
      if e.is_dir():
        subdirs.append(rel)
      elif e.name.lower().endswith(IMAGE_EXTENSIONS):
        images.append((rel, e.stat().st_size))
        _progress(len(images), root)
      elif e.name.lower().endswith(SIDECAR_EXTENSIONS):
        others.add(rel)
    stack += reversed(subdirs)
  images.sort()
  return images, others


def _walk_remote(root, ignore):
  from etils import epath  # pylint: disable=g-import-not-at-top
  base = epath.Path(root)
  paths, others = [], set()
  for folder, dirnames, filenames in base.walk():
    rel_dir = "/".join(folder.relative_to(base).parts)
    dirnames[:] = sorted(d for d in dirnames if not _skipped(d, ignore if not rel_dir else ()))
    for name in sorted(filenames):
      if _skipped(name, ignore if not rel_dir else ()):
        continue
      rel = f"{rel_dir}/{name}" if rel_dir else name
      if name.lower().endswith(IMAGE_EXTENSIONS):
        paths.append(rel)
        _progress(len(paths), root)
      elif name.lower().endswith(SIDECAR_EXTENSIONS):
        others.add(rel)
  with concurrent.futures.ThreadPoolExecutor(_READERS) as pool:
    sizes = list(pool.map(lambda rel: int(base.joinpath(rel).stat().length), paths))
  return sorted(zip(paths, sizes)), others


def _stem(rel: str) -> str:
  return rel.rsplit(".", 1)[0]


def build(root: str, ignore=()) -> FolderIndex:
  """Walks `root` and reads its sidecar captions and boxes (see the module docstring)."""
  try:
    return _build(absolute(root), sorted(ignore))
  except OSError as e:
    raise DataError(f"data.path: cannot list the image folder '{root}': {e}") from e


def _build(root, ignore):
  listing = top_level_listing(root, ignore)
  is_image = lambda name: name.lower().endswith(IMAGE_EXTENSIONS)  # noqa: E731
  top_images = [n for n in listing if is_image(n)]
  subdirs = sorted(n for n in listing if not is_image(n) and sidecars.is_dir(
      sidecars.join(root, n)))
  classes = subdirs if subdirs and not top_images else []
  images, others = walk_images(root, ignore)
  if not images:
    raise DataError(f"data.path: no images ({', '.join(IMAGE_EXTENSIONS)}) found under "
                    f"'{root}'")
  files = [rel for rel, _ in images]
  index = FolderIndex(root=root, listing=listing, ignore=ignore, classes=classes, files=files,
                      sizes=[size for _, size in images])
  if classes:
    number = {c: i for i, c in enumerate(classes)}
    index.labels = [number[rel.split("/", 1)[0]] for rel in files]
  index.captions = _captions(root, files, others, listing)
  index.boxes = _boxes(root, files, others)
  return index


def _read_all(fn, paths):
  with concurrent.futures.ThreadPoolExecutor(_READERS) as pool:
    return list(pool.map(fn, paths))


def _captions(root, files, others, listing):
  from_jsonl = {}
  if sidecars.CAPTIONS_FILE in listing:
    from_jsonl = sidecars.read_captions_jsonl(sidecars.join(root, sidecars.CAPTIONS_FILE))
    unknown = len(set(from_jsonl) - set(files))
    if unknown:
      logger.warning("%s: %d captions name files that are not images of this folder",
                     sidecars.join(root, sidecars.CAPTIONS_FILE), unknown)
  with_txt = [rel for rel in files if _stem(rel) + ".txt" in others]
  if not with_txt and not from_jsonl:
    return None
  texts = dict(zip(with_txt, _read_all(
      lambda rel: sidecars.read_caption(sidecars.join(root, _stem(rel) + ".txt")), with_txt)))
  return [texts.get(rel, from_jsonl.get(rel, "")) for rel in files]


def _boxes(root, files, others):
  with_json = [rel for rel in files if _stem(rel) + ".json" in others]
  found = dict(zip(with_json, _read_all(
      lambda rel: sidecars.read_boxes(sidecars.join(root, _stem(rel) + ".json")), with_json)))
  if all(v is None for v in found.values()):
    return None
  return [found.get(rel) or [] for rel in files]


# -- the index file ----------------------------------------------------------------------------
def _body(index: FolderIndex) -> bytes:
  return json.dumps(dataclasses.asdict(index), ensure_ascii=False,
                    separators=(",", ":")).encode("utf-8")


def fingerprint(body: bytes) -> str:
  return hashlib.sha256(body).hexdigest()


def write(index: FolderIndex, path: str):
  """Writes `index` to `path`: atomically for a local path; a bucket object appears whole."""
  body = _body(index)
  header = json.dumps({"format": FORMAT, "sha256": fingerprint(body)}).encode("utf-8")
  data = header + b"\n" + body + b"\n"
  if sidecars.is_remote(path):
    from etils import epath  # pylint: disable=g-import-not-at-top
    epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
    epath.Path(path).write_bytes(data)
  else:
    fileio.atomic_write_bytes(path, data)


def read(path: str) -> tuple[FolderIndex | None, str]:
  """(the index in `path`, '') or (None, why it cannot be used)."""
  try:
    data = sidecars.read_bytes(path)
  except FileNotFoundError:
    return None, "no index yet"
  except OSError as e:
    return None, f"cannot read it ({e})"
  header, _, body = data.partition(b"\n")
  body = body.rstrip(b"\n")
  try:
    head = json.loads(header)
  except ValueError:
    return None, "its header is damaged"
  if not isinstance(head, dict) or head.get("format") != FORMAT:
    return None, f"it is not a {FORMAT} file"
  if head.get("sha256") != fingerprint(body):
    return None, "its fingerprint does not match its content (damaged or edited)"
  try:
    return FolderIndex(**json.loads(body)), ""
  except (ValueError, TypeError) as e:
    return None, f"its content does not parse ({e})"


def staleness(index: FolderIndex, root: str, ignore=()) -> str:
  """Why `index` no longer describes `root` ('' when it still does)."""
  root = absolute(root)
  if index.root != root:
    return f"it indexes '{index.root}'"
  if index.ignore != sorted(ignore):
    return "the skipped top-level folders changed"
  listing = top_level_listing(root, ignore)
  if listing != index.listing:
    added, removed = set(listing) - set(index.listing), set(index.listing) - set(listing)
    if added or removed:
      return f"the top-level entries changed ({len(added)} new, {len(removed)} gone)"
    return "top-level entries were modified"
  return ""


def _ignored_under(root: str, index_dir: str) -> list:
  """[index_dir's name] when index_dir is a folder directly under `root`: not a class, and its
  changes (each write) must not make the folder look changed. An index_dir that is `root`
  itself needs nothing (index files are skipped by name), nor one deeper down (created before
  the listing is taken, it changes no top-level entry afterwards)."""
  if sidecars.is_remote(root) or sidecars.is_remote(index_dir):
    return []
  rel = os.path.relpath(os.path.abspath(index_dir), os.path.abspath(root))
  return [rel] if rel != "." and not rel.startswith("..") and os.sep not in rel else []


def open_index(root: str, index_dir: str = "", rebuild: bool = False) -> FolderIndex:
  """The index of image folder `root`: read from `index_dir` when current, else built (and
  written there by process 0). With no index_dir it is built in memory on every host."""
  if not index_dir:
    return build(root)
  ignore = _ignored_under(root, index_dir)
  path = index_path(index_dir, root)
  jax = sys.modules.get("jax")   # several processes exist only once jax is imported
  processes = jax.process_count() if jax is not None else 1
  index, failure = None, None
  if processes == 1 or jax.process_index() == 0:
    try:
      index = _current_or_built(root, index_dir, path, ignore, rebuild)
    except (DataError, OSError) as e:
      if isinstance(e, OSError):   # e.g. an index_dir that cannot be created
        e = DataError(f"data.index_dir: cannot index image folder '{root}' in "
                      f"'{index_dir}': {e}")
      if processes == 1:
        raise e from None
      failure = e   # raised after the barrier, so no host waits for one that left
  if processes > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f"ldm_jax folder index {path}")
    if failure is not None:
      raise failure
    if jax.process_index() != 0:
      index, why = read(path)
      if index is None:
        raise DataError(f"data.index_dir: cannot use the index '{path}' that process 0 "
                        f"writes ({why}); see process 0's log, and make data.index_dir a "
                        f"folder every host sees")
  return index


def _current_or_built(root, index_dir, path, ignore, rebuild) -> FolderIndex:
  if not sidecars.is_remote(index_dir):
    os.makedirs(index_dir, exist_ok=True)
  index, why = (None, "data.rebuild_index=True") if rebuild else read(path)
  if index is not None:
    why = staleness(index, root, ignore)
    if not why:
      logger.info("image folder %s: reusing index %s (%d images)", absolute(root), path,
                  len(index.files))
      return index
  logger.info("image folder %s: building index %s (%s)", absolute(root), path, why)
  index = build(root, ignore)
  try:
    write(index, path)
  except OSError as e:
    raise DataError(f"data.index_dir: cannot write the index '{path}': {e}") from e
  logger.info("image folder %s: indexed %d images", absolute(root), len(index.files))
  return index
