"""The compute ceiling of a CPU training step: the MLP alone in one process on all cores.

    python -m benchmarks ceiling [--warmup 20] [--steps 100] [--threads 0]
        [--batch-size B] [--section.key=value ...]

The model's own deep tower (``DeepTower``: same input width F*D, layer sizes, BatchNorm and
activation as configured) on random inputs: forward, binary cross-entropy, backward and the
configured dense optimizer's step. No embeddings, no communication, no data: whatever a
distributed step adds on top of this is overhead. ``--batch-size`` defaults to
``train.batch_size`` (the per-rank batch).

The tower runs as DeepFM runs it: with the dense fields folded into the first layer
(``DeepTower.forward(x, dense_vectors)``: Nd dense values instead of Nd * D columns, the
vectors e a parameter too). ``--no-fold`` runs the literal F*D-wide input instead, for
information: the ceiling of a model that does not fold.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks import report
from benchmarks.common import add_common_args, parse, pick_single_device, set_threads
from deepfm_dist.model.deepfm import DeepTower
from deepfm_dist.optim import _dense_optimizer
from deepfm_dist.step import autocast, check_precision


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench ceiling", description=__doc__.split("\n\n")[0])
    add_common_args(parser, warmup=20, steps=100)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (default 0: every core)")
    parser.add_argument("--batch-size", type=int, default=0, help="rows per step (default: train.batch_size)")
    parser.add_argument("--no-input-grad", action="store_true",
                        help="treat the input as data (no gradient w.r.t. it: one matmul fewer than DeepFM's MLP)")
    parser.add_argument("--no-fold", action="store_true",
                        help="the literal F*D-wide input, dense fields not folded into the first layer (for information)")
    args, cfg = parse(parser, list(argv or []))
    threads = set_threads(args.threads)
    batch = args.batch_size or cfg.train.batch_size
    num_dense, dim = len(cfg.data.dense), cfg.model.embedding_dim
    width = (num_dense + len(cfg.data.sparse)) * dim
    fold = num_dense > 0 and not args.no_fold
    torch.manual_seed(cfg.train.seed)
    device = pick_single_device(cfg)
    check_precision(cfg.train.precision, device.type)
    tower = DeepTower(width, cfg.model.mlp, cfg.model.activation, cfg.model.batch_norm, cfg.model.dropout,
                      cfg.model.linear_kernel).to(device)
    # Folded (as DeepFM): the input is [x (Nd) | sparse fields], the dense vectors a parameter.
    vectors = torch.nn.Parameter(torch.randn(num_dense, dim, device=device) * 0.1) if fold else None
    opt = _dense_optimizer(cfg.optimizer, [*tower.parameters(), *([vectors] if fold else [])])
    in_width = width - num_dense * dim + num_dense if fold else width
    # In DeepFM the MLP's input is the embeddings, so its backward includes d(loss)/d(input)
    # (one more matmul than a leaf input needs); --no-input-grad leaves it out.
    inputs = [(torch.randn(batch, in_width, device=device) * 0.1).requires_grad_(not args.no_input_grad)
              for _ in range(4)]
    labels = [(torch.rand(batch, device=device) < 0.25).float() for _ in range(4)]

    clock = report.StepClock(device, args.warmup)
    for i in range(args.warmup + args.steps):
        opt.zero_grad()
        with autocast(device, cfg.train.precision):  # as step.Stepper: the forward only
            logits = tower(inputs[i % 4], vectors)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels[i % 4])
        loss.backward()
        opt.step()
        clock.tick()
    numbers = report.rank_numbers(clock, batch, 0.0, device)
    summary = report.summarize([numbers], batch)
    summary.update(threads=threads, batch_size=batch, linear_kernel=cfg.model.linear_kernel, input_grad=not args.no_input_grad,
                   precision=cfg.train.precision, dense_fields_folded=fold, input_width=in_width)
    params = sum(p.numel() for p in tower.parameters())
    setup = [
        ("model", f"DeepTower {width}-{'-'.join(map(str, cfg.model.mlp))}-1"
                  f"{f' ({num_dense} dense fields folded: first layer {in_width} wide)' if fold else ''}"
                  f"{' +BN' if cfg.model.batch_norm else ''} {cfg.model.activation}, {params:,} parameters; "
                  f"BCE loss; {cfg.optimizer.dense} step; linear kernel {cfg.model.linear_kernel}; precision {cfg.train.precision}; gradient w.r.t. the input: "
                  f"{'no' if args.no_input_grad else 'yes (as in DeepFM)'}"),
        ("run", f"1 process x {threads} thread(s), {device.type}, batch {batch}, {args.warmup} warm-up + "
                f"{args.steps} measured steps"),
    ]
    report.emit("ceiling", 1, summary=summary, per_rank=[numbers], setup=setup, config=cfg.to_dict(), out=args.out)
    return 0
