"""Stop requests and health checks, agreed over the ranks at the loop's sync points.

- A stop signal (SIGTERM / SIGUSR1: Slurm's warning before a time limit or a preemption, or the
  launcher passing on a user's ``kill``) only sets a flag; the ranks agree on it at the next
  sync point, checkpoint there and return, so a requeued job resumes from that step.
- A non-finite loss on any rank stops every rank, naming the first such step, before any
  checkpoint could include it.
- Row groups skipped under ``data.skip_bad_row_groups`` are totalled over the ranks and
  reported by rank 0 when the count changes.
"""

from __future__ import annotations

import json
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist

from deepfm_dist import checkpoint as ckpt
from deepfm_dist.distributed.env import DistEnv
from deepfm_dist.logs import MetricsLogger


class StopSignal:
    """Catches SIGTERM / SIGUSR1 while the loop runs; ``received`` is the signal, or None."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class Agreed:
    """What every rank agreed on at a sync point."""

    loss: float
    """Mean over ranks of the newest step's loss."""
    save: bool
    """Some rank asked for a timed checkpoint."""
    stop: bool
    """Some rank received a stop signal."""


class HealthCheck:
    """Collects each step's loss (a device tensor) and, at a sync point, agrees with the other
    ranks on the loss, a timed save, a stop request, and the skipped-row-group count."""

    def __init__(self, env: DistEnv, metrics: MetricsLogger, readers: tuple, checkpoint_dir: str):
        self.env, self.metrics, self.readers, self.checkpoint_dir = env, metrics, readers, checkpoint_dir
        self.stop = StopSignal()
        self.pending: list[tuple[int, torch.Tensor]] = []
        self.skip_events_seen = 0

    def record(self, step: int, loss: torch.Tensor) -> None:
        self.pending.append((step, loss))

    def sync(self, want_save: bool) -> Agreed:
        """One small all-reduce over the steps since the last sync point. Raises on a non-finite
        loss on any rank. note: a host sync (log, evaluation and checkpoint steps only)."""
        losses = torch.stack([loss for _, loss in self.pending]).float()
        bad = ~torch.isfinite(losses)
        first_bad = self.pending[int(bad.nonzero()[0])][0] if bool(bad.any()) else -1
        step = self.pending[-1][0]
        stats = torch.tensor(
            [float(losses[-1]) if first_bad < 0 else 0.0, float(want_save), float(self.stop.received is not None),
             float(first_bad >= 0), float(-first_bad if first_bad >= 0 else -1e18),
             float(len(self.readers[0].skipped))],
            dtype=torch.float64, device=self.env.device,
        )
        self.pending = []
        if self.env.world_size > 1:
            summed = stats.clone()
            dist.all_reduce(summed)
            worst = stats[4:5].clone()
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)
            stats = torch.cat([summed[:4], worst, summed[5:]])
        if stats[3] > 0:
            latest = ckpt.latest(self.checkpoint_dir)
            raise FloatingPointError(
                f"non-finite training loss at step {int(-stats[4])}: stopping. "
                + (f"The last good checkpoint is {latest}." if latest else "No checkpoint was written.")
                + " Lower optimizer.embedding_lr / optimizer.dense_lr, or set train.grad_clip."
            )
        if int(stats[5]) != self.skip_events_seen:  # every rank sees the same sum: all gather together
            self.skip_events_seen = int(stats[5])
            self.report_skipped(step)
        return Agreed(float(stats[0]) / self.env.world_size, bool(stats[1] > 0), bool(stats[2] > 0))

    def gather_skipped(self) -> dict:
        """Bad row groups skipped so far (``data.skip_bad_row_groups``) over every rank and every
        loader: totals of distinct files, row groups and rows, and the entries. Collective.
        Footer-time skips are found by every rank alike, read-time ones by the rank that read them."""
        mine = [x for reader in self.readers for x in reader.skipped]
        everyone: list = [mine]
        if self.env.world_size > 1:
            everyone = [None] * self.env.world_size
            dist.all_gather_object(everyone, mine)
        unique = list({json.dumps(x, sort_keys=True): x for part in everyone for x in part}.values())
        groups = {(x["file"], x.get("row_group")): x["rows"] for x in unique}
        return {"files": len({f for f, _ in groups}), "row_groups": len(groups), "rows": sum(groups.values()),
                "entries": unique}

    def report_skipped(self, step: int) -> dict:
        """Rank 0 says what was skipped over all ranks, in the log and metrics.jsonl. Collective."""
        found = self.gather_skipped()
        if found["row_groups"]:
            first = found["entries"][0]
            self.metrics.write(step=step, skipped_files=found["files"], skipped_row_groups=found["row_groups"],
                               skipped_rows=found["rows"])
            self.metrics.log(f"data.skip_bad_row_groups: {found['row_groups']} row group(s), {found['rows']:,} rows "
                             f"in {found['files']} file(s) skipped so far over all ranks; first: {first['file']}: "
                             f"row group {first.get('row_group')}: {first['reason']}")
        return found
