"""What an exact evaluation costs rank 0 at Terabyte size: ``python -m benchmarks auc --rows N``.

Every evaluation gathers each rank's logits and labels (float32 each: 8 bytes a row) on rank 0,
which computes AUC, logloss, NE and calibration exactly (``metrics.global_metrics``). This times
that computation on ``--rows`` rows in one process and reads the memory it adds (peak RSS over
the RSS with the gathered rows in place), then prints the bytes the ranks send. The validation
half of Criteo Terabyte's day 23 is about 89M rows.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.sysinfo import cpu_name, git_commit
from deepfm_dist.metrics import global_metrics


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench auc", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=89_000_000, help="rows evaluated (default: 89M, a Terabyte val half)")
    p.add_argument("--ctr", type=float, default=0.033, help="share of positive labels (default 0.033)")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: every core)")
    a = p.parse_args(argv)
    if a.rows < 2 or not 0 < a.ctr < 1:
        p.error(f"--rows must be >= 2 and --ctr in (0, 1), got {a.rows} and {a.ctr}")
    if a.threads:
        torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    labels = (torch.rand(a.rows, generator=g) < a.ctr).float()
    logits = torch.randn(a.rows, generator=g)
    logits += labels  # a model with some skill; float32 logits tie where they round alike
    rss_before = _status_kb("VmRSS")
    start = time.perf_counter()
    metrics = global_metrics(logits, labels)
    seconds = time.perf_counter() - start
    extra_mb = max(0, _status_kb("VmHWM") - rss_before) / 1024
    result = {
        "mode": "auc", "rows": a.rows, "seconds": round(seconds, 2), "peak_extra_mb": round(extra_mb),
        "gathered_mb": round(a.rows * 8 / 2**20), "auc": metrics["auc"], "threads": torch.get_num_threads(),
        "cpu": cpu_name(), "commit": git_commit(),
    }
    print(f"exact metrics over {a.rows:,} rows on one process ({result['threads']} threads, {result['cpu']}): "
          f"{seconds:.1f} s, {extra_mb:,.0f} MiB above the gathered rows ({result['gathered_mb']:,} MiB gathered "
          f"from the ranks: float32 logit + label per row)")
    print(json.dumps(result))
    return 0
