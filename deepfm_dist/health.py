"""Stop requests and health checks, agreed over the ranks at the loop's sync points.

- A stop signal (SIGTERM / SIGUSR1: Slurm's warning before a time limit or a preemption, or the
  launcher passing on a user's ``kill``) only sets a flag. Every step each rank votes its flag
  in a one-element all-reduce that runs in the background while the next step computes
  (``StopVote``); all ranks read the same result one step later, checkpoint at that step and
  return, so a requeued job resumes from there. Waiting for the next log step instead could
  take longer than the grace period, and a rank cannot sync alone: its peers would not join.
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


class StopVote:
    """Agreement over the ranks on a stop, every step, without a host-blocking collective.

    ``poll()`` at every training step returns whether the ranks agreed to stop now: it reads the
    OR over ranks of the flags voted one poll earlier (that all-reduce ran during this step),
    then votes this rank's flag for the next poll. Every rank polls at the same steps, so every
    rank reads the same answer at the same step. The votes go over their own gloo group on CPU
    tensors: they never wait for a device stream, nor queue behind the model's collectives."""

    def __init__(self, env: DistEnv, stop: StopSignal):
        self.stop = stop
        # collective: every rank creates it at the same point of the set-up
        self.group = dist.new_group(backend="gloo") if env.world_size > 1 else None
        self.vote = torch.zeros(1, dtype=torch.int32)
        self.work = None

    def poll(self) -> bool:
        if self.group is None:
            return self.stop.received is not None
        agreed = False
        if self.work is not None:
            self.work.wait()
            agreed = bool(self.vote.item() > 0)
        self.vote = torch.tensor([int(self.stop.received is not None)], dtype=torch.int32)
        self.work = dist.all_reduce(self.vote, group=self.group, async_op=True)
        return agreed

    def close(self) -> None:
        """Wait for the last vote (every rank has one outstanding) before the group goes."""
        if self.work is not None:
            self.work.wait()
            self.work = None


@dataclass
class Agreed:
    """What every rank agreed on at a sync point."""

    loss: float
    """Mean over ranks of the newest step's loss."""
    save: bool
    """Some rank asked for a timed checkpoint."""


class HealthCheck:
    """Collects each step's loss (a device tensor) and, at a sync point, agrees with the other
    ranks on the loss, a timed save and the skipped-row-group count; ``stop_agreed`` every step."""

    def __init__(self, env: DistEnv, metrics: MetricsLogger, readers: tuple, checkpoint_dir: str):
        self.env, self.metrics, self.readers, self.checkpoint_dir = env, metrics, readers, checkpoint_dir
        self.stop = StopSignal()
        self.votes = StopVote(env, self.stop)
        self.pending: list[tuple[int, torch.Tensor]] = []
        self.skip_events_seen = 0

    def stop_agreed(self) -> bool:
        """Every step: whether the ranks agreed to stop (a signal reached some rank)."""
        return self.votes.poll()

    def close(self) -> None:
        self.votes.close()

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
            [float(losses[-1]) if first_bad < 0 else 0.0, float(want_save),
             float(first_bad >= 0), float(-first_bad if first_bad >= 0 else -1e18),
             float(len(self.readers[0].skipped))],
            dtype=torch.float64, device=self.env.device,
        )
        self.pending = []
        if self.env.world_size > 1:
            summed = stats.clone()
            dist.all_reduce(summed)
            worst = stats[3:4].clone()
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)
            stats = torch.cat([summed[:3], worst, summed[4:]])
        if stats[2] > 0:
            latest = ckpt.latest(self.checkpoint_dir)
            raise FloatingPointError(
                f"non-finite training loss at step {int(-stats[3])}: stopping. "
                + (f"The last good checkpoint is {latest}." if latest else "No checkpoint was written.")
                + " Lower optimizer.embedding_lr / optimizer.dense_lr, or set train.grad_clip."
            )
        if int(stats[4]) != self.skip_events_seen:  # every rank sees the same sum: all gather together
            self.skip_events_seen = int(stats[4])
            self.report_skipped(step)
        return Agreed(float(stats[0]) / self.env.world_size, bool(stats[1] > 0))

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
