"""A plain single-process PyTorch DeepFM of the same size: what one would write without
TorchRec. The ``e2e`` target is a multiple of this.

    python -m benchmarks baseline [--warmup 10] [--steps 50] [--threads 0]
        [--batch-size B] [--tables config|kaggle] [--section.key=value ...]

One ``nn.EmbeddingBag(rows, D + 1, mode="sum", sparse=True)`` per sparse column (D vector
columns + the first-order weight, as in our table rows minus the padding), updated by
``torch.optim.Adagrad`` on the sparse gradients (``SparseAdam`` with
``--embedding-optimizer sparse_adam``); the dense part has the same math as ours (``DenseFields``,
the FM term, ``DeepTower``) with the configured dense optimizer. ``--kernels plain`` (default)
runs it as plain PyTorch would: ``nn.Linear`` and the FM identity through autograd.
``--kernels ours`` gives it our oneDNN Linear layers and analytic FM backward, for
information (how much of our lead is kernels rather than TorchRec and sharding). One
process, every core, the same Criteo-shaped batches as ``step``; ``--batch-size`` defaults to
``train.batch_size``.
"""

from __future__ import annotations

import argparse
import itertools

import torch
from torch import nn

from benchmarks import report
from benchmarks.common import add_common_args, config_line, parse, pick_single_device, set_threads, synthetic_batches
from deepfm_dist.model.deepfm import DeepTower, DenseFields
from deepfm_dist.model.fm import fm_second_order
from deepfm_dist.optim import _dense_optimizer
from deepfm_dist.step import autocast, check_precision


def autograd_fm(fields: torch.Tensor) -> torch.Tensor:
    """The FM term as plain PyTorch code writes it (sum-of-squares identity, autograd backward).
    fields [B, F, D] -> [B]."""
    return 0.5 * (fields.sum(dim=1).pow(2) - fields.pow(2).sum(dim=1)).sum(dim=1)


class PlainDeepFM(nn.Module):
    """DeepFM with one plain ``nn.EmbeddingBag`` per column. forward(dense [B, Nd], ids [Ns, B]) -> logits [B]."""

    def __init__(self, num_dense: int, table_sizes: list[int], dim: int, mlp: list[int], activation: str,
                 batch_norm: bool, dropout: float, init_std: float, kernels: str = "plain"):
        super().__init__()
        self.dim = dim
        self.fm = autograd_fm if kernels == "plain" else fm_second_order
        self.dense_fields = DenseFields(num_dense, dim, init_std)
        self.deep = DeepTower((num_dense + len(table_sizes)) * dim, mlp, activation, batch_norm, dropout,
                              linear_kernel="torch" if kernels == "plain" else "auto")
        self.bias = nn.Parameter(torch.zeros(1))
        self.tables = nn.ModuleList(nn.EmbeddingBag(n, dim + 1, mode="sum", sparse=True) for n in table_sizes)
        with torch.no_grad():
            for t in self.tables:
                t.weight[:, :dim].normal_(0, init_std)
                t.weight[:, dim].zero_()

    def forward(self, dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        rows = torch.stack([t(ids[i].unsqueeze(1)) for i, t in enumerate(self.tables)], dim=1)  # [B, Ns, D+1]
        dense_vectors, dense_first = self.dense_fields(dense)
        fields = torch.cat([dense_vectors, rows[:, :, : self.dim]], dim=1)  # [B, F, D]
        first_order = rows[:, :, self.dim].sum(dim=1) + dense_first
        return self.bias + first_order + self.fm(fields) + self.deep(fields.flatten(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench baseline", description=__doc__.split("\n\n")[0])
    add_common_args(parser, warmup=10, steps=50)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (default 0: every core)")
    parser.add_argument("--batch-size", type=int, default=0, help="rows per step (default: train.batch_size)")
    parser.add_argument("--embedding-optimizer", choices=("adagrad", "sparse_adam"), default="adagrad",
                        help="optimizer of the sparse embedding gradients (default adagrad)")
    parser.add_argument("--kernels", choices=("plain", "ours"), default="plain",
                        help="plain (default: nn.Linear and an autograd FM, as plain PyTorch code) or ours "
                             "(oneDNN Linear and the analytic FM backward of deepfm_dist.model, for information)")
    args, cfg = parse(parser, list(argv or []))
    threads = set_threads(args.threads)
    batch = args.batch_size or cfg.train.batch_size
    torch.manual_seed(cfg.train.seed)
    sizes = list(cfg.data.table_sizes().values())
    device = pick_single_device(cfg)
    check_precision(cfg.train.precision, device.type)
    model = PlainDeepFM(len(cfg.data.dense), sizes, cfg.model.embedding_dim, cfg.model.mlp, cfg.model.activation,
                        cfg.model.batch_norm, cfg.model.dropout, cfg.model.init_std, args.kernels).to(device)
    table_params = list(model.tables.parameters())
    dense_params = [p for n, p in model.named_parameters() if not n.startswith("tables.")]
    if args.embedding_optimizer == "adagrad":
        emb_opt = torch.optim.Adagrad(table_params, lr=cfg.optimizer.embedding_lr, eps=cfg.optimizer.embedding_eps)
    else:
        emb_opt = torch.optim.SparseAdam(table_params, lr=cfg.optimizer.embedding_lr)
    dense_opt = _dense_optimizer(cfg.optimizer, dense_params)
    data = []
    for b in synthetic_batches(cfg, 16, batch, seed=2000):
        ids = b.sparse_features.values().view(len(cfg.data.sparse), batch)
        data.append((b.dense_features.to(device), ids.to(device), b.labels.to(device)))
    batches = report.TimedIterator(itertools.cycle(data))

    clock = report.StepClock(device, args.warmup)
    wait_at_warmup = 0.0
    for i in range(args.warmup + args.steps):
        dense, ids, labels = next(batches)
        emb_opt.zero_grad()
        dense_opt.zero_grad()
        # train.precision=bf16: torch's own autocast, as plain PyTorch code would do it (its
        # nn.Linear then runs bf16 matmuls on oneDNN too).
        with autocast(device, cfg.train.precision):
            loss = nn.functional.binary_cross_entropy_with_logits(model(dense, ids), labels)
        loss.backward()
        emb_opt.step()
        dense_opt.step()
        clock.tick()
        if i + 1 == args.warmup:
            wait_at_warmup = batches.wait_seconds
    numbers = report.rank_numbers(clock, batch, batches.wait_seconds - wait_at_warmup, device)
    summary = report.summarize([numbers], batch)
    summary.update(threads=threads, batch_size=batch, embedding_optimizer=args.embedding_optimizer,
                   kernels=args.kernels, precision=cfg.train.precision)
    setup = [
        ("model", config_line(cfg) + f"; here: nn.EmbeddingBag(sparse=True) x {len(sizes)} + "
                  f"torch.optim.{type(emb_opt).__name__}, dense {cfg.optimizer.dense}, kernels: {args.kernels}, "
                  f"precision {cfg.train.precision}"),
        ("run", f"1 process x {threads} thread(s), {device.type}, batch {batch}, {args.warmup} warm-up + "
                f"{args.steps} measured steps"),
    ]
    report.emit("baseline", 1, summary=summary, per_rank=[numbers], setup=setup, config=cfg.to_dict(), out=args.out)
    return 0
