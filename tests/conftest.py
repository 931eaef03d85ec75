import os
import socket

import pytest

# One thread per process: the suite runs 2-rank jobs on 2-core machines.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small planted Criteo-style Parquet set: (folder, oracle dict)."""
    from deepfm_dist.prepare.synthetic import generate

    out = tmp_path_factory.mktemp("synthetic")
    oracle = generate(
        out, train_rows=24_000, val_rows=6_000, max_cardinality=500, files_per_split=(3, 2),
        row_group_size=1_000, seed=1,
    )
    return out, oracle


def small_args(data_dir, run_dir, *extra: str) -> list[str]:
    """A configuration small enough for 2 CPU ranks in a few seconds."""
    return [
        f"--data.train={data_dir}/train", f"--data.val={data_dir}/val", f"--run_dir={run_dir}",
        "--data.num_embeddings=1000", "--model.embedding_dim=8", "--model.mlp=32,16",
        "--train.batch_size=256", "--train.epochs=2", "--train.log_every=5",
        "--optimizer.embedding_lr=0.1", "--optimizer.dense_lr=0.003", *extra,
    ]
