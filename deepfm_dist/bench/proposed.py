"""Proposed changes, applied to the real code path for measurement only (``--proposed A,B``).

Each entry is a change to the training code that the benchmarks found worth making; until
it is adopted there, ``--proposed NAME`` patches it in at start-up so that ``step``, ``e2e`` and
``ceiling`` measure exactly the real path plus that change. Once a change is adopted, its
entry here goes away.

  onednn  the MLP's Linear layers through oneDNN instead of MKL (``bench/onednn.py``):
          MKL runs its AVX2 code on AMD CPUs; oneDNN uses AVX-512 (2x the GFLOP/s here).
  pin     pin each CPU rank (all its threads) to its own cores: rank r of L local ranks with
          t threads gets cores [r*t, (r+1)*t). Keeps a rank's gloo and loader threads off the
          other rank's core, which otherwise delays the other rank and both wait in the next
          collective. (One process: OpenMP threads bound with OMP_PROC_BIND, set by compare.)
  fm      the FM term as one autograd function with the analytic gradient
          d/dv_i = s - v_i (s = sum of the field vectors): 4 passes over [B, F, D] instead of ~10.
  malloc  glibc malloc keeps freed memory (``MALLOC_MMAP_THRESHOLD_=32 MiB``,
          ``MALLOC_TRIM_THRESHOLD_=4 GiB``): without it every step's multi-MB activations are
          fresh mmaps, ~2,000 page faults (~3.7 ms of kernel time) per step and rank. An
          environment setting, so ``compare`` and the launchers apply it to every process
          (``MALLOC_ENV``); ``apply`` only checks that it is present.
"""

from __future__ import annotations

import os

import torch

NAMES = ("onednn", "pin", "fm", "malloc")
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(4 * 2**30)}
OMP_BIND_ENV = {"OMP_PROC_BIND": "close", "OMP_PLACES": "cores"}


def parse_names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        raise SystemExit(f"--proposed: unknown {', '.join(unknown)}; expected some of {', '.join(NAMES)}")
    return names


def pin_rank_to_cores(local_rank: int, local_world_size: int) -> list[int]:
    """Pin this process (every thread it has, and so every thread it creates) to its share of
    the cores. Returns the cores, or [] when there are fewer cores than ranks."""
    cores = sorted(os.sched_getaffinity(0))
    per_rank = len(cores) // max(1, local_world_size)
    if per_rank < 1:
        return []
    mine = set(cores[local_rank * per_rank : (local_rank + 1) * per_rank])
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), mine)
        except OSError:
            pass  # a thread that just ended
    return sorted(mine)


class _FMSecondOrder(torch.autograd.Function):
    """fm_second_order with the analytic backward: d fm / d v_i = s - v_i, s = sum_i v_i."""

    @staticmethod
    def forward(ctx, fields: torch.Tensor) -> torch.Tensor:
        s = fields.sum(dim=1)  # [B, D]
        out = 0.5 * (s.square().sum(dim=1) - torch.linalg.vector_norm(fields.flatten(1), dim=1).square())
        ctx.save_for_backward(fields, s)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        fields, s = ctx.saved_tensors
        return (s.unsqueeze(1) - fields).mul_(grad[:, None, None])


def fm_second_order(fields: torch.Tensor) -> torch.Tensor:
    return _FMSecondOrder.apply(fields)


def apply(names: list[str], model_builders: bool = True) -> dict[str, object]:
    """Patch the named changes into the real code; returns what was done (for the report)."""
    done: dict[str, object] = {}
    if "pin" in names:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        done["pin"] = pin_rank_to_cores(local_rank, local_world) if local_world > 1 else "OMP_PROC_BIND"
    if "fm" in names:
        from deepfm_dist.model import deepfm

        deepfm.fm_second_order = fm_second_order
        done["fm"] = True
    if "onednn" in names and model_builders:
        from deepfm_dist import trainer
        from deepfm_dist.bench.onednn import use_onednn_linears

        build = trainer.build_model

        def build_model(cfg):
            model = build(cfg)
            use_onednn_linears(model)
            return model

        trainer.build_model = build_model
        done["onednn"] = True
    if "malloc" in names:
        missing = [k for k, v in MALLOC_ENV.items() if os.environ.get(k) != v]
        if missing:
            raise SystemExit(f"--proposed malloc: set {' '.join(f'{k}={MALLOC_ENV[k]}' for k in MALLOC_ENV)} "
                             "in the environment before the process starts (bench compare does)")
        done["malloc"] = True
    return done
