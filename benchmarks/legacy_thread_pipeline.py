"""The input pipeline ldm_jax had before grain (a thread pool and one producer thread), kept only
as the baseline of benchmarks/input_pipeline.py; delete it with that comparison.

Same order, augmentation seeds and host slicing as ldm_jax.data.pipeline (it reuses its
HostBatch for the per-example work), so the two differ only in how the work is run.
"""
from __future__ import annotations

import concurrent.futures
import queue
import threading

from ldm_jax.data.pipeline import HostBatch, _stack


class ThreadPoolPipeline:
  """Endless host batches: examples mapped over `num_threads` threads, `prefetch` batches
  queued by one producer thread."""

  def __init__(self, source, example_fn, *, global_batch: int, seed: int, num_threads: int = 16,
               prefetch: int = 2):
    self.host_batch = HostBatch(source, example_fn, seed=seed, shuffle=True,
                                global_batch=global_batch, process_index=0, process_count=1)
    self.global_batch = global_batch
    self._pool = concurrent.futures.ThreadPoolExecutor(num_threads)
    self._queue: queue.Queue = queue.Queue(prefetch)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._produce, daemon=True)
    self._thread.start()

  def _example(self, position):
    return self.host_batch.example(position)[0]

  def _produce(self):
    position = 0
    while not self._stop.is_set():
      batch = _stack(list(self._pool.map(self._example,
                                         range(position, position + self.global_batch))))
      while not self._stop.is_set():
        try:
          self._queue.put(batch, timeout=0.1)
          break
        except queue.Full:
          continue
      position += self.global_batch

  def __next__(self):
    return self._queue.get()

  def close(self):
    self._stop.set()
    self._thread.join()
    self._pool.shutdown(wait=False, cancel_futures=True)
