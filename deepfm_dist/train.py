"""Entry point: ``torchrun -m deepfm_dist.train [--config FILE] [--section.key=value ...]``."""

from __future__ import annotations

import os
import sys

from torch.distributed.elastic.multiprocessing.errors import record

from deepfm_dist.config import ConfigError, load_config

USAGE = """usage: deepfm-train [--config FILE.toml] [--SECTION.KEY=VALUE ...]

Trains DeepFM on sharded TorchRec tables. Start it with torchrun (see launcher/train.sh);
without torchrun it runs as a world of one. Every key is documented in deepfm_dist/config.py
and deepfm_dist/configs/default.toml; `--help-keys` lists them with their defaults;
`--check-config` validates the configuration and exits (status 2 and one message if it is bad).
"""


def _help_keys(with_docs: bool = False) -> str:
    """Every key with its default (``--help-keys``), and with its documentation (``--help``)."""
    import dataclasses
    import textwrap

    from deepfm_dist.cli import field_docs
    from deepfm_dist.config import SECTIONS, Config

    def entry(key: str, default, doc: str) -> list[str]:
        head = [f"{key} = {default!r}"]
        return head + (textwrap.wrap(doc, 92, initial_indent="    ", subsequent_indent="    ") if with_docs else [])

    top = field_docs(Config)
    lines = entry("run_dir", Config.run_dir, top.get("run_dir", "")) + entry("resume", False, top.get("resume", ""))
    for name, cls in SECTIONS.items():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls()):
            lines += entry(f"{name}.{f.name}", getattr(cls(), f.name), docs.get(f.name, ""))
    return "\n".join(lines)


@record  # torchrun's failure report then carries the exception message, not only an exit code
def main(argv: list[str] | None = None) -> dict:
    """Parse the configuration and train; returns the run summary (the same on every rank)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(USAGE + "\nkeys (--section.key=value), with their defaults:\n" + _help_keys(with_docs=True))
        return {}
    if "--help-keys" in argv:
        print(_help_keys())
        return {}
    check_only = "--check-config" in argv
    argv = [a for a in argv if a != "--check-config"]
    try:
        cfg = load_config(argv)
    except ConfigError as e:
        print(f"deepfm-train: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if check_only:  # the launchers validate once, before any rank starts
        return {}

    from deepfm_dist.trainer import train  # heavy imports (torchrec) after the config is valid

    from torch.distributed.checkpoint.api import CheckpointException

    try:
        return train(cfg)
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        # torchrun (and torchelastic's spawn) report only the first rank that failed, which is
        # often a peer that merely lost its connection; every rank names its own cause here.
        rank = os.environ.get("RANK", "0")
        print(f"deepfm-train: rank {rank}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        record_failure(rank, e)
        raise


# Messages of a rank that failed because a peer failed first (lost connection, peer gone).
_PEER_LOSS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "shared-memory comms: rank",
              "NCCL communicator was aborted", "Socket Timeout", "connectFullMesh")


def record_failure(rank: str, e: BaseException) -> None:
    """Append this rank's failure to ``$DEEPFM_FAILURE_FILE`` (set by the launchers' run_agent),
    which prints the causes, peers' lost connections last, as the run's final lines: under
    ``LOG_RANK=0`` another rank's own message is not shown, and torchrun's report puts the root
    cause at the bottom of a long block."""
    path = os.environ.get("DEEPFM_FAILURE_FILE")
    if not path:
        return
    text = " ".join(f"{type(e).__name__}: {e}".split())
    kind = "peer" if any(p in text for p in _PEER_LOSS) else "cause"
    try:
        with open(path, "a") as f:
            f.write(f"{kind}\trank {rank}: {text}\n")
    except OSError:
        pass


def cli() -> int:
    """Console-script entry (``deepfm-train``): exit status 0 on success, not the summary."""
    main()
    return 0


if __name__ == "__main__":
    main()
