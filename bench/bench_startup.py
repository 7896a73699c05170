#!/usr/bin/env python3
"""How soon a job on a prepared dataset trains: the seconds from `python -m llmft.launch data.prepared=DIR ...` to
its first optimizer step, and how many times the job opens the export DIR was prepared from.

    python bench/bench_startup.py [--tickets 100000] [--nproc 1] [--keep DIR]

1. A synthetic helpdesk export of --tickets tickets (bench_data_prepare.py's generator: 100,000 make 675 MB), and a
   model folder whose tokenizer is trained on 2,000 of its tickets, with a tiny random-weight Llama (one layer,
   hidden 64): the start-up measured is the data's and the processes', not the model's loading.
2. `python -m llmft.data prepare` of the export into DIR with that model's tokenizer (untimed).
3. Timed: `python -m llmft.launch data.prepared=DIR model.path=MODEL train.max_steps=1 ...` (one rank runs in the
   launcher's process; --nproc 2: two ranks under torchrun), from the moment the launcher starts to the moment
   the run's metrics.jsonl holds step 1. Meanwhile the export is watched with inotify (Linux): every open of the
   file by any process of the machine, from Python or from C (pyarrow, a tokenizer library, mmap), counts. The
   watcher is checked first: one open of the export by this script must count one.

Prints each line the job printed, with the second it came, then as its last line

    startup: seconds_to_first_step=X reads_of_the_export=N

Goals on 2 quiet CPU cores: X <= 30, N = 0. Run it alone: the prepare step keeps both cores busy for minutes.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_data_prepare import STAFF_DOMAIN, model_with_own_tokenizer, write_export  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MAX_SEQ_LEN = 2048


class OpenWatch:
    """Counts the opens of one file by any process, from now until `stop` (inotify IN_OPEN events on its inode, read
    by a thread so the kernel's queue never overflows)."""

    IN_OPEN, IN_Q_OVERFLOW = 0x20, 0x4000

    def __init__(self, path: Path):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_CLOEXEC)
        if self.fd < 0 or self.libc.inotify_add_watch(self.fd, os.fsencode(path), self.IN_OPEN) < 0:
            raise OSError(ctypes.get_errno(), f"inotify on {path}")
        self.opens, self.overflowed, self._stopping = 0, False, False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 65536)
            except OSError:  # the descriptor closed by stop()
                return
            offset = 0
            while offset < len(data):
                _, mask, _, name_length = struct.unpack_from("iIII", data, offset)
                self.opens += bool(mask & self.IN_OPEN)
                self.overflowed |= bool(mask & self.IN_Q_OVERFLOW)
                offset += 16 + name_length

    def count(self, settle_s: float = 0.5) -> int:
        time.sleep(settle_s)  # the events of the opens before this call have reached the thread
        if self.overflowed:
            raise RuntimeError("inotify's queue overflowed: the count of opens is not known")
        return self.opens

    def stop(self) -> None:
        os.close(self.fd)


def prepare(export: Path, model_dir: Path, prepared_dir: Path) -> None:
    command = [sys.executable, "-m", "llmft.data", "prepare", "data=tickets", f"data.path={export}",
               f"data.tickets.staff_domains=[{STAFF_DOMAIN}]", f"data.output_dir={prepared_dir}",
               *model_settings(model_dir)]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"prepare failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    report = json.loads((prepared_dir / "report.json").read_text())
    print(f"prepared: {report['num_conversations']} conversations, samples {report['samples']}, packed rows "
          f"{report.get('packed_rows')}, {report['tokens']['train']:,} train tokens, in "
          f"{time.perf_counter() - started:.0f} s (untimed)", flush=True)


def model_settings(model_dir: Path) -> list[str]:
    return ["model=llama3_2_1b", f"model.path={model_dir}", "model.dtype=float32", f"model.max_seq_len={MAX_SEQ_LEN}"]


def first_step(prepared_dir: Path, model_dir: Path, run_dir: Path, nproc: int, watch: OpenWatch) -> tuple[float, int]:
    """The seconds from the launcher's start to step 1 in metrics.jsonl, and the opens of the export meanwhile."""
    command = [sys.executable, "-m", "llmft.launch", f"data.prepared={prepared_dir}", *model_settings(model_dir),
               "train.max_steps=1", "train.micro_batch_size=1", "train.grad_accum_steps=1", "train.save_every=0",
               f"launch.nproc={nproc}", f"run_dir={run_dir}"]
    print("$ " + " ".join(command[1:]), flush=True)
    opened_before = watch.count()
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def show() -> None:
        for line in process.stdout:
            print(f"  [{time.perf_counter() - started:6.1f} s] {line.rstrip()}", flush=True)

    printer = threading.Thread(target=show, daemon=True)
    printer.start()
    metrics = run_dir / "metrics.jsonl"
    seconds = None
    while seconds is None and process.poll() is None:
        if metrics.is_file() and any(json.loads(line).get("step") == 1 and "loss" in json.loads(line)
                                     for line in metrics.read_text().splitlines() if line.strip()):
            seconds = time.perf_counter() - started
        time.sleep(0.05)
    opens = watch.count(0.1) - opened_before  # (counted at the first step, before validation and the export)
    process.wait()
    printer.join()
    if seconds is None or process.returncode:
        sys.exit(f"the run ended with exit code {process.returncode} before or after its first step")
    return seconds, opens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tickets", type=int, default=100_000)
    parser.add_argument("--nproc", type=int, default=1, help="ranks of the timed run (2: torchrun, gloo)")
    parser.add_argument("--keep", type=Path, help="keep the export, model and prepared folder here; reuse them when "
                                                  "they are there (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llmft-startup-") as scratch:
        work = args.keep or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        export, model_dir, prepared_dir = work / "export.jsonl", work / "model", work / "prepared"
        if not (prepared_dir / "manifest.json").is_file():
            started = time.perf_counter()
            write_export(export, args.tickets)
            model_with_own_tokenizer(model_dir, work / "sample.jsonl", weights=True)
            print(f"export: {args.tickets} tickets, {export.stat().st_size / 1e6:.0f} MB, and the model folder, in "
                  f"{time.perf_counter() - started:.0f} s (untimed)", flush=True)
            prepare(export, model_dir, prepared_dir)
        watch = OpenWatch(export)
        try:
            with open(export, "rb"):  # the watcher counts: one open here is one open counted
                pass
            if watch.count() != 1:
                sys.exit(f"the inotify watch of {export} counted {watch.opens} opens of one: it cannot be trusted")
            load = os.getloadavg()
            run_dir = work / "run"
            shutil.rmtree(run_dir, ignore_errors=True)
            seconds, opens = first_step(prepared_dir, model_dir, run_dir, args.nproc, watch)
        finally:
            watch.stop()
        after = os.getloadavg()
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, after: {after[0]:.2f} {after[1]:.2f} "
          f"{after[2]:.2f} on {os.cpu_count()} CPUs; {args.nproc} rank(s)")
    print(f"startup: seconds_to_first_step={seconds:.1f} reads_of_the_export={opens}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
