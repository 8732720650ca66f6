"""The input pipeline on grain: seeded, host-sharded, resumable batches of a random-access
source, prepared by threads or worker processes and prefetched to the devices.

Examples form one endless stream of global positions 0, 1, 2, ...; position p is example
`perm_e[p mod N]` of epoch e = p // N, where perm_e is a permutation seeded by (seed, e).
Augmentation draws from an RNG seeded by (seed, p). A batch is therefore a pure function of
(seed, position), whatever the number of hosts, workers or restarts: the iterator's whole
state is the position of the next batch (plus the count of skipped bad files), which
checkpoints save and resumed runs restore, on any number of hosts.

Each host builds only its slice of every global batch (host h of H takes positions
[p + h*B/H, p + (h+1)*B/H)). grain runs it: a MapDataset whose element b is this host's slice
of global batch b, read ahead by `prefetch` threads (data.workers = 0) or by worker processes
(data.workers > 0, each one taking every workers-th batch; grain hands them back in order).
grain's own iterator state is not what checkpoints hold: it depends on the worker count,
while a position resumes under any worker and host count.

A bad image (BadImageError from the source) either stops the pipeline (on_bad_image='error')
or is replaced by another example drawn deterministically from (seed, position)
(on_bad_image='skip'), so a resumed run still sees the batches it would have seen.
"""
from __future__ import annotations

import collections
import logging
import os
import threading
from typing import Any, Callable, Iterator

import jax
import numpy as np

from ldm_jax.data.sources import DataError, Source
from ldm_jax.errors import BadImageError, LdmJaxError

logger = logging.getLogger("ldm_jax")

ExampleFn = Callable[[dict, np.random.Generator], dict]

# Batches are numbered from 0 to this (an endless stream for grain's sized datasets).
_ENDLESS = 2 ** 62
# Tries to find a readable substitute for a bad image before giving up.
_SUBSTITUTE_TRIES = 32


def default_workers() -> int:
  """Worker processes when data.workers = -1: a quarter of the cores this process may use (at
  most 16); none on small machines, where processes only compete with the step for the cores."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
      os.cpu_count() or 1)
  return 0 if cores < 8 else min(16, cores // 4)


def _stack(examples: list[dict]) -> dict[str, np.ndarray]:
  keys = examples[0].keys()
  return {k: np.stack([np.asarray(e[k]) for e in examples]) for k in keys}


class _Order:
  """Maps a global position to an example index (seeded per-epoch permutations)."""

  def __init__(self, n: int, seed: int, shuffle: bool):
    self.n, self.seed, self.shuffle = n, seed, shuffle
    self._epoch, self._perm = -1, None
    self._lock = threading.Lock()

  def __getstate__(self):   # sent to worker processes without the cached permutation
    return {"n": self.n, "seed": self.seed, "shuffle": self.shuffle}

  def __setstate__(self, state):
    self.__init__(state["n"], state["seed"], state["shuffle"])

  def __call__(self, position: int) -> int:
    if not self.shuffle:
      return position % self.n
    epoch = position // self.n
    with self._lock:
      if epoch != self._epoch:
        self._perm = np.random.default_rng([self.seed, 1, epoch]).permutation(self.n)
        self._epoch = epoch
      return int(self._perm[position % self.n])


class HostBatch:
  """Batch number b -> (this host's slice of global batch b, the bad files it skipped).

  Picklable, so grain can run it in worker processes.
  """

  def __init__(self, source: Source, example_fn: ExampleFn, *, seed: int, shuffle: bool,
               global_batch: int, process_index: int, process_count: int,
               on_bad_image: str = "error"):
    if on_bad_image not in ("error", "skip"):
      raise DataError(f"data.on_bad_image: expected 'error' or 'skip', got '{on_bad_image}'")
    self.source, self.example_fn, self.seed = source, example_fn, seed
    self.order = _Order(len(source), seed, shuffle)
    self.global_batch = global_batch
    self.local_batch = global_batch // process_count
    self.process_index, self.on_bad_image = process_index, on_bad_image

  def raw(self, position: int) -> tuple[dict, list[str]]:
    """The source example at a position, and the bad files passed over to find it."""
    index, bad = self.order(position), []
    for attempt in range(_SUBSTITUTE_TRIES):
      try:
        return self.source[index], bad
      except BadImageError as e:
        if self.on_bad_image == "error":
          raise
        bad.append(e.path)
        index = int(np.random.default_rng([self.seed, 3, position, attempt]).integers(
            len(self.source)))
    raise DataError(f"data: {_SUBSTITUTE_TRIES} images in a row could not be read (last: "
                    f"'{bad[-1]}'); check the dataset")

  def example(self, position: int) -> tuple[dict, list[str]]:
    """The preprocessed example at a global position (deterministic), and any skipped files."""
    raw, bad = self.raw(position)
    return self.example_fn(raw, np.random.default_rng([self.seed, 2, position])), bad

  def __call__(self, batch_number: int) -> tuple[dict[str, np.ndarray], list[str]]:
    start = batch_number * self.global_batch + self.process_index * self.local_batch
    examples, bad = [], []
    for position in range(start, start + self.local_batch):
      example, skipped = self.example(position)
      examples.append(example)
      bad += skipped
    return _stack(examples), bad


def _user_error(error: BaseException) -> BaseException:
  """The LdmJaxError behind an exception grain re-raised (it may wrap workers' errors)."""
  seen = set()
  while error is not None and id(error) not in seen:
    if isinstance(error, LdmJaxError):
      return error
    seen.add(id(error))
    error = error.__cause__ or error.__context__
  return None


class InputPipeline:
  """Endless host-local batches of `source`, in a seeded order, resumable from `get_state()`.

  workers: worker processes (0 = threads in this process); prefetch: batches read ahead (by
  as many threads, in this process or in each worker).
  """

  def __init__(self, source: Source, example_fn: ExampleFn, *, global_batch: int, seed: int,
               shuffle: bool = True, workers: int = 0, prefetch: int = 2,
               on_bad_image: str = "error", process_index: int | None = None,
               process_count: int | None = None):
    if len(source) == 0:
      raise DataError(f"data: {source.description} has no examples")
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    if global_batch % self.process_count:
      raise DataError(f"train.batch_size ({global_batch}) must be divisible by the number of "
                      f"hosts ({self.process_count})")
    self.source, self.global_batch, self.seed = source, global_batch, seed
    self.local_batch = global_batch // self.process_count
    self.host_batch = HostBatch(source, example_fn, seed=seed, shuffle=shuffle,
                                global_batch=global_batch, process_index=self.process_index,
                                process_count=self.process_count, on_bad_image=on_bad_image)
    self.workers, self.prefetch = max(0, workers), max(1, prefetch)
    self._position = 0          # global position of the next batch handed out
    self.skipped = 0            # bad files skipped in the batches handed out (this host)
    self._reported: set[str] = set()
    self._iterator = None

  # -- state -----------------------------------------------------------------------------------
  def get_state(self) -> dict[str, Any]:
    return {"position": int(self._position), "seed": int(self.seed),
            "global_batch": int(self.global_batch), "skipped": int(self.skipped)}

  def set_state(self, state: dict[str, Any]):
    if int(state.get("seed", self.seed)) != self.seed:
      raise DataError(f"data: the checkpoint's data order was seeded with {state['seed']} but "
                      f"this run uses seed {self.seed}; resuming would repeat examples")
    if int(state["position"]) % self.global_batch:
      raise DataError(f"data: the checkpoint stopped at example {state['position']}, which is "
                      f"not a multiple of train.batch_size ({self.global_batch}); resume with "
                      f"the batch size it was trained with")
    self._close_iterator()
    self._position = int(state["position"])
    self.skipped = int(state.get("skipped", 0))

  # -- iteration -------------------------------------------------------------------------------
  def batch_at(self, position: int) -> dict[str, np.ndarray]:
    """This host's slice of the global batch starting at `position` (read here, not by grain)."""
    if position % self.global_batch:
      raise ValueError(f"position {position} is not a multiple of {self.global_batch}")
    return self.host_batch(position // self.global_batch)[0]

  def _batches(self, batch_numbers) -> Iterator[tuple[dict[str, np.ndarray], list[str]]]:
    """(host batch, bad files) of a sequence of batch numbers, read ahead by grain. A worker's
    error comes out as the LdmJaxError behind it; closing this closes grain's iterator."""
    import grain  # pylint: disable=g-import-not-at-top
    _absl_flags_parsed()
    ds = grain.MapDataset.source(batch_numbers).map(self.host_batch)
    # One thread per batch read ahead (in each worker process, when there are workers).
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=self.prefetch,
                                              prefetch_buffer_size=self.prefetch))
    if self.workers:
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers,
                                                       per_worker_buffer_size=self.prefetch),
                          worker_init_fn=_ignore_stop_signals)
    iterator = iter(ds)
    try:
      for batch, bad in iterator:
        if self.workers:   # out of grain's shared memory now, so it is freed as the run goes
          batch = {k: np.array(v) for k, v in batch.items()}
        yield batch, bad
    except Exception as e:  # grain may wrap the error of a worker
      user = _user_error(e)
      if user is None:
        raise
      raise user from None
    finally:
      close = getattr(iterator, "close", None)
      if close is not None:
        close()

  def read(self, batch_numbers) -> Iterator[dict[str, np.ndarray]]:
    """This host's slices of the given global batches (numbers, not positions), in order,
    read ahead like training batches (eval batches, the latent cache's build). Leaves the
    state alone."""
    batches = self._batches(list(batch_numbers))
    try:
      for batch, _ in batches:
        yield batch
    finally:
      batches.close()

  def next_batch(self) -> tuple[int, dict[str, np.ndarray], list[str]]:
    """(global position, this host's batch, bad files skipped in it); advances the state."""
    if self._iterator is None:
      self._iterator = self._batches(range(self._position // self.global_batch, _ENDLESS))
    try:
      batch, bad = next(self._iterator)
    except Exception:
      self._iterator = None   # a generator that raised is finished (and closed grain's)
      raise
    position = self._position
    self._position += self.global_batch
    self.skipped += len(bad)
    for path in bad:
      if path not in self._reported:
        self._reported.add(path)
        logger.warning("data: skipped unreadable image '%s' (data.on_bad_image='skip')", path)
    return position, batch, bad

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return self.next_batch()[1]

  def _close_iterator(self):
    if self._iterator is not None:
      self._iterator.close()
      self._iterator = None

  def close(self):
    self._close_iterator()


class DevicePrefetch:
  """Global, sharded batches of a pipeline, the next `ahead` already sent to the devices
  while the current step runs. get_state() describes the batches handed out, not those
  in flight, so a checkpoint resumes at the first batch no step has used."""

  def __init__(self, pipeline: InputPipeline, sharding: jax.sharding.Sharding, ahead: int = 1):
    self.pipeline, self.sharding, self.ahead = pipeline, sharding, max(0, ahead)
    state = pipeline.get_state()
    self._position, self.skipped = state["position"], state["skipped"]
    self._queue: collections.deque = collections.deque()
    self._error: BaseException | None = None

  def _fill(self, count: int):
    while self._error is None and len(self._queue) < count:
      try:
        position, batch, bad = self.pipeline.next_batch()
      except LdmJaxError as e:   # raised when the caller asks for that batch, not before
        self._error = e
        return
      self._queue.append((position, to_global(batch, self.sharding), len(bad)))

  def __iter__(self):
    return self

  def __next__(self):
    self._fill(1)
    if not self._queue:
      error, self._error = self._error, None
      raise error
    position, batch, skipped = self._queue.popleft()
    self._position, self.skipped = position + self.pipeline.global_batch, self.skipped + skipped
    self._fill(self.ahead)   # sent to the devices while the caller's step runs
    return batch

  def get_state(self) -> dict[str, Any]:
    return dict(self.pipeline.get_state(), position=int(self._position),
                skipped=int(self.skipped))


def eval_batches(source: Source, example_fn: ExampleFn, *, global_batch: int, num_batches: int,
                 seed: int, process_index: int | None = None, process_count: int | None = None,
                 on_bad_image: str = "error"):
  """The same `num_batches` held-out batches every time (first examples, fixed RNG), per host."""
  pipe = InputPipeline(source, example_fn, global_batch=global_batch, seed=seed, shuffle=False,
                       process_index=process_index, process_count=process_count,
                       on_bad_image=on_bad_image)
  try:
    yield from pipe.read(range(num_batches))   # read ahead, like training batches
  finally:
    pipe.close()


def to_global(batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding):
  """Host-local numpy slices -> global jax.Arrays sharded along the batch axis."""
  def one(x):
    global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    return jax.make_array_from_process_local_data(sharding, x, global_shape)
  return jax.tree_util.tree_map(one, batch)


def _ignore_stop_signals(worker_index: int, worker_count: int):
  """In each data worker: Ctrl-C and SIGTERM (sent to the whole process group by terminals and
  schedulers) are the trainer's to handle, which saves a checkpoint first and then stops the
  workers through close(); a worker killed by them would end the run before that save."""
  del worker_index, worker_count
  import signal  # pylint: disable=g-import-not-at-top
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _absl_flags_parsed():
  """grain reads absl flags; a library caller (a notebook, a test) may never have parsed any.
  Marks them parsed with their defaults then; train.py and sample.py parse them for real."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
