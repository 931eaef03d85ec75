"""A/B of the model's forward + backward at two revisions, interleaved in one process.

    .venv/bin/python benchmarks/ab_model.py BASE_REV [--steps 200] [--threads 1] [--batch 2048]

Imports ``deepfm_dist.model`` from the working tree and from git revision ``BASE_REV`` (written
to a temporary directory as the package ``deepfm_base``), builds both DeepFMs with the same seed
(Criteo shape: 13 dense, 26 sparse fields, dim 16, MLP 400-400-400, unsharded tables of 2,000
rows), and times forward + BCE + backward on the same batch, alternating which model goes
first. On a shared machine whose speed drifts by +-10% over minutes, two models measured side
by side within seconds see the same drift, so differences of 1-2% show where back-to-back
benchmark runs cannot (benchmarks/cpu-2core_202612.md). Prints the largest logit difference
(the two must compute the same function) and the median and mean ms per step of each.
No optimizer and no sharding: what this measures is the model's own kernels.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent


def base_package(rev: str, where: pathlib.Path) -> None:
    """deepfm_dist at ``rev`` as the package ``deepfm_base`` under ``where``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "deepfm_dist"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive, check=True)
    (where / "deepfm_dist").rename(where / "deepfm_base")
    for path in (where / "deepfm_base").rglob("*.py"):
        path.write_text(path.read_text().replace("deepfm_dist", "deepfm_base"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", help="git revision to compare the working tree with")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=2048)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory(prefix="ab_model_") as tmp:  # only needed while importing
        base_package(args.base, pathlib.Path(tmp))
        sys.path.insert(0, tmp)
        import deepfm_base.model.deepfm as base
        import deepfm_dist.model.deepfm as new
        from torchrec import KeyedJaggedTensor

    b, nd, ns, rows = args.batch, 13, 26, 2000
    names = [f"C{i}" for i in range(ns)]

    def build(mod):
        torch.manual_seed(0)
        return mod.DeepFM(features=mod.one_hot_features(names, {n: rows for n in names}), num_dense=nd,
                          embedding_dim=16, mlp=[400, 400, 400], table_device="cpu")

    models = {"base": build(base), "new": build(new)}
    g = torch.Generator().manual_seed(1)
    dense = torch.rand(b, nd, generator=g)
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=names, values=torch.randint(0, rows, (b * ns,), generator=g),
                                              lengths=torch.ones(b * ns, dtype=torch.int32))
    labels = torch.randint(0, 2, (b,), generator=g).float()
    with torch.no_grad():
        diff = (models["new"](dense, kjt) - models["base"](dense, kjt)).abs().max().item()
    print(f"base {args.base} vs working tree: max |logit difference| {diff:.3g}")

    def step(model) -> None:
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(dense, kjt), labels)
        loss.backward()
        for p in model.parameters():
            p.grad = None

    times: dict[str, list[float]] = {"base": [], "new": []}
    for i in range(args.warmup + args.steps):
        for name in (("base", "new") if i % 2 else ("new", "base")):
            t0 = time.perf_counter()
            step(models[name])
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    for name, ts in times.items():
        print(f"{name:5s} median {statistics.median(ts) * 1e3:7.2f} ms   mean {statistics.mean(ts) * 1e3:7.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
