"""Launch a function on N local CPU ranks (real processes, gloo), as torchrun would."""

from __future__ import annotations

import uuid

from torch.distributed.launcher.api import LaunchConfig, elastic_launch


def launch(fn, args: tuple, nproc: int = 2, port: int | None = None) -> dict[int, object]:
    """Run ``fn(*args)`` on ``nproc`` ranks; returns {rank: return value}."""
    from tests.conftest import free_port

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{port or free_port()}",
        max_restarts=0,
        monitor_interval=0.2,
        start_method="spawn",
    )
    return elastic_launch(config, fn)(*args)
