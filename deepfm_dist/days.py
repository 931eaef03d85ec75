"""Day-by-day training with progressive validation, on day-partitioned data.

    deepfm-days --days 0-22 --day-glob 'data/criteo_tb/train/*-day_{day}.*.parquet' \\
        --run-dir runs/days -- --config criteo_1tb
    ./launcher/days.sh --days 0-2 --day-glob 'data/days/day_{day}/*.parquet' --run-dir runs/days

For each day k but the last: train on day k, starting from day k-1's model (``--init_from``:
its weights, a new run and schedule), then evaluate on day k+1, which the model has not seen:
the production pattern of retraining on each new day, scored on the next. Each day is an
ordinary run (``RUN_DIR/day_K``: its summary, checkpoints, plan) started with the launcher, so
every rank and GPU setting of ``launcher/train.sh`` applies (``NPROC``, ``CONFIG`` ...). The
days' validation AUC, logloss, NE and calibration are collected in ``RUN_DIR/days.json`` and a
table. Arguments after ``--`` go to every day's run. A day that already finished (its
``summary.json`` exists) is not trained again, so a stopped loop continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

from deepfm_dist.cli import split_run_args
from deepfm_dist.fsutil import finished_run_summary, write_json_atomic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_days(spec: str) -> list[int]:
    """``0-22`` or ``0,1,5``: at least two days (the last one is only evaluated on)."""
    days: list[int] = []
    for part in spec.split(","):
        lo, sep, hi = part.partition("-")
        if not lo.strip().isdigit() or (sep and not hi.strip().isdigit()):
            raise ValueError(f"--days {spec!r}: expected A-B or A,B,C (day numbers)")
        days.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    if len(days) < 2:
        raise ValueError(f"--days {spec!r}: at least two days (train on one, evaluate on the next)")
    return days


def main(argv: list[str] | None = None) -> int:
    argv, extra = split_run_args(argv)
    p = argparse.ArgumentParser(prog="deepfm-days", description=__doc__.split("\n\n")[0])
    p.add_argument("--days", required=True, help="day numbers, A-B or A,B,C (two at least)")
    p.add_argument("--day-glob", required=True, metavar="TEMPLATE",
                   help="the Parquet files of one day, with {day} for its number")
    p.add_argument("--run-dir", required=True, help="one run per day in RUN_DIR/day_K, and days.json")
    p.add_argument("--launcher", default=os.path.join(ROOT, "launcher", "train.sh"),
                   help="the command that trains one day (default: launcher/train.sh)")
    args = p.parse_args(argv)
    try:
        days = parse_days(args.days)
    except ValueError as e:
        p.error(str(e))
    if "{day}" not in args.day_glob:
        p.error(f"--day-glob {args.day_glob!r}: needs {{day}} where the day number goes")
    for bad in ("--data.train", "--data.val", "--run_dir", "--init_from", "--resume"):
        if any(a.split("=")[0] == bad for a in extra):
            p.error(f"{bad} is set per day by deepfm-days; leave it out of the run arguments")
    os.makedirs(args.run_dir, exist_ok=True)
    rows = []
    previous = None
    for k, day in enumerate(days[:-1]):
        run = os.path.join(args.run_dir, f"day_{day}")
        nxt = days[k + 1]
        summary_path = os.path.join(run, "summary.json")
        if finished_run_summary(run) is None:
            cmd = [args.launcher, f"--data.train={args.day_glob.format(day=day)}",
                   f"--data.val={args.day_glob.format(day=nxt)}", f"--run_dir={run}", "--resume", *extra]
            if previous is not None:
                cmd.append(f"--init_from={os.path.join(previous, 'checkpoints')}")
            print(f"deepfm-days: day {day}: train, then evaluate on day {nxt}"
                  + (f", from day {days[k - 1]}'s model" if previous else ""), flush=True)
            done = subprocess.run(cmd, cwd=ROOT)
            if done.returncode != 0:
                print(f"deepfm-days: day {day} failed (exit {done.returncode}); rerun the same command to "
                      f"continue from it", file=sys.stderr)
                return done.returncode
        with open(summary_path) as f:
            s = json.load(f)
        rows.append({"day": day, "eval_day": nxt, "run_dir": run, "steps": s["steps"], "val_rows": s["val_rows"],
                     "val_auc": s["val_auc"], "val_logloss": s["val_logloss"], "val_ne": s.get("val_ne"),
                     "val_calibration": s.get("val_calibration")})
        previous = run
    write_json_atomic(os.path.join(args.run_dir, "days.json"), {"days": rows})
    print(f"{'day':>4} {'eval on':>7} {'AUC':>7} {'logloss':>8} {'NE':>7} {'calibration':>11}")
    for r in rows:
        v = {k: math.nan if r[k] is None else r[k] for k in ("val_auc", "val_logloss", "val_ne", "val_calibration")}
        print(f"{r['day']:>4} {r['eval_day']:>7} {v['val_auc']:>7.4f} {v['val_logloss']:>8.4f} "
              f"{v['val_ne']:>7.4f} {v['val_calibration']:>11.3f}")  # null (undefined) prints as nan
    print(f"deepfm-days: {os.path.join(args.run_dir, 'days.json')}")
    return 0


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
