"""What every benchmark mode reports, and how: environment, per-rank numbers, table, JSON.

A mode measures per-step times (``StepClock``), hands its per-rank numbers to
``gather_ranks`` (all ranks, one small collective), and rank 0 calls ``emit``: it prints the
environment (hardware, versions, commit, config), a table with one row per rank plus the
total, writes the same numbers as a JSON file, and prints one JSON object as the very last
output line (``mode``, ``world_size``, ``samples_per_s``, ``peak_rss_mb``, ...), which is what
``bench compare`` and the tests read.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from deepfm_dist.distributed import shm
from benchmarks.sysinfo import cpu_name, git_commit

DEFAULT_OUT_DIR = "runs/bench"


# --------------------------------------------------------------------------- environment


def hardware() -> dict[str, Any]:
    """CPU model, cores, host memory and visible GPUs."""
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    out: dict[str, Any] = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "memory_gb": round(mem_gb, 1),
        "machine": platform.machine(),
    }
    if torch.cuda.is_available():
        out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return out


def hardware_line(hw: dict[str, Any]) -> str:
    gpus = f", GPUs: {len(hw['gpus'])} x {hw['gpus'][0]}" if hw.get("gpus") else ", no GPU"
    return f"{hw['cpu']}, {hw['cores']} cores, {hw['memory_gb']} GB RAM ({hw['machine']}){gpus}"


def versions() -> dict[str, str]:
    """Versions of everything that decides a step's speed."""
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("torchrec", "fbgemm_gpu", "pyarrow", "numpy"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is reported, not fatal
            out[name] = "n/a"
    out["blas"] = "mkl" if torch.backends.mkl.is_available() else "other"
    return out


# --------------------------------------------------------------------------- measuring


def sync(device: torch.device) -> None:
    """Wait for queued device work before a clock is read (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # note: host-device sync point, on purpose


def machine_busy_seconds() -> float:
    """CPU seconds all cores of the machine spent busy since boot (``/proc/stat``; NaN elsewhere)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return float("nan")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def process_cpu_seconds() -> float:
    """CPU seconds this process (all its threads) has used."""
    t = os.times()
    return t.user + t.system


class StepClock:
    """Per-step wall times, synchronised with the device; the first ``warmup`` are not counted.

    ``tick()`` after every step records its end time. Measured wall time runs from the end of
    the last warm-up step to the end of the last step, so it includes whatever the loop does
    between steps (logging, learning-rate updates). Over the same window it records this
    process's CPU time and the whole machine's busy CPU time: what other processes used
    meanwhile (``other_load_cores`` in the summary) says whether a measurement was disturbed.
    """

    def __init__(self, device: torch.device, warmup: int):
        self.device = device
        self.warmup = warmup
        self.ends: list[float] = []
        self.start = time.perf_counter()
        self._cpu = [process_cpu_seconds(), machine_busy_seconds()]
        self.cpu_seconds = 0.0
        self.machine_busy_seconds = 0.0

    def restart(self) -> None:
        self.start = time.perf_counter()

    def tick(self) -> None:
        sync(self.device)
        self.ends.append(time.perf_counter())
        if len(self.ends) == self.warmup:
            self._cpu = [process_cpu_seconds(), machine_busy_seconds()]
        self.cpu_seconds = process_cpu_seconds() - self._cpu[0]
        self.machine_busy_seconds = machine_busy_seconds() - self._cpu[1]

    @property
    def measured_steps(self) -> int:
        return max(0, len(self.ends) - self.warmup)

    def step_seconds(self) -> list[float]:
        """Durations of the measured steps (end to end of consecutive steps)."""
        starts = [self.start, *self.ends[:-1]]
        return [e - s for s, e in zip(starts, self.ends)][self.warmup:]

    def measured_wall(self) -> float:
        if self.measured_steps == 0:
            return 0.0
        t0 = self.ends[self.warmup - 1] if self.warmup > 0 else self.start
        return self.ends[-1] - t0


class TimedIterator:
    """Wraps a batch iterator and adds up the time spent inside ``next()`` (waiting for data)."""

    def __init__(self, batches: Iterator):
        self._it = iter(batches)
        self.wait_seconds = 0.0

    def __iter__(self):
        return self

    def __next__(self):
        t0 = time.perf_counter()
        try:
            return next(self._it)
        finally:
            self.wait_seconds += time.perf_counter() - t0


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20


def current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def percentile_ms(seconds: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(seconds) * 1e3, q)) if seconds else float("nan")


def rank_numbers(clock: StepClock, samples_per_step: int, wait_seconds: float, device: torch.device,
                 **extra: Any) -> dict[str, Any]:
    """This rank's numbers for the report (measured steps only)."""
    steps, wall = clock.measured_steps, clock.measured_wall()
    times = clock.step_seconds()
    out: dict[str, Any] = {
        "steps": steps,
        "wall_s": wall,
        "samples_per_s": steps * samples_per_step / wall if wall > 0 else 0.0,
        "step_ms_p50": percentile_ms(times, 50),
        "step_ms_p90": percentile_ms(times, 90),
        "step_ms_mean": float(np.mean(times) * 1e3) if times else float("nan"),
        "data_wait_s": wait_seconds,
        "data_wait_ms_per_step": wait_seconds / steps * 1e3 if steps else 0.0,
        "data_wait_fraction": wait_seconds / wall if wall > 0 else 0.0,
        "peak_rss_mb": peak_rss_mb(),
        "cpu_s": clock.cpu_seconds,
        "machine_busy_s": clock.machine_busy_seconds,
    }
    if device.type == "cuda":
        out["gpu_peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    out.update(extra)
    return out


class PeerWait:
    """Time this rank spends blocked in shared-memory collectives on ranks that have not
    arrived (``distributed.shm.peer_wait_seconds``: by default the dense gradient all-reduce) over the
    measured steps: how much of a
    multi-rank step is the ranks waiting for each other. ``ms_per_step`` is None when this
    process maps no shared-memory segments (one rank, gloo or NCCL only)."""

    def __init__(self):
        self.mark_start()

    def mark_start(self) -> None:
        self.start = self.end = shm.peer_wait_seconds()

    def mark_end(self) -> None:
        self.end = shm.peer_wait_seconds()

    def ms_per_step(self, steps: int) -> float | None:
        if not shm.segments_in_use() or not steps:
            return None
        return (self.end - self.start) / steps * 1e3


def gather_ranks(numbers: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's ``numbers`` on every rank (in rank order); a world of one without a group."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [numbers]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, numbers)
    return out


def summarize(per_rank: list[dict[str, Any]], samples_per_step_per_rank: int) -> dict[str, Any]:
    """Totals over ranks: throughput from the slowest rank's wall time (every step is a
    collective, so the ranks finish together); worst p50/p90; largest peak RSS."""
    steps = per_rank[0]["steps"]
    wall = max(r["wall_s"] for r in per_rank)
    world = len(per_rank)
    total = steps * samples_per_step_per_rank * world / wall if wall > 0 else 0.0
    out = {
        "samples_per_s": total,
        "samples_per_s_per_rank": total / world,
        "step_ms_p50": max(r["step_ms_p50"] for r in per_rank),
        "step_ms_p90": max(r["step_ms_p90"] for r in per_rank),
        "data_wait_ms_per_step": max(r["data_wait_ms_per_step"] for r in per_rank),
        "data_wait_fraction": max(r["data_wait_fraction"] for r in per_rank),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in per_rank),
        "peak_rss_mb_per_rank": [round(r["peak_rss_mb"], 1) for r in per_rank],
        "steps": steps,
        "wall_s": wall,
        # Cores' worth of CPU that other processes used during the measurement (rank 0's
        # window): near 0 on a quiet machine; compare re-runs a measurement when it is not.
        "other_load_cores": max(0.0, (per_rank[0]["machine_busy_s"] - sum(r["cpu_s"] for r in per_rank))
                                / per_rank[0]["wall_s"]) if per_rank[0]["wall_s"] > 0 else 0.0,
    }
    if "gpu_peak_mem_mb" in per_rank[0]:
        out["gpu_peak_mem_mb_per_rank"] = [round(r["gpu_peak_mem_mb"], 1) for r in per_rank]
    if per_rank[0].get("peer_wait_ms_per_step") is not None:
        out["peer_wait_ms_per_step_per_rank"] = [round(r["peer_wait_ms_per_step"], 3) for r in per_rank]
    return out


# --------------------------------------------------------------------------- output


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
    return str(v)


def rank_table(per_rank: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    """One row per rank and a total row."""
    head = f"{'rank':<6} {'samples/s':>11} {'ms/step p50':>12} {'p90':>8} {'data wait ms/step':>18} {'peak RSS MB':>12}"
    gpu = "gpu_peak_mem_mb" in per_rank[0]
    if gpu:
        head += f" {'GPU mem MB':>11}"
    peer = per_rank[0].get("peer_wait_ms_per_step") is not None
    if peer:
        head += f" {'peer wait ms/step':>18}"
    lines = [head]
    for i, r in enumerate(per_rank):
        line = (f"{i:<6} {r['samples_per_s']:>11,.0f} {r['step_ms_p50']:>12.2f} {r['step_ms_p90']:>8.2f} "
                f"{r['data_wait_ms_per_step']:>18.3f} {r['peak_rss_mb']:>12,.0f}")
        if gpu:
            line += f" {r['gpu_peak_mem_mb']:>11,.0f}"
        if peer:
            line += f" {r['peer_wait_ms_per_step']:>18.3f}"
        lines.append(line)
    lines.append(
        f"{'total':<6} {summary['samples_per_s']:>11,.0f} {summary['step_ms_p50']:>12.2f} "
        f"{summary['step_ms_p90']:>8.2f} {summary['data_wait_ms_per_step']:>18.3f} {summary['peak_rss_mb']:>12,.0f}"
    )
    return "\n".join(lines)


def default_out_path(mode: str, world_size: int) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return os.path.join(DEFAULT_OUT_DIR, f"{mode}_ws{world_size}_{stamp}_{os.getpid()}.json")


def emit(mode: str, world_size: int, *, summary: dict[str, Any], per_rank: list[dict[str, Any]] | None,
         setup: list[tuple[str, str]], config: dict[str, Any] | None, out: str | None,
         table: str | None = None) -> dict[str, Any]:
    """Print the report and write the JSON file; the last printed line is the JSON object.

    Called on rank 0 only. ``setup`` are (label, text) rows describing what was run;
    ``summary`` must hold ``samples_per_s`` and ``peak_rss_mb``.
    """
    hw, ver, commit = hardware(), versions(), git_commit()
    rows = [
        ("mode", f"{mode}, world size {world_size}"),
        ("hardware", hardware_line(hw)),
        ("versions", ", ".join(f"{k} {v}" for k, v in ver.items())),
        ("commit", commit),
        *setup,
    ]
    print("\n".join(f"{k:<16} {v}" for k, v in rows))
    print()
    if table is None and per_rank is not None:
        table = rank_table(per_rank, summary)
    if table:
        print(table)
    path = out or default_out_path(mode, world_size)
    record = {
        "mode": mode,
        "world_size": world_size,
        **summary,
        "hardware": hw,
        "versions": ver,
        "commit": commit,
        "setup": dict(setup),
        "per_rank": per_rank,
        "config": config,
        "command": " ".join(sys.argv),
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1, default=str)
    os.replace(path + ".tmp", path)
    print(f"json: {path}")
    last = {"mode": mode, "world_size": world_size, **{k: _round(v) for k, v in summary.items()},
            "commit": commit, "json": path}
    print(json.dumps(last), flush=True)
    return record


def _round(v: Any) -> Any:
    if isinstance(v, float):
        return round(v, 3)
    if isinstance(v, list):
        return [_round(x) for x in v]
    return v
