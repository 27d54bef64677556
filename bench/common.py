"""Shared helpers of the CPU benchmarks: timing, machine description, load, markdown tables."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from typing import Callable, List, Sequence

import torch


# The lrgptq preset's damp='auto' and MSE range search (since 2026-12-02 night) set aside: what the
# speed and per-layer benchmarks measure as the lrgptq route, and what their earlier tables measured.
ROUTE_ONLY = {"lrgptq": {"damp": 0.01, "mse": False}}


def route_config(method: str, **overrides):
    """QuantConfig.for_method(method) with the route alone (ROUTE_ONLY); ``overrides`` win."""
    import lrgptq

    return lrgptq.QuantConfig.for_method(method, **{**ROUTE_ONLY.get(method, {}), **overrides})


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


def wait_quiet(max_busy: float = 0.10, timeout_s: float = 45.0) -> None:
    """Waits (at most timeout_s) until the CPUs were at most max_busy busy over a 2 s sample."""
    t_end = time.monotonic() + timeout_s
    while time.monotonic() < t_end and cpu_busy(2.0) > max_busy:
        time.sleep(1.0)


class Clean:
    """Times calls one at a time, each started at a quiet moment and kept only if other processes used
    at most max_others of the CPUs while it ran (up to max_tries calls in all; if too few were clean,
    the quietest of the others fill in). Keeps the worst 'others' share among the kept runs, and the
    number of discarded runs, over every call of `times` (for the table)."""

    def __init__(self, enabled: bool = True, max_others: float = 0.05, max_tries: int = 6):
        self.enabled, self.max_others, self.max_tries = enabled, max_others, max_tries
        self.worst, self.discarded = 0.0, 0

    def times(self, fn: Callable[[], object], runs: int = 3, warmup: int = 1) -> List[float]:
        for _ in range(warmup):
            fn()
        clean, dirty = [], []
        for _ in range(self.max_tries if self.enabled else runs):
            if self.enabled:
                wait_quiet()
            with Window() as w:
                t0 = time.perf_counter()
                fn()
                t = time.perf_counter() - t0
            (clean if w.others <= self.max_others or not self.enabled else dirty).append((w.others, t))
            if len(clean) >= runs:
                break
        fill = sorted(dirty)[: max(0, runs - len(clean))]
        self.discarded += len(dirty) - len(fill)
        kept = clean + fill
        self.worst = max([self.worst] + [o for o, _ in kept])
        return [t for _, t in kept]

    def note(self) -> str:
        return f"{100 * self.worst:.0f}% ({self.discarded})"


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


CLEAN_NOTE = ("'others' CPU' = the largest share of the CPUs used by other processes during any kept timed run; "
              "each run starts at a quiet moment and is discarded (and re-run, up to 6 calls per measurement) "
              "when others used > 5%.")
