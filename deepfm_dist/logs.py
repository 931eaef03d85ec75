"""What a run tells its user: rank 0's console lines, ``metrics.jsonl`` and TensorBoard scalars."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings

from deepfm_dist.distributed.env import DistEnv
from deepfm_dist.fsutil import strict_json


def quiet_library_noise() -> None:
    """Silence library messages that say nothing to our users (FX tracing notes, TorchRec's
    planner chatter, deprecation notices raised inside torch.distributed)."""
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    logging.getLogger("torchrec").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*is_fx_tracing.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="torchrec")
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")


class RankLogger:
    """Rank 0 prints; other ranks stay silent."""

    def __init__(self, env: DistEnv):
        self.enabled = env.is_main

    def __call__(self, msg: str) -> None:
        if self.enabled:
            print(msg, flush=True)


class MetricsLogger:
    """Rank 0 records every log step and evaluation: a console line (or a progress bar on a
    terminal), ``<run_dir>/metrics.jsonl`` (one JSON object per line, appended across resumes)
    and TensorBoard scalars in ``<run_dir>/tb``. Owns the ``train.log_every`` schedule and the
    throughput window (steps since the last log line, less evaluation and checkpoint time)."""

    def __init__(self, env: DistEnv, run_dir: str, *, log_every: int, total_steps: int, tensorboard: bool,
                 progress: bool):
        self.log = RankLogger(env)
        self.log_every, self.total_steps = log_every, total_steps
        self.path = os.path.join(run_dir, "metrics.jsonl") if env.is_main else None
        self.progress = env.is_main and progress and sys.stderr.isatty()
        self.tb = self.bar = None
        if env.is_main and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=os.path.join(run_dir, "tb"))
        self.reset_window()

    def start(self, first_step: int) -> None:
        """The loop begins at ``first_step`` (0, or where a resume continues)."""
        if self.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total_steps, initial=first_step, unit="step", dynamic_ncols=True)

    def due(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.total_steps

    def reset_window(self) -> None:
        """Start a new throughput window (after an evaluation or a checkpoint)."""
        self.window_start, self.window_steps = time.perf_counter(), 0

    def step_done(self) -> None:
        self.window_steps += 1
        if self.bar is not None:
            self.bar.update(1)

    def train(self, *, step: int, epoch: int, samples_per_step: int, loss: float, lr: float, lr_factor: float) -> None:
        """A log step: the mean loss over ranks, the learning rate, the window's samples/s."""
        now = time.perf_counter()
        rate = self.window_steps * samples_per_step / (now - self.window_start)
        self.window_start, self.window_steps = now, 0
        self.write(step=step, epoch=epoch, samples=step * samples_per_step, loss=loss, lr=lr, samples_per_s=rate)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{rate:,.0f}")
        else:
            self.log(f"epoch {epoch} step {step}/{self.total_steps} | loss {loss:.4f} | lr x{lr_factor:.3g} | "
                     f"{rate:,.0f} samples/s")

    def write(self, **record) -> None:
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(strict_json(record), allow_nan=False) + "\n")
        if self.tb is not None:
            prefix = "val" if "val_auc" in record else "train"
            for key in ("loss", "lr", "samples_per_s", "val_auc", "val_logloss", "val_ne", "val_calibration"):
                if key in record:
                    self.tb.add_scalar(f"{prefix}/{key.removeprefix('val_')}", record[key], record["step"])
            self.tb.flush()

    def end_progress(self) -> None:
        """The steps are over: close the progress bar (evaluation and checkpoint lines follow)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self.end_progress()
        if self.tb is not None:
            self.tb.close()
            self.tb = None
