"""fp32 against bf16 (``train.precision``) on whole training runs: quality and throughput over seeds.

    python -m benchmarks precision [--data DIR ...] [--seeds 0,1,2] [--nproc 2]
        [--emulate-bf16] [--out FILE] [--runs-dir DIR] [--section.key=value ...]

For each data set (a folder with ``train/`` and ``val/``; default: the default run's synthetic
set), each seed (``train.seed``: the model's initialisation and the row-group order) and each
precision, one ``deepfm-train`` run under torchrun with the default config, fp32 and bf16 run
back to back so that a drift of the machine's speed hits both. Each run's ``summary.json`` gives
val AUC, logloss, NE, calibration and training samples/s. The report gives per data set the
runs, the mean and the spread (max - min) over seeds of each, and a verdict per quality metric:

    unchanged  when |mean(bf16) - mean(fp32)| <= max(spread(fp32), spread(bf16))

that is, the precision moves the metric by no more than changing the seed does.

``--emulate-bf16``: on a CPU without native bf16 (neither AVX512-BF16 nor AMX) training
refuses ``train.precision=bf16`` because it would be slower than fp32. Quality does not depend on
the hardware: bf16 rounds the matmul inputs to 8 significant bits and accumulates in fp32 on
every backend, so this flag lets the ranks run bf16 through torch's own kernels
(``model.linear_kernel=torch``, for both precisions, so they differ only in precision). Its
samples/s are then not speed figures, and the report says so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

import torch

from benchmarks import compare, report

PRECISIONS = ("fp32", "bf16")
QUALITY = ("val_auc", "val_logloss", "val_ne", "val_calibration")
EMULATE_ENV = "DEEPFM_BENCH_EMULATE_BF16"
DEFAULT_DATA = os.path.join("data", "generated", "synthetic")


def native_bf16_cpu() -> bool:
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def run_command(nproc: int, overrides: list[str]) -> list[str]:
    """One training run under torchrun, its ranks entering through ``rank_main``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", f"--nproc_per_node={nproc}",
            "--local-ranks-filter=0", "-m", "benchmarks.precision", *overrides]


def rank_main(argv: list[str]) -> int:
    """A rank of one run: ``deepfm-train``'s main, with the CPU's native-bf16 check lifted when
    the parent asked for emulation (the GPU checks stay)."""
    if os.environ.get(EMULATE_ENV) == "1":
        from deepfm_dist import trainer
        real_check = trainer.check_precision

        def check_allowing_emulated_cpu_bf16(precision: str, device_type: str) -> None:
            if device_type != "cpu":
                real_check(precision, device_type)

        trainer.check_precision = check_allowing_emulated_cpu_bf16
    from deepfm_dist.train import main
    main(argv)  # returns the run's summary dict; summary.json carries it to the parent
    return 0


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per precision: mean and spread (max - min) over seeds of each quality metric and of
    samples/s; per quality metric: the difference of means and the verdict (module docstring)."""
    out: dict[str, Any] = {}
    for precision in PRECISIONS:
        mine = [r for r in runs if r["precision"] == precision]
        if not mine:
            continue
        out[precision] = {}
        for key in QUALITY + ("train_samples_per_s",):
            values = [r[key] for r in mine]
            out[precision][key] = {"mean": statistics.fmean(values), "spread": max(values) - min(values),
                                   "n": len(values)}
    if all(p in out for p in PRECISIONS):
        verdicts = {}
        for key in QUALITY:
            a, b = out["fp32"][key], out["bf16"][key]
            diff = b["mean"] - a["mean"]
            allowed = max(a["spread"], b["spread"])
            verdicts[key] = {"diff": diff, "allowed": allowed, "unchanged": abs(diff) <= allowed}
        out["verdict"] = verdicts
        out["unchanged"] = all(v["unchanged"] for v in verdicts.values())
        out["speedup"] = out["bf16"]["train_samples_per_s"]["mean"] / out["fp32"]["train_samples_per_s"]["mean"]
    return out


def _table(name: str, runs: list[dict[str, Any]], summary: dict[str, Any], emulated: bool) -> str:
    head = "| precision | seed | val AUC | logloss | NE | calibration | samples/s |\n|---|---|---|---|---|---|---|"
    lines = [f"### {name}", "", head]
    for r in runs:
        lines.append(f"| {r['precision']} | {r['seed']} | {r['val_auc']:.4f} | {r['val_logloss']:.4f} | "
                     f"{r['val_ne']:.4f} | {r['val_calibration']:.3f} | {r['train_samples_per_s']:,.0f} |")
    for p in PRECISIONS:
        if p in summary:
            s = summary[p]
            lines.append(f"| **{p} mean (spread)** | | {s['val_auc']['mean']:.4f} ({s['val_auc']['spread']:.4f}) | "
                         f"{s['val_logloss']['mean']:.4f} ({s['val_logloss']['spread']:.4f}) | "
                         f"{s['val_ne']['mean']:.4f} ({s['val_ne']['spread']:.4f}) | "
                         f"{s['val_calibration']['mean']:.3f} ({s['val_calibration']['spread']:.3f}) | "
                         f"{s['train_samples_per_s']['mean']:,.0f} |")
    if "verdict" in summary:
        lines.append("")
        for key, v in summary["verdict"].items():
            lines.append(f"- {key}: bf16 - fp32 = {v['diff']:+.4f}, seeds' spread {v['allowed']:.4f}: "
                         f"{'unchanged' if v['unchanged'] else 'CHANGED'}")
        speed = f"bf16 / fp32 samples/s {summary['speedup']:.2f}"
        lines.append(f"- {speed}" + (" (emulated bf16: not a speed figure)" if emulated else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench precision", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", action="append", help=f"data set folder with train/ and val/ (repeatable; "
                                                         f"default {DEFAULT_DATA})")
    parser.add_argument("--seeds", default="0,1,2", help="train.seed values (default 0,1,2)")
    parser.add_argument("--nproc", type=int, default=2, help="ranks per run (default 2)")
    parser.add_argument("--emulate-bf16", action="store_true",
                        help="run bf16 on a CPU without native bf16, for quality figures only")
    parser.add_argument("--out", help="JSON file (default runs/bench/precision_TIME.json)")
    parser.add_argument("--runs-dir", help="where the runs go (default runs/bench/precision_TIME/)")
    args, overrides = parser.parse_known_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    if len(seeds) < 2:
        parser.error("--seeds: at least 2 seeds (the verdict compares against their spread)")
    gpu = torch.cuda.is_available() and not any(o.startswith("--train.device=cpu") for o in overrides)
    emulated = False
    if not gpu and not native_bf16_cpu():
        if not args.emulate_bf16:
            parser.error("this CPU has no native bf16 (AVX512-BF16 or AMX), so training refuses "
                         "train.precision=bf16; pass --emulate-bf16 for quality figures only")
        emulated = True
    datasets = args.data or [DEFAULT_DATA]
    for d in datasets:
        for split in ("train", "val"):
            if not os.path.isdir(os.path.join(d, split)):
                parser.error(f"--data {d}: expected a folder with train/ and val/ (no {split}/ there)")
    env = dict(os.environ)
    extra = ["--train.tensorboard=false", "--train.progress=false", "--checkpoint.at_end=false",
             "--checkpoint.best_metric=none"]
    if emulated:
        env[EMULATE_ENV] = "1"
        extra.append("--model.linear_kernel=torch")
    stamp = time.strftime("%Y%m%d_%H%M%S")
    root = args.runs_dir or os.path.join("runs", "bench", f"precision_{stamp}")
    results: dict[str, Any] = {"hardware": report.hardware(), "emulated_bf16": emulated, "seeds": seeds,
                               "nproc": args.nproc, "overrides": overrides, "datasets": {}}
    tables = []
    for d in datasets:
        name = os.path.basename(os.path.normpath(d))
        runs = []
        for seed in seeds:
            for precision in PRECISIONS:
                run_dir = os.path.join(root, f"{name}_{precision}_s{seed}")
                cmd = run_command(args.nproc, [
                    f"--data.train={os.path.join(d, 'train')}", f"--data.val={os.path.join(d, 'val')}",
                    f"--train.seed={seed}", f"--train.precision={precision}", f"--run_dir={run_dir}",
                    *extra, *overrides])
                t0 = time.perf_counter()
                s = compare.training_run("precision", cmd, run_dir, env)
                run = {"precision": precision, "seed": seed, "run_dir": run_dir,
                       "seconds": time.perf_counter() - t0, "command": " ".join(cmd),
                       **{k: s[k] for k in QUALITY + ("train_samples_per_s", "steps")}}
                runs.append(run)
                print(f"{name} {precision} seed {seed}: AUC {run['val_auc']:.4f} logloss {run['val_logloss']:.4f} "
                      f"NE {run['val_ne']:.4f} cal {run['val_calibration']:.3f} "
                      f"{run['train_samples_per_s']:,.0f} samples/s ({run['seconds']:.0f} s)", flush=True)
        summary = summarize(runs)
        results["datasets"][d] = {"runs": runs, "summary": summary}
        tables.append(_table(f"{d} ({runs[0]['steps']} steps, {args.nproc} ranks)", runs, summary, emulated))
    print("\n\n".join(tables))
    out = args.out or os.path.join("runs", "bench", f"precision_{stamp}.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {out}")
    verdicts = [v["summary"].get("unchanged") for v in results["datasets"].values()]
    print(json.dumps({"mode": "precision", "emulated_bf16": emulated, "unchanged": all(verdicts),
                      "out": out}))
    return 0


if __name__ == "__main__":
    sys.exit(rank_main(sys.argv[1:]))
