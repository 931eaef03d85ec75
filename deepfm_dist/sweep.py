"""Hyperparameter sweeps: a grid or a random search over any config keys, each trial a normal run.

    deepfm-sweep --out runs/sweep_lr --grid optimizer.embedding_lr=0.005,0.01,0.02,0.05 \\
        --grid model.batch_norm=true,false --seeds 0,1,2 -- --train.batch_size=1024
    deepfm-sweep --out runs/sweep_rand --random optimizer.embedding_lr=loguniform:0.001:0.1 \\
        --random model.dropout=choice:0,0.1,0.2 --trials 12 --seeds 0,1
    sbatch --nodes=4 slurm/sweep.sbatch --out runs/sweep_lr --grid ...      # one trial per node

A trial is one set of values for the swept keys; it runs once per seed (``train.seed``) as an
ordinary ``launcher/train.sh`` run in ``OUT/trials/<trial>/seed_<s>`` (every ``NPROC``, ``CONFIG``
and GPU setting of the launcher applies). Arguments after ``--`` go to every run. Grid keys are
crossed; random keys are drawn ``--trials`` times from their distributions (by ``--sweep-seed``,
so a rerun draws the same values), and crossed with the grid keys if both are given.

A run whose ``summary.json`` exists (and was not stopped by a signal) is finished and is not run
again, so rerunning the same command continues a stopped sweep; a failed run is retried. The
results (``OUT/sweep.json``, ``OUT/results.md``) rank the trials by the mean of a validation
metric over the seeds (``--metric``: auc, higher is better; logloss or ne, lower is better) and
show its spread (max - min over seeds); ``OUT/best.toml`` is the best trial's whole configuration,
ready for ``--config OUT/best.toml``.

``--launcher slurm`` (inside an allocation, e.g. ``slurm/sweep.sbatch``): runs as many trials at
once as the allocation has nodes, each with ``srun --nodes=1 --ntasks=1 --exclusive`` on a node of
its own (``SWEEP_SRUN_ARGS``: more srun options for each run, e.g. ``--gpus-per-node=8``).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import random
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from deepfm_dist.cli import Parser, split_run_args
from deepfm_dist.config import ConfigError, load_config, to_toml
from deepfm_dist.fsutil import finished_run_summary, write_json_atomic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = {"auc": ("val_auc", True), "logloss": ("val_logloss", False), "ne": ("val_ne", False)}
"""--metric -> (summary.json key, higher is better)."""
QUALITY = ("val_auc", "val_logloss", "val_ne", "val_calibration")
RESERVED = ("run_dir", "train.seed", "resume", "init_from")
"""Keys the sweep sets itself in every run."""
DISTRIBUTIONS = ("loguniform", "uniform", "int", "choice")


class SweepError(ValueError):
    """A bad sweep option; the message names the flag and what was expected."""


@dataclass
class Trial:
    """One set of values for the swept keys (``key -> value`` as given on the command line)."""

    params: dict[str, str]
    name: str = field(init=False)

    def __post_init__(self) -> None:
        text = json.dumps(sorted(self.params.items()))
        self.name = "t" + hashlib.sha1(text.encode()).hexdigest()[:10]

    def overrides(self) -> list[str]:
        return [f"--{k}={v}" for k, v in self.params.items()]

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.params.items())

    def run_dir(self, out: str, seed: int) -> str:
        return os.path.join(out, "trials", self.name, f"seed_{seed}")


def parse_grid(specs: list[str]) -> dict[str, list[str]]:
    """``--grid KEY=V1,V2``: the values of each key, in order."""
    out: dict[str, list[str]] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        items = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key.strip() or not items:
            raise SweepError(f"--grid {spec!r}: expected SECTION.KEY=V1,V2,...")
        if key in out:
            raise SweepError(f"--grid {spec!r}: {key} is given twice")
        out[key.strip()] = items
    return out


def parse_random(specs: list[str]) -> dict[str, tuple[str, list[str]]]:
    """``--random KEY=DIST:ARGS``: loguniform:LO:HI, uniform:LO:HI, int:LO:HI or choice:A,B,C."""
    out: dict[str, tuple[str, list[str]]] = {}
    for spec in specs:
        key, sep, rest = spec.partition("=")
        dist, _, args = rest.partition(":")
        if not sep or not key or dist not in DISTRIBUTIONS:
            raise SweepError(f"--random {spec!r}: expected SECTION.KEY=DIST:ARGS with DIST one of "
                             f"{', '.join(DISTRIBUTIONS)} (e.g. optimizer.embedding_lr=loguniform:0.001:0.1)")
        if dist == "choice":
            values = [v.strip() for v in args.split(",") if v.strip()]
            if not values:
                raise SweepError(f"--random {spec!r}: choice needs values, e.g. choice:0,0.1,0.2")
        else:
            values = args.split(":")
            try:
                lo, hi = (float(v) for v in values)
            except ValueError:
                raise SweepError(f"--random {spec!r}: {dist} needs LO:HI numbers") from None
            if not lo < hi or (dist == "loguniform" and lo <= 0) or (dist == "int" and not (lo.is_integer()
                                                                                            and hi.is_integer())):
                raise SweepError(f"--random {spec!r}: expected LO < HI" + (", both > 0" if dist == "loguniform"
                                                                            else ", integers" if dist == "int" else ""))
        if key in out:
            raise SweepError(f"--random {spec!r}: {key} is given twice")
        out[key] = (dist, values)
    return out


def _draw(rng: random.Random, dist: str, values: list[str]) -> str:
    if dist == "choice":
        return rng.choice(values)
    lo, hi = float(values[0]), float(values[1])
    if dist == "int":
        return str(rng.randint(int(lo), int(hi)))
    if dist == "loguniform":
        return f"{math.exp(rng.uniform(math.log(lo), math.log(hi))):.3g}"
    return f"{rng.uniform(lo, hi):.3g}"


def make_trials(grid: dict[str, list[str]], rand: dict[str, tuple[str, list[str]]], trials: int,
                sweep_seed: int) -> list[Trial]:
    """The grid's cross product, crossed with ``trials`` random draws when random keys are given."""
    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] or [{}]
    draws: list[dict[str, str]] = [{}]
    if rand:
        rng = random.Random(sweep_seed)
        draws = [{k: _draw(rng, d, v) for k, (d, v) in rand.items()} for _ in range(trials)]
    out, seen = [], set()
    for draw in draws:
        for point in points:
            t = Trial({**point, **draw})
            if t.name not in seen:  # random draws may repeat (choice, int)
                seen.add(t.name)
                out.append(t)
    return out


def summarize(trials: list[Trial], seeds: list[int], out: str, metric: str) -> list[dict[str, Any]]:
    """Per trial: the runs' metrics, their mean and spread over seeds; ranked by ``metric``."""
    key, higher = METRICS[metric]
    rows = []
    for t in trials:
        runs = {}
        for seed in seeds:
            s = finished_run_summary(t.run_dir(out, seed))
            if s is not None:
                runs[seed] = {k: s.get(k) for k in (*QUALITY, "steps", "train_samples_per_s")}
        row: dict[str, Any] = {"trial": t.name, "params": t.params, "runs": runs, "complete": len(runs) == len(seeds)}
        for k in QUALITY:
            vals = [r[k] for r in runs.values() if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])]
            row[k] = {"mean": statistics.fmean(vals), "spread": max(vals) - min(vals), "n": len(vals)} if vals else None
        rows.append(row)

    def rank_key(row: dict[str, Any]) -> tuple:
        m = row[key]
        if m is None:
            return (2, 0.0)
        return (0 if row["complete"] else 1, -m["mean"] if higher else m["mean"])

    return sorted(rows, key=rank_key)


def results_table(rows: list[dict[str, Any]], swept: list[str], metric: str) -> str:
    key, _ = METRICS[metric]
    head = ["rank", "trial", *swept, "seeds", f"{metric} mean", "spread", "AUC", "logloss", "NE", "calibration"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(rows, 1):
        def cell(k: str, fmt: str = ".4f") -> str:
            return "-" if r[k] is None else format(r[k]["mean"], fmt)
        spread = "-" if r[key] is None else f"{r[key]['spread']:.4f}"
        n = len(r["runs"])
        lines.append("| " + " | ".join([str(i), r["trial"], *(r["params"].get(k, "") for k in swept), str(n),
                                        cell(key), spread, cell("val_auc"), cell("val_logloss"), cell("val_ne"),
                                        cell("val_calibration", ".3f")]) + " |")
    return "\n".join(lines)


def _launch(cmd: list[str], log_path: str, launcher: str) -> subprocess.Popen:
    if launcher == "slurm":
        extra = shlex.split(os.environ.get("SWEEP_SRUN_ARGS", ""))  # e.g. --gpus-per-node=8
        cmd = ["srun", "--nodes=1", "--ntasks=1", "--exclusive", "--kill-on-bad-exit=1", *extra, *cmd]
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="deepfm-sweep", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Arguments after -- go to every run (e.g. --config my.toml --train.epochs=2).")
    p.add_argument("--out", required=True, help="the sweep's folder: trials/, sweep.json, results.md, best.toml")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a key and its values (repeatable; the keys are crossed)")
    p.add_argument("--random", action="append", default=[], metavar="KEY=DIST:ARGS",
                   help="a key drawn from loguniform:LO:HI, uniform:LO:HI, int:LO:HI or choice:A,B,C (repeatable)")
    p.add_argument("--trials", type=int, default=0, help="random draws (the budget; needed with --random)")
    p.add_argument("--sweep-seed", type=int, default=0, help="seed of the random draws (default 0)")
    p.add_argument("--seeds", default="0", help="train.seed values each trial runs with (default 0)")
    p.add_argument("--metric", choices=list(METRICS), default="auc",
                   help="validation metric that ranks the trials (default auc)")
    p.add_argument("--launcher", choices=("local", "slurm"), default="local",
                   help="local: one run at a time on this node; slurm: one run per node of the allocation")
    p.add_argument("--parallel", type=int, default=0,
                   help="runs at once (default: 1 locally, the allocation's node count with slurm)")
    p.add_argument("--train-script", default=os.path.join(ROOT, "launcher", "train.sh"), help=argparse.SUPPRESS)
    p.add_argument("--dry-run", action="store_true", help="print the runs and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    argv, extra = split_run_args(argv)
    p = build_parser()
    args = p.parse_args(argv)
    try:
        grid, rand = parse_grid(args.grid), parse_random(args.random)
        if not grid and not rand:
            raise SweepError("nothing to sweep: give --grid KEY=V1,V2 and/or --random KEY=DIST:ARGS")
        if rand and args.trials < 1:
            raise SweepError(f"--trials {args.trials}: --random needs a budget of at least 1 draw")
        if not rand and args.trials:
            raise SweepError("--trials counts random draws: give --random keys (a grid runs all its points)")
        both = sorted(set(grid) & set(rand))
        if both:
            raise SweepError(f"{', '.join(both)}: in --grid and --random; sweep a key one way")
        try:
            seeds = [int(s) for s in args.seeds.split(",")]
        except ValueError:
            raise SweepError(f"--seeds {args.seeds!r}: expected comma-separated integers") from None
        if len(set(seeds)) != len(seeds):
            raise SweepError(f"--seeds {args.seeds!r}: each seed once")
        for key in [*grid, *rand]:
            if key in RESERVED:
                raise SweepError(f"{key}: set by deepfm-sweep in every run (--seeds for train.seed)")
        for a in extra:
            if a.partition("=")[0].lstrip("-") in RESERVED:
                raise SweepError(f"{a}: set by deepfm-sweep in every run; leave it out of the run arguments")
        parallel = args.parallel
        if args.launcher == "slurm":
            if not os.environ.get("SLURM_JOB_ID"):
                raise SweepError("--launcher slurm: run inside an allocation (sbatch slurm/sweep.sbatch, or salloc)")
            parallel = parallel or int(os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES") or 1)
        parallel = max(parallel, 1)
        trials = make_trials(grid, rand, args.trials, args.sweep_seed)
        # Every trial's configuration is checked before the first run: a bad value fails in seconds.
        configs = {}
        for t in trials:
            try:
                configs[t.name] = load_config([*extra, *t.overrides(), f"--train.seed={seeds[0]}"])
            except ConfigError as e:
                raise SweepError(f"trial {t.params}: {e}") from None
    except SweepError as e:
        p.error(str(e))
    out = os.path.abspath(args.out)
    swept = [*grid, *rand]
    runs = [(t, s) for t in trials for s in seeds]
    todo = [(t, s) for t, s in runs
            if finished_run_summary(t.run_dir(out, s)) is None]
    print(f"deepfm-sweep: {len(trials)} trials x {len(seeds)} seeds = {len(runs)} runs; "
          f"{len(runs) - len(todo)} finished before, {len(todo)} to run ({args.launcher}, {parallel} at once)",
          flush=True)
    for t in [] if args.dry_run else trials:
        write_json_atomic(os.path.join(out, "trials", t.name, "trial.json"), {"trial": t.name, "params": t.params,
                                                                           "run_args": extra})
    failed: list[str] = []
    pending = list(todo)
    active: list[tuple[subprocess.Popen, Trial, int, float, str]] = []
    while pending or active:
        while pending and len(active) < parallel:
            t, seed = pending.pop(0)
            run_dir = t.run_dir(out, seed)
            cmd = [args.train_script, *extra, *t.overrides(), f"--train.seed={seed}", f"--run_dir={run_dir}",
                   "--resume"]
            if args.dry_run:
                print(" ".join(cmd))
                continue
            log = os.path.join(run_dir, "sweep.log")
            active.append((_launch(cmd, log, args.launcher), t, seed, time.perf_counter(), log))
        for entry in list(active):
            proc, t, seed, t0, log = entry
            if proc.poll() is None:
                continue
            active.remove(entry)
            s = finished_run_summary(t.run_dir(out, seed))
            if proc.returncode != 0 or s is None:
                failed.append(f"{t.name} seed {seed} (exit {proc.returncode}; {log})")
                print(f"deepfm-sweep: {t.name} [{t.label}] seed {seed}: FAILED (exit {proc.returncode}); see {log}",
                      flush=True)
            else:
                auc, loss = (f"{s[k]:.4f}" if isinstance(s.get(k), float) else "undefined"
                             for k in ("val_auc", "val_logloss"))
                print(f"deepfm-sweep: {t.name} [{t.label}] seed {seed}: AUC {auc} logloss {loss} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
        if active:
            time.sleep(0.2)
    if args.dry_run:
        return 0
    rows = summarize(trials, seeds, out, args.metric)
    table = results_table(rows, swept, args.metric)
    best = rows[0] if rows and rows[0][METRICS[args.metric][0]] is not None else None
    write_json_atomic(os.path.join(out, "sweep.json"), {
        "metric": args.metric, "seeds": seeds, "swept": swept, "run_args": extra, "launcher": args.launcher,
        "trials": rows, "best": best and best["trial"], "failed": failed})
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(f"# deepfm-sweep {' '.join(argv)}{' -- ' + ' '.join(extra) if extra else ''}\n\n{table}\n")
    print(table)
    if best is not None:
        label = Trial(best["params"]).label
        text = (f"# deepfm-sweep's best trial {best['trial']} of {out} by mean val {args.metric} over seeds "
                f"{','.join(map(str, best['runs']))}:\n# {label}\n" + to_toml(configs[best["trial"]]))
        with open(os.path.join(out, "best.toml"), "w") as f:
            f.write(text)
        print(f"deepfm-sweep: best {best['trial']} {label}; {os.path.join(out, 'best.toml')}")
    if failed:
        print(f"deepfm-sweep: {len(failed)} run(s) failed: {'; '.join(failed)}. Rerun the same command to retry "
              f"them (finished runs are kept).", file=sys.stderr)
        return 1
    return 0


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
