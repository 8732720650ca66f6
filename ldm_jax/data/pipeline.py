"""The input pipeline: seeded, host-sharded, prefetched, resumable batches of a random-access
source.

Examples form one endless stream of global positions 0, 1, 2, ...; position p is example
`perm_e[p mod N]` of epoch e = p // N, where perm_e is a permutation seeded by (seed, e).
Augmentation draws from an RNG seeded by (seed, p). A batch is therefore a pure function of
(seed, position), whatever the number of hosts, threads or restarts: the iterator's whole
state is the position of the next batch, which checkpoints save and resumed runs restore.

Each host builds only its slice of every global batch (host h of H takes positions
[p + h*B/H, p + (h+1)*B/H)); `to_global` assembles the slices into one sharded jax.Array.
"""
from __future__ import annotations

import concurrent.futures
import queue
import threading
from typing import Any, Callable, Iterator

import jax
import numpy as np

from ldm_jax.data.sources import DataError, Source

ExampleFn = Callable[[dict, np.random.Generator], dict]


def _stack(examples: list[dict]) -> dict[str, np.ndarray]:
  keys = examples[0].keys()
  return {k: np.stack([np.asarray(e[k]) for e in examples]) for k in keys}


class _Order:
  """Maps a global position to an example index (seeded per-epoch permutations)."""

  def __init__(self, n: int, seed: int, shuffle: bool):
    self.n, self.seed, self.shuffle = n, seed, shuffle
    self._epoch, self._perm = -1, None
    self._lock = threading.Lock()

  def __call__(self, position: int) -> int:
    if not self.shuffle:
      return position % self.n
    epoch = position // self.n
    with self._lock:
      if epoch != self._epoch:
        self._perm = np.random.default_rng([self.seed, 1, epoch]).permutation(self.n)
        self._epoch = epoch
      return int(self._perm[position % self.n])


class InputPipeline:
  """Endless host-local batches of `source`, in a seeded order, resumable from `get_state()`."""

  def __init__(self, source: Source, example_fn: ExampleFn, *, global_batch: int, seed: int,
               shuffle: bool = True, num_threads: int = 8, prefetch: int = 2,
               process_index: int | None = None, process_count: int | None = None):
    if len(source) == 0:
      raise DataError(f"data: {source.description} has no examples")
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    if global_batch % self.process_count:
      raise DataError(f"train.batch_size ({global_batch}) must be divisible by the number of "
                      f"hosts ({self.process_count})")
    self.source, self.example_fn = source, example_fn
    self.global_batch, self.seed = global_batch, seed
    self.local_batch = global_batch // self.process_count
    self.order = _Order(len(source), seed, shuffle)
    self.num_threads, self.prefetch = max(1, num_threads), max(1, prefetch)
    self._position = 0          # global position of the next batch handed out
    self._queue: queue.Queue | None = None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._pool = concurrent.futures.ThreadPoolExecutor(self.num_threads,
                                                       thread_name_prefix="ldm_jax_data")

  # -- state -----------------------------------------------------------------------------------
  def get_state(self) -> dict[str, Any]:
    return {"position": int(self._position), "seed": int(self.seed),
            "global_batch": int(self.global_batch)}

  def set_state(self, state: dict[str, Any]):
    if int(state.get("seed", self.seed)) != self.seed:
      raise DataError(f"data: the checkpoint's data order was seeded with {state['seed']} but "
                      f"this run uses seed {self.seed}; resuming would repeat examples")
    self._stop_thread()
    self._position = int(state["position"])

  # -- iteration -------------------------------------------------------------------------------
  def example(self, position: int) -> dict:
    """The preprocessed example at a global position (deterministic)."""
    index = self.order(position)
    rng = np.random.default_rng([self.seed, 2, position])
    return self.example_fn(self.source[index], rng)

  def batch_at(self, position: int) -> dict[str, np.ndarray]:
    """This host's slice of the global batch starting at `position`."""
    start = position + self.process_index * self.local_batch
    examples = list(self._pool.map(self.example, range(start, start + self.local_batch)))
    return _stack(examples)

  def _produce(self, position: int, out: queue.Queue, stop: threading.Event):
    while not stop.is_set():
      try:
        item = (position, self.batch_at(position))
      except Exception as e:  # handed to the consumer, which re-raises it
        item = (position, e)
      while not stop.is_set():
        try:
          out.put(item, timeout=0.1)
          break
        except queue.Full:
          continue
      if isinstance(item[1], Exception):
        return
      position += self.global_batch

  def _stop_thread(self):
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._thread, self._queue = None, None
      self._stop = threading.Event()

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._thread is None:
      self._queue = queue.Queue(self.prefetch)
      self._thread = threading.Thread(target=self._produce, daemon=True,
                                      args=(self._position, self._queue, self._stop))
      self._thread.start()
    position, batch = self._queue.get()
    assert position == self._position, (position, self._position)
    if isinstance(batch, Exception):
      self._stop_thread()
      raise batch
    self._position += self.global_batch
    return batch

  def close(self):
    self._stop_thread()
    self._pool.shutdown(wait=False, cancel_futures=True)


def eval_batches(source: Source, example_fn: ExampleFn, *, global_batch: int, num_batches: int,
                 seed: int, process_index: int | None = None, process_count: int | None = None):
  """The same `num_batches` held-out batches every time (first examples, fixed RNG), per host."""
  pipe = InputPipeline(source, example_fn, global_batch=global_batch, seed=seed, shuffle=False,
                       process_index=process_index, process_count=process_count, num_threads=8)
  try:
    for i in range(num_batches):
      yield pipe.batch_at(i * global_batch)
  finally:
    pipe.close()


def to_global(batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding):
  """Host-local numpy slices -> global jax.Arrays sharded along the batch axis."""
  def one(x):
    global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    return jax.make_array_from_process_local_data(sharding, x, global_shape)
  return jax.tree_util.tree_map(one, batch)
