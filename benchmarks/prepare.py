"""Benchmark of ``prepare-criteo``: MB/s of TSV and rows/s, per core and in total.

    python -m benchmarks prepare --size-gb 1.0 --workers 2

1. Writes a Criteo-format TSV of ``--size-gb`` (realistic nulls, negatives, cardinalities;
   see ``deepfm_dist.prepare.criteo_like``) into ``--dir`` (default: a temp dir), reusing a file of the same
   size and seed left there by an earlier run. It was just written or read, so it sits
   in the page cache: the figures measure the converter's CPU work, not the disk.
2. Warm-up: converts the first ~32 MB once (imports, allocator, page cache of the code).
3. Measured: converts the whole file with ``--split none`` in a fresh process, timed
   around the process; peak RSS is read by ``getrusage`` inside the converter process
   (RUSAGE_SELF: its main process, RUSAGE_CHILDREN: its largest worker).

Prints a table a person can compare, then one JSON line with the same figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks.sysinfo import cpu_name, git_commit

# Only the standard library here, and the TSV is generated in a subprocess: peak RSS is
# measured inside the converter process (getrusage SELF, and CHILDREN for its workers),
# and a forked child starts with its parent's resident size, which getrusage keeps.


def _ensure_tsv(path: str, size_bytes: int, seed: int) -> tuple[int, float]:
    """Writes the TSV unless an earlier run left it; returns (bytes, seconds spent writing)."""
    meta_path = path + ".json"
    if os.path.exists(path) and os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        if meta == {"size_bytes": size_bytes, "seed": seed, "file_bytes": os.path.getsize(path)}:
            with open(path, "rb") as f:  # read it once: page cache, as after writing it
                while f.read(8 << 20):
                    pass
            return os.path.getsize(path), 0.0
    t = time.perf_counter()
    # deepfm-gen-criteo's Kaggle shape, scaled to the requested size (~243 bytes a line).
    rows = max(1, size_bytes // 243)
    gen_dir = path + ".gen"
    code = ("import sys; from deepfm_dist.prepare.criteo_like import SHAPES, generate; "
            "generate(sys.argv[1], scale=int(sys.argv[2]) / SHAPES['criteo-kaggle'].rows, seed=int(sys.argv[3]), "
            "workers=int(sys.argv[4]))")
    subprocess.run([sys.executable, "-c", code, gen_dir, str(rows), str(seed), str(os.cpu_count() or 1)], check=True)
    os.replace(os.path.join(gen_dir, "train.txt"), path)
    shutil.rmtree(gen_dir)
    with open(meta_path, "w") as f:
        json.dump({"size_bytes": size_bytes, "seed": seed, "file_bytes": os.path.getsize(path)}, f)
    return os.path.getsize(path), time.perf_counter() - t


_CONVERT = """
import json, resource, sys
from deepfm_dist.prepare.criteo import main
rc = main(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    json.dump({"main": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
               "workers": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}, f)
sys.exit(rc)
"""


def _convert(args: list[str], rss_path: str) -> tuple[float, dict[str, int]]:
    """Runs the converter in a fresh process; returns (seconds, peak RSS in KiB of its main
    process and of its largest worker, from getrusage inside that process)."""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", _CONVERT, rss_path, *args], check=True)
    seconds = time.perf_counter() - t
    with open(rss_path) as f:
        return seconds, json.load(f)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks prepare", description=__doc__.split("\n")[0])
    p.add_argument("--size-gb", type=float, default=1.0, help="TSV to generate, in GB (1e9 bytes)")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="converter processes")
    p.add_argument("--dir", default=None, help="where the TSV and outputs go (default: a temp dir, deleted)")
    p.add_argument("--chunk-mb", type=int, default=256)
    p.add_argument("--compression", choices=("zstd", "snappy"), default="zstd")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.size_gb <= 0 or a.workers < 1:
        p.error(f"--size-gb must be > 0 and --workers >= 1, got {a.size_gb} and {a.workers}")

    work = a.dir or tempfile.mkdtemp(prefix="criteo-bench-")
    os.makedirs(work, exist_ok=True)
    try:
        tsv_path = os.path.join(work, f"criteo-{a.size_gb:g}gb-seed{a.seed}.txt")
        size, gen_s = _ensure_tsv(tsv_path, int(a.size_gb * 1e9), a.seed)
        common = ["--split", "none", "--chunk-mb", str(a.chunk_mb), "--compression", a.compression, "--quiet", "--overwrite"]

        # Warm-up on a small head of the file (not timed).
        head = os.path.join(work, "warmup.txt")
        with open(tsv_path, "rb") as src, open(head, "wb") as dst:
            data = src.read(32 << 20)
            dst.write(data[: data.rfind(b"\n") + 1])
        _convert(["--input", head, "--output", os.path.join(work, "warmup-out"), "--workers", "1", *common], os.path.join(work, "rss.json"))

        out_dir = os.path.join(work, "out")
        seconds, rss = _convert(["--input", tsv_path, "--output", out_dir, "--workers", str(a.workers), *common], os.path.join(work, "rss.json"))
        with open(os.path.join(out_dir, "manifest.json")) as f:
            manifest = json.load(f)
        rows = manifest["rows"]
        out_bytes = sum(s["bytes"] for s in manifest["splits"].values())
    finally:
        if a.dir is None:
            shutil.rmtree(work, ignore_errors=True)

    cores = min(a.workers, len(os.sched_getaffinity(0)))
    result = {
        "tsv_bytes": size,
        "rows": rows,
        "workers": a.workers,
        "cores_used": cores,
        "seconds": round(seconds, 3),
        "convert_seconds_in_process": manifest["convert_seconds"],
        "mb_per_s": round(size / 1e6 / seconds, 1),
        "mb_per_s_per_core": round(size / 1e6 / seconds / cores, 1),
        "rows_per_s": round(rows / seconds),
        "rows_per_s_per_core": round(rows / seconds / cores),
        # ru_maxrss is in KiB on Linux. With one worker, the converting happens in "main".
        "peak_rss_mb": round(max(rss["main"], rss["workers"]) / 1024, 1),
        "peak_rss_main_mb": round(rss["main"] / 1024, 1),
        "peak_rss_worker_mb": round(rss["workers"] / 1024, 1) if a.workers > 1 else None,
        "versions": manifest["versions"],
        "parquet_bytes": out_bytes,
        "parquet_to_tsv": round(out_bytes / size, 3),
        "compression": a.compression,
        "chunk_mb": a.chunk_mb,
        "generate_seconds": round(gen_s, 1),
        "cpu": cpu_name(),
        "cpus_available": len(os.sched_getaffinity(0)),
        "commit": git_commit(),
    }
    rows_table = [
        ("TSV", f"{size / 1e9:.2f} GB, {rows:,} rows"),
        ("workers / cores used", f"{a.workers} / {cores} (of {result['cpus_available']} available)"),
        ("wall time", f"{seconds:.2f} s (whole process; converting: {manifest['convert_seconds']:.2f} s)"),
        ("throughput", f"{result['mb_per_s']:.1f} MB/s, {result['rows_per_s']:,} rows/s"),
        ("per core", f"{result['mb_per_s_per_core']:.1f} MB/s, {result['rows_per_s_per_core']:,} rows/s"),
        ("peak RSS", f"{result['peak_rss_main_mb']:.0f} MB main process" + (f", {result['peak_rss_worker_mb']:.0f} MB largest worker" if a.workers > 1 else "")),
        ("Parquet", f"{out_bytes / 1e9:.3f} GB ({result['parquet_to_tsv']:.2f}x the TSV, {a.compression})"),
        ("host", f"{result['cpu']}; " + ", ".join(f"{k} {v}" for k, v in manifest["versions"].items()) + f"; commit {result['commit']}"),
    ]
    width = max(len(k) for k, _ in rows_table)
    for k, v in rows_table:
        print(f"{k:<{width}}  {v}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
