"""Our DeepFM beside reference models, on one split, one budget: validation quality over seeds.

    ./launcher/bench.sh quality --data DIR [--data DIR2 ...] [--seeds 0,1,2] [--batch-size B]
        [--epochs E] [--models ours,lr,deepctr] [--lr-rate 0.05] [--out FILE] [--runs-dir DIR]
        [--section.key=value ...]

A data set is a folder with ``train/`` and ``val/``, each holding Parquet (``prepare-criteo``'s
output, the planted sets of ``data/make_synthetic.py``, the Criteo-shaped generator's data after
``prepare-criteo``), or holding Criteo TSV files (genuine rows, plain or gzip: ``train/*.txt``,
``val/*.txt``), which are converted to Parquet under the runs folder first.

Per data set and seed, on the same rows, for the same epochs and global batch:

- ``ours``: ``launcher/train.sh`` with the default configuration (``--section.key=value``
  arguments change it), ``NPROC`` ranks (default 2), ``train.batch_size`` = the global batch /
  ranks, ``train.seed`` = the seed;
- ``lr``: a hashed logistic regression (``benchmarks/references.py``; our hashing and dense
  transform, per-coordinate Adagrad at ``--lr-rate``);
- ``deepctr``: DeepCTR-Torch's DeepFM with our embedding size and MLP, otherwise its documented
  defaults (``benchmarks/references.py``).

Each gives val AUC, logloss, NE and calibration, computed by the same functions; the report gives
per model the mean and spread (max - min) over seeds, and ours minus each reference's mean AUC,
with the larger spread as the noise it must exceed. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from benchmarks import compare, references, report
from deepfm_dist.config import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ("ours", "lr", "deepctr")
QUALITY = ("val_auc", "val_logloss", "val_ne", "val_calibration")
TSV_SUFFIXES = (".txt", ".tsv", ".txt.gz", ".tsv.gz", ".gz")


def _files(folder: str, suffixes: tuple[str, ...]) -> list[str]:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(suffixes))


def resolve_data(folder: str, work: str) -> tuple[str, str]:
    """The train and val Parquet folders of a data set folder, converting TSV splits first."""
    out = []
    for split in ("train", "val"):
        d = os.path.join(folder, split)
        if not os.path.isdir(d):
            raise ValueError(f"--data {folder}: expected a folder with train/ and val/ (no {split}/ there)")
        if _files(d, (".parquet",)):
            out.append(d)
            continue
        tsv = _files(d, TSV_SUFFIXES)
        if not tsv:
            raise ValueError(f"--data {folder}: {d} holds neither Parquet files nor Criteo TSV (*.txt, *.tsv, .gz)")
        target = os.path.join(work, "data", os.path.basename(os.path.normpath(folder)), split)
        if not os.path.isfile(os.path.join(target, "manifest.json")):
            cmd = [sys.executable, "-m", "deepfm_dist.prepare.criteo", "--input", *tsv, "--output", target,
                   "--quiet", "--overwrite"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise ValueError(f"--data {folder}: converting {d} failed: {done.stderr.strip().splitlines()[-1:]}")
        out.append(os.path.join(target, "all"))
    return out[0], out[1]


def stats(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for key in QUALITY:
        values = [r[key] for r in runs]
        out[key] = {"mean": statistics.fmean(values), "spread": max(values) - min(values), "n": len(values)}
    return out


def run_ours(train: str, val: str, seed: int, per_rank: int, epochs: int, nproc: int, run_dir: str,
             overrides: list[str]) -> dict[str, Any]:
    cmd = [os.path.join(ROOT, "launcher", "train.sh"), f"--data.train={train}", f"--data.val={val}",
           f"--train.seed={seed}", f"--train.batch_size={per_rank}", f"--train.epochs={epochs}",
           f"--run_dir={run_dir}", "--train.tensorboard=false", "--train.progress=false",
           "--checkpoint.at_end=false", "--checkpoint.best_metric=none", *overrides]
    env = {**os.environ, "NPROC": str(nproc)}
    t0 = time.perf_counter()
    s = compare.training_run("quality", cmd, run_dir, env, cwd=ROOT)
    return {**{k: s[k] for k in QUALITY}, "seconds": time.perf_counter() - t0, "run_dir": run_dir}


def _table(name: str, results: dict[str, Any]) -> str:
    lines = [f"### {name}", "",
             "| model | val AUC mean (spread) | per seed | logloss (spread) | NE (spread) | calibration (spread) |", "|---|---|---|---|---|---|"]
    for model, r in results["models"].items():
        s = r["summary"]
        per_seed = " / ".join(f"{x['val_auc']:.4f}" for x in r["runs"])
        lines.append(f"| {model} | {s['val_auc']['mean']:.4f} ({s['val_auc']['spread']:.4f}) | {per_seed} | "
                     f"{s['val_logloss']['mean']:.4f} ({s['val_logloss']['spread']:.4f}) | "
                     f"{s['val_ne']['mean']:.4f} ({s['val_ne']['spread']:.4f}) | "
                     f"{s['val_calibration']['mean']:.3f} ({s['val_calibration']['spread']:.3f}) |")
    lines.append("")
    for ref, d in results.get("ours_minus", {}).items():
        lines.append(f"- ours - {ref}: AUC {d['auc']:+.4f} (larger spread {d['noise']:.4f}), "
                     f"logloss {d['logloss']:+.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", action="append", required=True,
                        help="data set folder with train/ and val/ (Parquet or Criteo TSV; repeatable)")
    parser.add_argument("--seeds", default="0,1,2", help="seeds (default 0,1,2)")
    parser.add_argument("--nproc", type=int, default=int(os.environ.get("NPROC", "2")),
                        help="ranks of our runs (default NPROC, else 2)")
    parser.add_argument("--batch-size", type=int, default=0,
                        help="global batch of every model (default: our config's train.batch_size x ranks)")
    parser.add_argument("--epochs", type=int, default=0, help="epochs of every model (default: our config's)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"which of {','.join(MODELS)} (default all)")
    parser.add_argument("--lr-rate", type=float, default=0.05, help="the logistic regression's Adagrad rate")
    parser.add_argument("--out", help="JSON file (default runs/bench/quality_TIME.json)")
    parser.add_argument("--runs-dir", help="where our runs and converted data go (default runs/bench/quality_TIME/)")
    args, overrides = parser.parse_known_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in MODELS]
    if bad or not models:
        parser.error(f"--models {args.models!r}: expected some of {', '.join(MODELS)}")
    if "deepctr" in models and (why := references.deepctr_available()):
        parser.error(f"--models deepctr: {why}")
    try:
        cfg = load_config(overrides)
    except ConfigError as e:
        parser.error(str(e))
    global_batch = args.batch_size or cfg.train.batch_size * args.nproc
    if global_batch % args.nproc:
        parser.error(f"--batch-size {global_batch}: expected a multiple of the ranks ({args.nproc})")
    epochs = args.epochs or cfg.train.epochs
    stamp = time.strftime("%Y%m%d_%H%M%S")
    root = os.path.abspath(args.runs_dir or os.path.join("runs", "bench", f"quality_{stamp}"))
    results: dict[str, Any] = {"hardware": report.hardware(), "seeds": seeds, "nproc": args.nproc,
                               "global_batch": global_batch, "epochs": epochs, "overrides": overrides,
                               "lr_rate": args.lr_rate, "datasets": {}}
    tables = []
    for folder in args.data:
        try:
            train, val = resolve_data(folder, root)
        except ValueError as e:
            parser.error(str(e))
        name = os.path.basename(os.path.normpath(folder))
        data_cfg = load_config([*overrides, f"--data.train={train}", f"--data.val={val}"]).data
        rows = None
        per_model: dict[str, Any] = {}
        for model in models:
            runs = []
            for seed in seeds:
                if model == "ours":
                    r = run_ours(train, val, seed, global_batch // args.nproc, epochs, args.nproc,
                                 os.path.join(root, f"{name}_ours_s{seed}"), overrides)
                else:
                    if rows is None:
                        rows = (references.Rows([train], data_cfg), references.Rows([val], data_cfg))
                    t0 = time.perf_counter()
                    if model == "lr":
                        r = references.hashed_lr(*rows, data_cfg, seed, global_batch, epochs, args.lr_rate)
                    else:
                        r = references.deepctr_deepfm(*rows, data_cfg, seed, global_batch, epochs,
                                                      cfg.model.embedding_dim, cfg.model.mlp)
                    r["seconds"] = time.perf_counter() - t0
                runs.append({"seed": seed, **r})
                print(f"{name} {model} seed {seed}: AUC {r['val_auc']:.4f} logloss {r['val_logloss']:.4f} "
                      f"NE {r['val_ne']:.4f} calibration {r['val_calibration']:.3f} ({r['seconds']:.0f} s)", flush=True)
            per_model[model] = {"runs": runs, "summary": stats(runs)}
        result: dict[str, Any] = {"train": train, "val": val, "models": per_model}
        if "ours" in per_model:
            mine = per_model["ours"]["summary"]
            result["ours_minus"] = {
                ref: {"auc": mine["val_auc"]["mean"] - per_model[ref]["summary"]["val_auc"]["mean"],
                      "logloss": mine["val_logloss"]["mean"] - per_model[ref]["summary"]["val_logloss"]["mean"],
                      "noise": max(mine["val_auc"]["spread"], per_model[ref]["summary"]["val_auc"]["spread"])}
                for ref in per_model if ref != "ours"}
        results["datasets"][folder] = result
        tables.append(_table(f"{folder} (global batch {global_batch}, {epochs} epoch(s), {args.nproc} ranks for ours)",
                             result))
    print("\n\n".join(tables))
    out = args.out or os.path.join("runs", "bench", f"quality_{stamp}.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {out}")
    print(json.dumps({"mode": "quality", "out": out, "datasets": {
        d: {m: {f"{k[4:]}{suffix}": r["summary"][k][stat] for k in QUALITY
                for suffix, stat in (("", "mean"), ("_spread", "spread"))} for m, r in v["models"].items()}
        for d, v in results["datasets"].items()}}))
    return 0
