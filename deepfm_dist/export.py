"""Export a (sharded, any world size) checkpoint as one unsharded state dict for inference.

    deepfm-export runs/default/checkpoints            # the best checkpoint (best.json), else the latest
    deepfm-export runs/default/checkpoints/step_000000244 --out model.pt

Writes ``model.pt`` (a plain ``{name: tensor}`` dict: ``torch.load(path, weights_only=True)``
reads it without unpickling objects) and ``model.pt.json`` (the training config, from which
:func:`build_plain_model` rebuilds the module). Runs in one process, no process group: DCP
reassembles every table from however many shards wrote it.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

from deepfm_dist import checkpoint as ckpt
from deepfm_dist import cli
from deepfm_dist.config import Config, build_config
from deepfm_dist.fsutil import write_json_atomic
from deepfm_dist.loss import DeepFMTrain
from deepfm_dist.model.build import build_deepfm


def build_plain_model(cfg: Config) -> DeepFMTrain:
    """The unsharded model with its tables in ordinary CPU memory (same parameter names as
    the sharded one)."""
    return DeepFMTrain(build_deepfm(cfg, table_device="cpu"))


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory, or a folder of them: its best (best.json), else latest, one."""
    return ckpt.resolve(path)


def consolidate(path: str) -> tuple[dict[str, torch.Tensor], Config, dict]:
    """(unsharded state dict, training config, meta) of the checkpoint at ``path``."""
    path = resolve_checkpoint(path)
    meta = ckpt.read_meta(path)
    cfg = build_config(meta["config"])
    state = build_plain_model(cfg).state_dict()
    payload = {"model": state}
    ckpt.dcp_load(payload, path)
    return payload["model"], cfg, meta


@dataclass
class ExportOptions:
    checkpoint: str
    """A checkpoint directory, or a folder of checkpoints (its best one by the run's
    checkpoint.best_metric, named in best.json, else its latest complete one)."""
    out: str = "model.pt"
    """The output file; its config goes beside it as OUT.json."""
    overwrite: bool = False
    """Replace an existing --out file."""


def main(argv: list[str] | None = None) -> int:
    args = cli.parse("deepfm-export", ExportOptions, argv, __doc__.split("\n\n")[0], positional=("checkpoint",))
    for path in (args.out, args.out + ".json"):
        if os.path.isdir(path):
            print(f"deepfm-export: error: --out {args.out}: {path} is a directory", file=sys.stderr)
            return 2
        if os.path.exists(path) and not args.overwrite:
            print(f"deepfm-export: error: --out {args.out}: {path} exists; pass --overwrite to replace it",
                  file=sys.stderr)
            return 2
    try:
        state, cfg, meta = consolidate(args.checkpoint)
    except (FileNotFoundError, ValueError) as e:
        print(f"deepfm-export: error: {e}", file=sys.stderr)
        return 2
    tmp = args.out + ".tmp"
    try:
        torch.save({k: v.contiguous() for k, v in state.items()}, tmp)
        os.replace(tmp, args.out)
    except (OSError, RuntimeError) as e:  # a full disk or a size limit: torch says "basic_ios::clear"
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        reason = e if isinstance(e, OSError) else "the write failed (a full disk or a file-size limit?)"
        print(f"deepfm-export: error: --out {args.out}: {reason}; nothing written", file=sys.stderr)
        return 1
    write_json_atomic(args.out + ".json", {"config": cfg.to_dict(), "step": meta["step"],
                                           "source": os.path.abspath(args.checkpoint)}, indent=1)
    print(f"deepfm-export: step {meta['step']} ({len(state)} tensors, "
          f"{sum(v.numel() for v in state.values()) * 4 / 2**20:.1f} MiB) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
