"""Shared helpers of the CPU benchmarks: timing, machine description, load, markdown tables."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from typing import Callable, List, Sequence

import torch


def setup(threads: int = 2) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)


def time_it(fn: Callable[[], object], runs: int = 3, warmup: int = 1) -> List[float]:
    """Wall-clock seconds of `runs` calls of fn (after `warmup` untimed calls)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def load() -> str:
    a, b, c = os.getloadavg()
    return f"{a:.2f} {b:.2f} {c:.2f}"


def _stat():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v), v[3] + v[4]  # total, idle (+iowait) jiffies of all CPUs


class Window:
    """Measures the CPU share used by OTHER processes while the block runs:
    (system busy time − this process's CPU time) / (elapsed × CPUs), from /proc/stat and os.times()."""

    def __enter__(self) -> "Window":
        tt = os.times()
        self._stat, self._ours = _stat(), tt.user + tt.system
        self.others = float("nan")
        return self

    def __exit__(self, *exc) -> None:
        self.others = self.read()

    def read(self) -> float:
        t1, i1 = _stat()
        tt = os.times()
        t0, i0 = self._stat
        hz = os.sysconf("SC_CLK_TCK")
        busy = ((t1 - t0) - (i1 - i0)) / hz
        ours = (tt.user + tt.system) - self._ours
        return max(0.0, busy - ours) / max((t1 - t0) / hz, 1e-9)


def quiet_run(fn, max_others: float = 0.05, attempts: int = 3, wait_s: float = 20.0):
    """Runs fn() until other processes used at most max_others of the CPUs during it (up to `attempts`
    tries, waiting wait_s between); returns (result of the quietest try, its others fraction, tries)."""
    best = None
    for a in range(1, attempts + 1):
        with Window() as w:
            r = fn()
        if best is None or w.others < best[1]:
            best = (r, w.others)
        if w.others <= max_others:
            break
        time.sleep(wait_s)
    return best[0], best[1], a


_WHOLE = Window()


def others_busy() -> float:
    return _WHOLE.read()


def cpu_busy(interval: float = 1.0) -> float:
    """Fraction of all CPUs busy over `interval` seconds (from /proc/stat), before we start: other load."""
    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + v[4]
        return sum(v), idle
    try:
        t0, i0 = snap()
        time.sleep(interval)
        t1, i1 = snap()
        return 1.0 - (i1 - i0) / max(t1 - t0, 1)
    except OSError:
        return float("nan")


def machine() -> str:
    try:
        model = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in model.splitlines() if ln.startswith("Model name")), "?")
    except OSError:
        model = platform.processor() or "?"
    return (f"{os.cpu_count()} CPUs ({model}), torch {torch.__version__}, "
            f"torch.get_num_threads()={torch.get_num_threads()}")


def header(title: str) -> None:
    print(f"# {title}")
    print(f"- date (UTC): {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())}")
    print(f"- machine: {machine()}")
    print(f"- load average (1/5/15 min) at start: {load()}; CPU busy in the 1 s before start: "
          f"{100 * cpu_busy():.0f}% of {os.cpu_count()} CPUs")
    print()
    _WHOLE.__enter__()


def footer() -> None:
    print()
    print(f"- CPU used by other processes during the run: {100 * others_busy():.0f}% of {os.cpu_count()} CPUs")
    print(f"- load average (1/5/15 min) at end: {load()}  "
          f"(the benchmark itself contributes up to {torch.get_num_threads()})")


def table(head: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")


def fmt_s(t: float) -> str:
    return f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s"
