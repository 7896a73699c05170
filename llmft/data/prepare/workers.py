"""Data preparation on several cores: one function over chunks of records, in worker processes, results in input order.

Reading, cleaning, scrubbing and tokenizing a ticket depends on that ticket alone, so chunks of tickets go to
`data.num_workers` processes. What depends on the order of the tickets (exact and near-duplicate dedup, the
report's lists and counts, the validation id chosen when the hash leaves validation empty, packing) stays in the
parent, which takes the chunks' results back in input order: the outputs are the same bytes for any number of
workers, and `data.num_workers=1` runs the same functions in this process.

Why `concurrent.futures.ProcessPoolExecutor`, fed a few chunks ahead of the one the parent waits for:
- results come back in input order, and at most `IN_FLIGHT_PER_WORKER x workers` chunks are in flight, so a slow parent never piles up
  the results of a whole export (`Pool.imap` caches every result that arrives early);
- a worker killed by the kernel (out of memory on a login node) raises `BrokenProcessPool` instead of leaving the
  parent waiting forever, as `multiprocessing.Pool` does;
- `datasets.map(num_proc=...)` would first write every raw ticket into an Arrow table, pickle the function with
  dill and map ticket by ticket, while dedup and the report are not per-ticket steps.

Why fork (on Linux): the workers inherit the imported modules (transformers, never torch) and the tokenizer instead
of importing and unpickling them (spawn: `import transformers` alone takes 1.5 s per worker on a 2-core login
node). It is safe here: workers run Python, regular expressions, numpy and the tokenizers library, never torch,
CUDA or the parent's threads. A process forked after the tokenizers library used its thread pool must not use that
pool (releases before 0.23 warn and turn it off), so the workers are forked with TOKENIZERS_PARALLELISM=false: one
thread each, the cores are the workers'. `gc.freeze()` before the fork keeps the parent's objects out of the
workers' garbage collections, so their memory pages stay shared. Elsewhere than Linux: spawn.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import sys
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterable, Iterator, TypeVar

from llmft.data.readers.records import DataError

MAX_DEFAULT_WORKERS = 16  # the default's cap: a login node is shared
CHUNKS_PER_WORKER = 8  # enough chunks that a slow one (a few very long tickets) does not idle the other workers
IN_FLIGHT_PER_WORKER = 4  # tasks submitted ahead per worker: a worker never waits because an older chunk is slow
# Chunk sizes: large enough that a task's round trip is a small part of its work, small enough to balance.
MIN_CHUNK_BYTES, MAX_CHUNK_BYTES = 1 << 18, 1 << 21
MIN_CHUNK_ITEMS, MAX_CHUNK_ITEMS = 64, 256

Task = TypeVar("Task")
Result = TypeVar("Result")


def available_cpus() -> int:
    """The CPUs this process may run on (SLURM's and taskset's binding included), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def num_workers_of(data_cfg) -> int:
    """data.num_workers, or when unset the CPUs available to this process, at most MAX_DEFAULT_WORKERS. The ranks of
    a training job on one node (LOCAL_WORLD_SIZE) each read the data: they share the CPUs rather than start 16 workers
    each."""
    value = getattr(data_cfg, "num_workers", None)
    if value is not None:
        return int(value)
    ranks_here = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, min(available_cpus() // ranks_here, MAX_DEFAULT_WORKERS))


def chunk_size(total: int, num_workers: int, minimum: int, maximum: int) -> int:
    """How much of `total` (bytes or items) one task gets: about CHUNKS_PER_WORKER tasks per worker."""
    return max(minimum, min(maximum, -(-total // (num_workers * CHUNKS_PER_WORKER))))


class ChunkSizes:
    """The size of each next task: `chunk_size` of the whole while much remains, then smaller (guided scheduling),
    so that the workers finish together instead of one running the last long chunk while the others wait."""

    def __init__(self, total: int, num_workers: int, minimum: int, maximum: int):
        self.usual = chunk_size(total, num_workers, minimum, maximum)
        self.remaining, self.num_workers, self.minimum = total, num_workers, minimum

    @classmethod
    def whole(cls) -> ChunkSizes:
        """One task per file (no limit that a file reaches)."""
        return cls(1 << 62, 1, 1 << 62, 1 << 62)

    def next(self) -> int:
        return max(self.minimum, min(self.usual, self.remaining // (2 * self.num_workers)))

    def took(self, size: int) -> None:
        self.remaining -= size


def chunk_bytes(total: int, num_workers: int) -> ChunkSizes:
    """How many bytes of input files each task reads."""
    return ChunkSizes(total, num_workers, MIN_CHUNK_BYTES, MAX_CHUNK_BYTES)


def chunks(items: list, num_workers: int) -> list[list]:
    """`items` cut into consecutive chunks, one per task (`ChunkSizes`)."""
    sizes = ChunkSizes(len(items), num_workers, MIN_CHUNK_ITEMS, MAX_CHUNK_ITEMS)
    cut, start = [], 0
    while start < len(items):
        size = sizes.next()
        cut.append(items[start : start + size])
        sizes.took(size)
        start += size
    return cut


_FUNCTION: Callable | None = None
_STATE = None


def _start_worker(function: Callable, state) -> None:
    global _FUNCTION, _STATE
    _FUNCTION, _STATE = function, state
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the workers


def _run_task(task):
    return _FUNCTION(_STATE, task)


def in_order(function: Callable[[object, Task], Result], state, tasks: Iterable[Task], num_workers: int
             ) -> Iterator[Result]:
    """function(state, task) for each task, in task order: in this process when num_workers is 1 or there is one
    task, else in min(num_workers, tasks) worker processes. An exception in a task (a bad record with data.strict)
    is raised here as it was raised there."""
    tasks = list(tasks)
    num_workers = min(num_workers, len(tasks))
    if num_workers <= 1:
        for task in tasks:
            yield function(state, task)
        return
    fork = sys.platform.startswith("linux")
    context = multiprocessing.get_context("fork" if fork else "spawn")
    parallelism = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # inherited by the workers; the parent tokenizes nothing meanwhile
    if fork:
        gc.freeze()
    executor = ProcessPoolExecutor(num_workers, mp_context=context, initializer=_start_worker,
                                   initargs=(function, state))
    try:
        pending = deque()
        remaining = iter(tasks)
        for task in remaining:  # prime: two tasks per worker in flight
            pending.append(executor.submit(_run_task, task))
            if len(pending) >= IN_FLIGHT_PER_WORKER * num_workers:
                break
        while pending:
            try:
                result = pending.popleft().result()
            except BrokenProcessPool:
                raise DataError(
                    "a data preparation worker died (killed by the system, out of memory?); give the job more memory "
                    "or set data.num_workers to fewer processes (1: all in this process)."
                ) from None
            next_task = next(remaining, None)
            if next_task is not None:
                pending.append(executor.submit(_run_task, next_task))
            yield result
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
        if fork:
            gc.unfreeze()
        if parallelism is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = parallelism
