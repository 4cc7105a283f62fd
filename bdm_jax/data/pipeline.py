"""Step-indexed batching: which examples (and which flips) a step sees is a pure function of the step.

A resumed run therefore reads exactly the batches an uninterrupted run would have read: nothing here
keeps iterator state. The global batch of step `s` is positions `s*B .. s*B+B-1` of an infinite stream
that walks epoch `e` in the order `np.random.default_rng([seed, e]).permutation(N)`; every host reads
only its own contiguous block of that global batch.
"""

from __future__ import annotations

import functools
import operator
import queue
import threading
from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Source(Protocol):
    """Random-access dataset: `source[i]` -> {"image": float32 [H,W,C] in [-1,1], "label": int32 scalar}.

    Sources may also implement `get_examples(indices) -> {"image": [n,H,W,C], "label": [n]}` (a batched
    read, possibly parallel); `get_batch` uses it when present.
    """

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, np.ndarray]: ...


def _nonneg_int(value: Any, what: str) -> int:
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an integer, got {value!r}") from None
    if v < 0:
        raise ValueError(f"{what} must be >= 0, got {v}")
    return v


@functools.lru_cache(maxsize=8)
def _epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
    perm.flags.writeable = False
    return perm


def batch_indices(step: int, global_batch_size: int, num_examples: int, seed: int) -> np.ndarray:
    """Example indices (int64 [global_batch_size]) of the global batch at `step`.

    Position p = step*B + j of the stream lies in epoch p // N at offset p % N of that epoch's permutation
    `np.random.default_rng([seed, epoch]).permutation(N)`; a batch may straddle epochs (or span several when
    B > N). Pure: the same arguments always give the same indices.
    """
    step = _nonneg_int(step, "step")
    seed = _nonneg_int(seed, "seed")
    b = _nonneg_int(global_batch_size, "global_batch_size")
    n = _nonneg_int(num_examples, "num_examples")
    if b == 0:
        raise ValueError("global_batch_size must be > 0")
    if n == 0:
        raise ValueError("num_examples must be > 0 (the dataset is empty)")
    positions = np.arange(step * b, step * b + b, dtype=np.int64)
    epochs = positions // n
    offsets = positions % n
    out = np.empty(b, dtype=np.int64)
    for epoch in np.unique(epochs):
        sel = epochs == epoch
        out[sel] = _epoch_permutation(n, seed, int(epoch))[offsets[sel]]
    return out


def host_slice(global_batch_size: int, process_index: int = 0, process_count: int = 1) -> slice:
    """The contiguous block of the global batch that host `process_index` of `process_count` reads.

    This is the per-host sharding (the analogue of `tfds.split_for_jax_process`, but per batch instead of
    per split, so every host sees a disjoint part of the *same* global batch and resumption stays exact).
    """
    b = _nonneg_int(global_batch_size, "global_batch_size")
    pc = _nonneg_int(process_count, "process_count")
    pi = _nonneg_int(process_index, "process_index")
    if pc == 0 or pi >= pc:
        raise ValueError(f"process_index={pi} must be in [0, process_count={pc})")
    if b == 0 or b % pc:
        raise ValueError(
            f"global_batch_size={b} must be a positive multiple of process_count={pc} "
            "(every host reads an equal block of the global batch)"
        )
    per_host = b // pc
    return slice(pi * per_host, (pi + 1) * per_host)


_MASK64 = (1 << 64) - 1
_FLIP_SALT = 0x5F1B_D1A7_0F11_9A5E  # separates the flip stream from anything else keyed on (seed, step)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (wrapping arithmetic)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def flip_mask(seed: int, step: int, positions: np.ndarray) -> np.ndarray:
    """bool [len(positions)]: whether the example at global batch position `positions[j]` of `step` is
    flipped horizontally. A hash of (seed, step, position), so each host computes its part alone."""
    positions = np.asarray(positions, dtype=np.uint64)
    s = np.full(positions.shape, (int(seed) ^ _FLIP_SALT) & _MASK64, dtype=np.uint64)
    h = _mix64(_mix64(_mix64(s) ^ np.uint64(int(step) & _MASK64)) ^ positions)
    return (h >> np.uint64(63)).astype(bool)


def read_examples(source: Source, indices: np.ndarray) -> dict[str, np.ndarray]:
    """{'image': float32 [n, H, W, C], 'label': int32 [n]} of `indices`, batched if the source can."""
    get_many = getattr(source, "get_examples", None)
    if get_many is not None:
        out = get_many(indices)
        return {"image": np.asarray(out["image"], np.float32), "label": np.asarray(out["label"], np.int32)}
    examples = [source[int(i)] for i in indices]
    return {
        "image": np.stack([np.asarray(e["image"], np.float32) for e in examples]),
        "label": np.asarray([e["label"] for e in examples], np.int32),
    }


def get_batch(
    source: Source,
    step: int,
    *,
    global_batch_size: int,
    seed: int,
    random_flip: bool,
    process_index: int = 0,
    process_count: int = 1,
) -> dict[str, np.ndarray]:
    """This host's part of the global batch of `step`: {"image": float32 [b,H,W,C], "label": int32 [b]}
    with b = global_batch_size // process_count (block `process_index`). Random horizontal flips (when
    `random_flip`) are decided by `flip_mask(seed, step, global position)`. A pure function of its args."""
    sl = host_slice(global_batch_size, process_index, process_count)
    idx = batch_indices(step, global_batch_size, len(source), seed)[sl]
    batch = read_examples(source, idx)
    if random_flip:
        flip = flip_mask(seed, step, np.arange(sl.start, sl.stop))
        if flip.any():
            batch["image"][flip] = batch["image"][flip, :, ::-1, :]
    return batch


def _put_unless_stopped(q: queue.Queue, stop: threading.Event, item) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False


def _prefetch_worker(source, start, end, kwargs, q: queue.Queue, stop: threading.Event) -> None:
    try:
        for step in range(start, end):
            if stop.is_set():
                return
            if not _put_unless_stopped(q, stop, ("batch", get_batch(source, step, **kwargs))):
                return
        _put_unless_stopped(q, stop, ("end", None))
    except BaseException as e:  # noqa: BLE001 - handed to the consumer
        _put_unless_stopped(q, stop, ("error", e))


class Prefetcher:
    """Iterator over steps `start_step .. end_step-1` (end exclusive) yielding `get_batch(...)` results,
    computed ahead in a background thread (bounded queue of `buffer_size`). The k-th item is the batch of
    step `start_step + k`; `next_step` tells which step the next item belongs to. An exception raised while
    reading is re-raised in the consumer (same exception object, traceback kept). Use as a context manager
    or call `close()`; closing stops the thread promptly.
    """

    def __init__(
        self,
        source: Source,
        start_step: int,
        end_step: int,
        *,
        global_batch_size: int,
        seed: int,
        random_flip: bool,
        process_index: int = 0,
        process_count: int = 1,
        buffer_size: int = 2,
    ):
        start_step = _nonneg_int(start_step, "start_step")
        end_step = _nonneg_int(end_step, "end_step")
        if end_step < start_step:
            raise ValueError(f"end_step={end_step} < start_step={start_step}")
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        host_slice(global_batch_size, process_index, process_count)  # validate now, not in the thread
        self._kwargs = dict(
            global_batch_size=global_batch_size,
            seed=seed,
            random_flip=random_flip,
            process_index=process_index,
            process_count=process_count,
        )
        self.next_step = start_step
        self._queue: queue.Queue = queue.Queue(maxsize=buffer_size)
        self._stop = threading.Event()
        self._done = False
        # The thread gets no reference to `self`, so an abandoned Prefetcher is collected and its
        # __del__ stops the thread.
        self._thread = threading.Thread(
            target=_prefetch_worker,
            args=(source, start_step, end_step, self._kwargs, self._queue, self._stop),
            name="bdm-data-prefetch",
            daemon=True,
        )
        self._thread.start()

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._done:
            raise StopIteration
        while True:
            try:
                kind, payload = self._queue.get(timeout=0.1)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    self._done = True  # stopped by close() from elsewhere
                    raise StopIteration from None
        if kind == "batch":
            self.next_step += 1
            return payload
        self._done = True
        self._thread.join()
        if kind == "error":
            raise payload
        raise StopIteration

    def close(self) -> None:
        """Stop the background thread and drop any prefetched batches. Idempotent."""
        self._done = True
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self._stop.set()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
