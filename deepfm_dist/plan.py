"""``deepfm-plan``: the sharding plan a configuration gets on a cluster, before any job runs.

    deepfm-plan --config criteo_1tb --hardware h100-80g --nodes 2
    deepfm-plan --world-size 2 --device cpu                    # what ./launcher/train.sh gets here
    deepfm-plan --config my.toml --hardware a100-80g --world-size 64 --json plan.json \\
        --model.embedding_dim=128 --sharding.allow_uvm_caching=true

Runs on any machine, without a GPU or a process group: the tables are planned on ``meta``
by the same function training calls (``planning.plan_tables``), with the same constraints,
memory reserve and optimizer accounting, so the plan printed here is the plan the job gets on
that cluster. Prints per table (rows, row width, sharding, kernel, ranks, HBM and host bytes
with optimizer state) and per rank (HBM, host memory, the planner's perf estimate), then the
planning time. When the tables do not fit it says what they need and what there is, searches
the smallest world size that fits on the same hardware, and exits 1.

The cluster: ``--hardware`` (a preset: memory and the planner's bandwidths) or ``--device``
with ``--hbm-gib`` / ``--ddr-gib``; ``--world-size`` or ``--nodes`` x ``--ranks-per-node``.
Every other argument is the training configuration (``--config``, ``--section.key=value``).
"""

from __future__ import annotations

import argparse
import math
import sys

from deepfm_dist.config import ConfigError, load_config

PLAN_FLAGS_HELP = __doc__.split("\n\n")[0]


def parser() -> argparse.ArgumentParser:
    from deepfm_dist.config import HARDWARE_NAMES

    p = argparse.ArgumentParser(
        prog="deepfm-plan", description=PLAN_FLAGS_HELP,
        epilog="Any other argument is a training configuration key (--config FILE|PRESET, --section.key=value); "
               "see deepfm-train --help.")
    p.add_argument("--hardware", choices=[*HARDWARE_NAMES[1:], "cpu"], help="a preset: device, memory per rank, ranks per node "
                   "and the planner's bandwidths (docs/planning.md gives the sources)")
    p.add_argument("--device", choices=("cuda", "cpu"), help="the ranks' device (default: the preset's, else cpu); "
                   "cuda without --hardware or --hbm-gib: this machine's GPUs, as a training run here sees them")
    p.add_argument("--world-size", type=int, metavar="N", help="ranks in all (or --nodes x --ranks-per-node)")
    p.add_argument("--nodes", type=int, metavar="N", help="nodes, with --ranks-per-node (default: the preset's)")
    p.add_argument("--ranks-per-node", type=int, metavar="N",
                   help="ranks per node (default: the preset's, on CPU the world size: one node)")
    p.add_argument("--hbm-gib", type=float, metavar="GIB", help="GPU memory per rank (default: sharding.hbm_gb, "
                   "else the preset's)")
    p.add_argument("--ddr-gib", type=float, metavar="GIB", help="host memory per rank (default: the preset's; on "
                   "CPU sharding.host_memory_gb, else this machine's free memory / ranks per node, as training)")
    p.add_argument("--json", metavar="PATH", help="also write the plan as JSON (the run's plan.json format)")
    return p


def cluster_from_args(args: argparse.Namespace, cfg, error) -> object:
    from deepfm_dist.distributed.planning import GIB, HARDWARE, Cluster, cpu_budget_bytes

    hw = HARDWARE[args.hardware] if args.hardware else (
        HARDWARE[cfg.sharding.hardware] if cfg.sharding.hardware != "auto" else None)
    device = args.device or (hw.device if hw else "cpu")
    if hw is not None and hw.device != device:
        error(f"--device {device} contradicts the hardware preset {hw.name} ({hw.device}; --hardware or "
              f"sharding.hardware)")
    for flag, value in (("--world-size", args.world_size), ("--nodes", args.nodes),
                        ("--ranks-per-node", args.ranks_per_node)):
        if value is not None and value < 1:
            error(f"{flag} {value}: expected a positive integer")
    for flag, value in (("--hbm-gib", args.hbm_gib), ("--ddr-gib", args.ddr_gib)):
        if value is not None and not (value > 0 and math.isfinite(value)):
            error(f"{flag} {value}: expected a positive number of GiB")
    if args.world_size is not None and args.nodes is not None:
        per_node = args.ranks_per_node or (hw.ranks_per_node if hw else None)
        if per_node is None or args.nodes * per_node != args.world_size:
            error(f"--world-size {args.world_size} and --nodes {args.nodes}: give one (or make them agree "
                  f"with --ranks-per-node)")
    if args.world_size is not None:
        world = args.world_size
        per_node = args.ranks_per_node or (min(hw.ranks_per_node, world) if hw and hw.device == "cuda" else world)
    elif args.nodes is not None:
        per_node = args.ranks_per_node or (hw.ranks_per_node if hw else None)
        if per_node is None:
            error("--nodes needs --ranks-per-node (or a --hardware preset)")
        world = args.nodes * per_node
    else:
        error("give --world-size N, or --nodes N (with --ranks-per-node or a --hardware preset)")
    if per_node > world:
        error(f"--ranks-per-node {per_node} > world size {world}")
    if device == "cuda" and not (hw or args.hbm_gib or cfg.sharding.hbm_gb):
        # No preset and no size: the GPUs of this machine, described as a training run here
        # describes them (slurm/train.sbatch checks the plan this way before the job starts).
        import torch

        from deepfm_dist.distributed.planning import cluster_of_run

        if not torch.cuda.is_available():
            error("--device cuda: give --hardware (a preset) or --hbm-gib (no GPU here to describe)")
        return cluster_of_run(cfg, world, per_node, torch.device("cuda", 0))
    if device == "cuda":
        hbm_gib = args.hbm_gib or cfg.sharding.hbm_gb or hw.hbm_gib
        hbm = int(hbm_gib * GIB)
        ddr = int((args.ddr_gib if args.ddr_gib is not None else (hw.ddr_gib if hw else 128)) * GIB)
        return Cluster(world, per_node, "cuda", hbm, ddr, hw)
    ddr = int(args.ddr_gib * GIB) if args.ddr_gib is not None else cpu_budget_bytes(cfg, per_node)
    return Cluster(world, per_node, "cpu", 0, ddr, None)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = parser()
    args, rest = p.parse_known_args(argv)
    from deepfm_dist.config import TOP_LEVEL

    def config_key(arg: str) -> bool:
        name = arg[2:].split("=")[0]
        return arg.startswith("--") and ("." in name or name in (*TOP_LEVEL, "config"))

    bad = [a for a in rest if a.startswith("-") and not config_key(a)]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)} (configuration keys look like --section.key=value)")
    try:
        cfg = load_config(rest)
    except ConfigError as e:
        p.error(str(e))
    if cfg.data.vocab:  # the vocabulary's table sizes, as training takes them
        from deepfm_dist.data.vocab import VocabError, resolve

        try:
            cfg.data = resolve(cfg.data)
        except VocabError as e:
            p.error(str(e))
    cluster = cluster_from_args(args, cfg, p.error)

    from deepfm_dist.distributed.planning import PlanFailed, format_report, plan_tables
    from deepfm_dist.distributed.sharding import make_sharder
    from deepfm_dist.logs import quiet_library_noise
    from deepfm_dist.step import build_model

    from deepfm_dist.versions import check_torchrec

    quiet_library_noise()
    check_torchrec()
    print(f"deepfm-plan: {cluster.describe()}; batch {cfg.train.batch_size} per rank", flush=True)
    try:
        _, report = plan_tables(build_model(cfg), cfg, cluster, make_sharder(cfg))
        status = 0
        print(format_report(report))
    except PlanFailed as e:
        report, status = e.report, 1
        print(f"deepfm-plan: does not fit: {e}", file=sys.stderr)
    if args.json:
        from deepfm_dist.fsutil import write_json_atomic

        write_json_atomic(args.json, report.to_json(), indent=1)
    if status == 0:
        print(f"deepfm-plan: fits: {report.need_bytes / 2**30:,.2f} GiB of tables and optimizer state on "
              f"{report.world_size} rank(s)")
    return status


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
