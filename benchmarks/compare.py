"""All throughput benchmarks in one invocation, and the ratios the project's targets are stated in.

    python -m benchmarks compare [--nproc N] [--repeats R] [--no-memory]
        [--section.key=value ...]

Runs, one after the other, each in its own process(es): ``ceiling`` (MLP alone, one process,
every core, with the dense fields folded into the first layer as DeepFM runs it; and
``ceiling_unfolded``, the literal F*D-wide MLP, for information), ``baseline`` (plain PyTorch DeepFM, one process, every core, at the distributed
run's global batch), ``step`` on 1 rank x 1 thread (CPU; one GPU when present) and on N ranks
(default: 2 on CPU, every GPU), ``e2e`` on N ranks, and ``step --tables kaggle`` on N ranks
(the memory target). Config overrides go to every mode (e.g. ``--model.linear_kernel=torch``
measures the MKL Linear layers). Every run inherits the malloc settings of ``launcher/common.sh`` (run it
through ``launcher/bench.sh``), and the one-process runs bind their OpenMP threads to cores,
the counterpart of ``train.pin_cpus`` for the ranks. Each measurement records how much CPU other processes used meanwhile
(``other_load_cores``); one above ``--max-other-load`` is repeated (up to ``--retries``
times) and the least disturbed attempt is kept. With ``--repeats R`` the whole sequence runs R
times and each mode keeps its best run (others' load only ever slows a run down).

Ratios and targets (issue 7):
  * e2e / ceiling >= 0.80
  * e2e / baseline >= 2.0
  * step per-core throughput, N ranks vs 1 rank >= 0.90 (CPU: samples/s / cores used)
  * memory: each rank's peak RSS <= 1.25 x (its table shards + optimizer state) + 1.5 GiB
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

import torch

from benchmarks import report

TARGETS = {
    "e2e_vs_ceiling": 0.80,
    "e2e_vs_baseline": 2.0,
    "step_per_core_scaling": 0.90,
}


def _last_json(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict) and "mode" in obj:
                return obj
    return None


def command(mode: str, nproc: int, args: list[str]) -> list[str]:
    """``python -m benchmarks MODE`` for one process, torchrun for more."""
    if nproc <= 1:
        return [sys.executable, "-m", "benchmarks", mode, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
            f"--nproc_per_node={nproc}", "--local-ranks-filter=0", "-m", "benchmarks", mode, *args]


def _logged_result(log: str, cmd: list[str], stdout: str, stderr: str) -> dict[str, Any] | None:
    """Write a run's command and output to ``log``; its final JSON object, if it printed one."""
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n" + stdout + "\n--- stderr ---\n" + stderr)
    return _last_json(stdout)


def training_run(bench: str, cmd: list[str], run_dir: str, env: dict[str, str], cwd: str | None = None) -> dict:
    """One whole training run (its command and output in ``run_dir``/bench.log): its summary.json.
    A failed run stops the benchmark, naming the run and the output's last lines."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)
    os.makedirs(run_dir, exist_ok=True)
    _logged_result(os.path.join(run_dir, "bench.log"), cmd, proc.stdout, proc.stderr)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-30:])
        raise SystemExit(f"bench {bench}: {run_dir} failed (exit {proc.returncode}):\n{tail}")
    with open(os.path.join(run_dir, "summary.json")) as f:
        return json.load(f)


def run_once(name: str, cmd: list[str], env: dict[str, str], log_dir: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    for attempt in range(2):  # one more try if the run failed to start (e.g. a port taken meanwhile)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        log = os.path.join(log_dir, f"{name}.log" if attempt == 0 else f"{name}.again.log")
        result = _logged_result(log, cmd, proc.stdout, proc.stderr)
        if proc.returncode == 0 and result is not None:
            break
    else:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-30:])
        raise RuntimeError(f"bench compare: {name} failed (exit {proc.returncode}); log {log}:\n{tail}")
    result["seconds_total"] = time.perf_counter() - t0
    result["log"] = log
    result["command"] = " ".join(f"{k}={v}" for k, v in env.items() if k in _SHOWN_ENV) + " " + " ".join(cmd)
    return result


def run_concurrent(name: str, cmd: list[str], copies: int, cores_each: int, env: dict[str, str], log_dir: str,
                   ) -> dict[str, Any]:
    """``copies`` independent one-rank runs of ``cmd`` at the same time, copy i on cores
    [i * cores_each, (i + 1) * cores_each): the step with no communication at all, under the
    contention the distributed run also has (shared caches, memory bandwidth, clocks)."""
    procs = []
    for i in range(copies):
        cores = set(range(i * cores_each, (i + 1) * cores_each))
        copy_cmd = list(cmd)
        if "--out" in copy_cmd:  # one JSON file per copy
            j = copy_cmd.index("--out") + 1
            copy_cmd[j] = copy_cmd[j].replace(".json", f"_{i}.json")
        procs.append(subprocess.Popen(copy_cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                      preexec_fn=lambda c=cores: os.sched_setaffinity(0, c)))
    results = []
    for i, proc in enumerate(procs):
        stdout, stderr = proc.communicate()
        log = os.path.join(log_dir, f"{name}_{i}.log")
        result = _logged_result(log, proc.args, stdout, stderr)
        if proc.returncode != 0 or result is None:
            raise RuntimeError(f"bench compare: {name} copy {i} failed (exit {proc.returncode}); log {log}")
        results.append(result)
    rates = [r["samples_per_s"] for r in results]
    # Each copy counts the others' CPU as "other load": subtract theirs (copies - 1 cores' worth).
    other = max(0.0, min(r.get("other_load_cores", 0.0) for r in results) - (copies - 1) * cores_each)
    print(f"  {name:<22} {sum(rates):>10,.0f} samples/s  ({copies} independent 1-rank runs at once: "
          f"{', '.join(f'{x:,.0f}' for x in rates)}; others used {other:.2f} cores meanwhile)", flush=True)
    return {"mode": "step", "world_size": 1, "copies": copies, "threads_per_rank": cores_each,
            "samples_per_s": sum(rates), "samples_per_s_per_rank": sum(rates) / copies,
            "step_ms_p50": max(r["step_ms_p50"] for r in results), "step_ms_p90": max(r["step_ms_p90"] for r in results),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
            "peak_rss_mb_per_rank": [r["peak_rss_mb"] for r in results], "other_load_cores": other,
            "copies_samples_per_s": rates, "command": f"{copies} x (" + " ".join(cmd) + ") on their own cores"}


MALLOC_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
"""Set by ``launcher/common.sh``, the one place for them; shown in the report."""
OMP_BIND_ENV = {"OMP_PROC_BIND": "close", "OMP_PLACES": "cores"}
_SHOWN_ENV = ("OMP_NUM_THREADS", "OMP_PROC_BIND", "OMP_PLACES", *MALLOC_VARS)


def measure(name: str, cmd: list[str], env: dict[str, str], log_dir: str, retries: int, max_other: float,
            ) -> dict[str, Any]:
    """Run; repeat while other processes disturbed it; keep the least disturbed attempt."""
    attempts = []
    for attempt in range(retries + 1):
        result = run_once(name if attempt == 0 else f"{name}.retry{attempt}", cmd, env, log_dir)
        attempts.append(result)
        other = result.get("other_load_cores", 0.0)
        print(f"  {name:<22} {result['samples_per_s']:>10,.0f} samples/s  (other processes used "
              f"{other:.2f} cores meanwhile{'; repeating' if other > max_other and attempt < retries else ''})",
              flush=True)
        if other <= max_other:
            break
        time.sleep(5)
    best = min(attempts, key=lambda r: r.get("other_load_cores", 0.0))
    best["attempts"] = [round(a["samples_per_s"]) for a in attempts]
    return best


def ratios(results: dict[str, dict[str, Any]], nproc: int, cores_1: int, cores_n: int) -> dict[str, Any]:
    """The target ratios from the runs' final JSON objects (pure; unit-tested)."""
    out: dict[str, Any] = {}
    e2e, ceiling, baseline = results.get("e2e"), results.get("ceiling"), results.get("baseline")
    step1, stepn = results.get("step_1"), results.get(f"step_{nproc}")
    if e2e and ceiling:
        out["e2e_vs_ceiling"] = e2e["samples_per_s"] / ceiling["samples_per_s"]
    if e2e and baseline:
        out["e2e_vs_baseline"] = e2e["samples_per_s"] / baseline["samples_per_s"]
    if stepn and ceiling:
        out["step_vs_ceiling"] = stepn["samples_per_s"] / ceiling["samples_per_s"]
    ours = results.get("baseline_ours")
    if e2e and ours:
        out["e2e_vs_baseline_with_our_kernels"] = e2e["samples_per_s"] / ours["samples_per_s"]
    unfolded = results.get("ceiling_unfolded")
    if e2e and unfolded:
        out["e2e_vs_ceiling_unfolded"] = e2e["samples_per_s"] / unfolded["samples_per_s"]
    if e2e and stepn:
        out["e2e_vs_step"] = e2e["samples_per_s"] / stepn["samples_per_s"]
    if step1 and stepn:
        out["step_per_core_scaling"] = (stepn["samples_per_s"] / cores_n) / (step1["samples_per_s"] / cores_1)
    concurrent = results.get("step_1_at_once")
    if step1 and concurrent:
        # What scaling would be with free communication: N copies of the 1-rank step at once.
        out["scaling_without_communication"] = concurrent["samples_per_s_per_rank"] / step1["samples_per_s"]
    waits = (stepn or {}).get("peer_wait_ms_per_step_per_rank")
    if waits and stepn.get("batch_size_per_rank"):
        # How much of the N-rank step is ranks blocked on each other in the collectives.
        step_ms = stepn["batch_size_per_rank"] / stepn["samples_per_s_per_rank"] * 1e3
        out["step_peer_wait_ms_per_step"] = sum(waits) / len(waits)
        out["step_peer_wait_share"] = out["step_peer_wait_ms_per_step"] / step_ms
    memory = results.get("memory")
    if memory:
        peaks, bounds = memory["peak_rss_mb_per_rank"], memory["rss_bound_mb_per_rank"]
        out["memory_peak_rss_mb_per_rank"] = peaks
        out["memory_bound_mb_per_rank"] = bounds
        out["memory_within_bound"] = all(p <= b for p, b in zip(peaks, bounds))
    return out


def targets_table(r: dict[str, Any]) -> tuple[str, dict[str, bool]]:
    met: dict[str, bool] = {}
    lines = [f"{'target':<52} {'measured':>10} {'goal':>8}  met"]
    labels = {
        "e2e_vs_ceiling": "e2e / ceiling",
        "e2e_vs_baseline": "e2e / plain PyTorch baseline",
        "step_per_core_scaling": "step per-core throughput, N ranks / 1 rank",
    }
    for key, goal in TARGETS.items():
        if key in r:
            met[key] = r[key] >= goal
            lines.append(f"{labels[key]:<52} {r[key]:>10.2f} {'>= ' + str(goal):>8}  {'yes' if met[key] else 'NO'}")
    if "memory_within_bound" in r:
        met["memory"] = r["memory_within_bound"]
        for i, (p, b) in enumerate(zip(r["memory_peak_rss_mb_per_rank"], r["memory_bound_mb_per_rank"])):
            lines.append(f"{f'memory, kaggle tables: rank {i} peak RSS / bound (MB)':<52} {p:>10,.0f} "
                         f"{'<= ' + format(b, ',.0f'):>8}  {'yes' if p <= b else 'NO'}")
    for key, label in (("step_vs_ceiling", "(info) step / ceiling"), ("e2e_vs_step", "(info) e2e / step"),
                       ("e2e_vs_ceiling_unfolded", "(info) e2e / ceiling of the unfolded F*D-wide MLP"),
                       ("e2e_vs_baseline_with_our_kernels", "(info) e2e / baseline with our kernels"),
                       ("scaling_without_communication",
                        "(info) scaling with no communication (step_1_at_once)"),
                       ("step_peer_wait_share", "(info) share of the N-rank step spent waiting for peers")):
        if key in r:
            lines.append(f"{label:<52} {r[key]:>10.2f}")
    if "step_peer_wait_ms_per_step" in r:
        lines.append(f"{'(info) N-rank step: ms/step waiting for peers':<52} {r['step_peer_wait_ms_per_step']:>10.2f}")
    return "\n".join(lines), met


def runs_table(results: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'run':<16} {'ranks':>5} {'thr':>4} {'samples/s':>10} {'per rank':>9} {'ms p50':>7} {'p90':>7} "
             f"{'wait ms':>8} {'peak RSS MB/rank':>18} {'other load':>10}"]
    for name, r in results.items():
        threads = r.get("threads_per_rank") or r.get("threads") or ""
        rss = "/".join(f"{x:,.0f}" for x in r.get("peak_rss_mb_per_rank", [r["peak_rss_mb"]]))
        lines.append(f"{name:<16} {r['world_size']:>5} {threads:>4} {r['samples_per_s']:>10,.0f} "
                     f"{r.get('samples_per_s_per_rank', r['samples_per_s']):>9,.0f} {r['step_ms_p50']:>7.1f} "
                     f"{r['step_ms_p90']:>7.1f} {r.get('data_wait_ms_per_step', 0):>8.2f} {rss:>18} "
                     f"{r.get('other_load_cores', 0):>10.2f}")
    return "\n".join(lines)


def _run_config(overrides: list[str]):
    """The Config every run will use (the config overrides among compare's arguments)."""
    from deepfm_dist.config import load_config

    return load_config([o for o in overrides if o.startswith("--") and "." in o.split("=")[0]])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=0, help="ranks of the distributed runs (default: GPUs, else 2)")
    parser.add_argument("--repeats", type=int, default=1, help="run the whole sequence R times; best run per mode")
    parser.add_argument("--retries", type=int, default=2, help="repeats of a disturbed measurement (default 2)")
    parser.add_argument("--max-other-load", type=float, default=0.25,
                        help="cores' worth of other processes' CPU that counts as disturbed (default 0.25)")
    parser.add_argument("--no-memory", action="store_true", help="skip the Kaggle-sized memory run")
    parser.add_argument("--quick", action="store_true", help="few steps (a smoke test, not a measurement)")
    parser.add_argument("--out", help="JSON file to write (default runs/bench/compare_TIME.json)")
    args, overrides = parser.parse_known_args(argv)
    gpus = torch.cuda.device_count()
    cores = os.cpu_count() or 1
    nproc = args.nproc or gpus or 2
    cpu_threads_n = max(1, cores // nproc)
    log_dir = os.path.join(report.DEFAULT_OUT_DIR, f"compare_{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(log_dir, exist_ok=True)
    steps = (["--warmup", "2", "--steps", "3"] if args.quick else [])
    base_env = dict(os.environ)
    if not all(v in base_env for v in MALLOC_VARS):
        print("bench compare: the malloc settings of launcher/common.sh are not set; run ./launcher/bench.sh compare "
              "to measure what the launchers run", file=sys.stderr)
    run_cfg = _run_config(overrides)
    one_process_env = dict(base_env, **(OMP_BIND_ENV if run_cfg.train.pin_cpus else {}))
    per_rank_batch = run_cfg.train.batch_size

    # name -> (mode, ranks, threads per rank, extra args)
    plan: list[tuple[str, str, int, int, list[str]]] = [
        ("ceiling", "ceiling", 1, cores, []),
        # For information: the literal F*D-wide MLP, dense fields not folded into the first layer.
        ("ceiling_unfolded", "ceiling", 1, cores, ["--no-fold"]),
        # Plain PyTorch at the distributed run's global batch (the same samples per update;
        # faster per sample than its per-rank batch, so the ratio is not flattered).
        ("baseline", "baseline", 1, cores, ["--batch-size", str(per_rank_batch * nproc)]),
        # For information: the same plain model with our Linear and FM kernels.
        ("baseline_ours", "baseline", 1, cores, ["--batch-size", str(per_rank_batch * nproc), "--kernels", "ours"]),
        ("step_1", "step", 1, 1 if not gpus else cores, [] if gpus else ["--train.threads=1"]),
        (f"step_{nproc}", "step", nproc, cpu_threads_n, []),
        # CPU: the scaling loss that is not communication (see run_concurrent).
        *([("step_1_at_once", "step", 1, cpu_threads_n, [f"--train.threads={cpu_threads_n}",
                                                             "--train.pin_cpus=false"])] if not gpus else []),
        ("e2e", "e2e", nproc, cpu_threads_n, []),
    ]
    if not args.no_memory:
        plan.append(("memory", "step", nproc, cpu_threads_n,
                     ["--tables", "kaggle", "--warmup", "3", "--steps", "10"]))
    print(f"bench compare: {nproc} ranks for the distributed runs, {cores} cores, {gpus} GPUs; logs in {log_dir}",
          flush=True)
    results: dict[str, dict[str, Any]] = {}
    for r in range(args.repeats):
        if args.repeats > 1:
            print(f"round {r + 1}/{args.repeats}", flush=True)
        for name, mode, ranks, threads, extra in plan:
            mode_steps = steps if args.quick else []
            if name == "memory" and args.quick:
                extra = ["--tables", "kaggle"]
            cmd = command(mode, ranks, [*extra, *mode_steps, "--out", os.path.join(log_dir, f"{name}_r{r}.json"),
                                        *overrides])
            env = dict(one_process_env if ranks == 1 else base_env, OMP_NUM_THREADS=str(threads))
            label = f"{name}_r{r}" if args.repeats > 1 else name
            if name == "step_1_at_once":
                res = run_concurrent(label, cmd, nproc, threads, dict(base_env, OMP_NUM_THREADS=str(threads)), log_dir)
            else:
                res = measure(label, cmd, env, log_dir, args.retries, args.max_other_load)
            if name not in results or res["samples_per_s"] > results[name]["samples_per_s"]:
                results[name] = res

    cores_1 = 1 if not gpus else 1
    cores_n = nproc if not gpus else nproc
    rat = ratios(results, nproc, cores_1, cores_n)
    table, met = targets_table(rat)
    hw, ver, commit = report.hardware(), report.versions(), report.git_commit()
    print()
    print(f"hardware   {report.hardware_line(hw)}")
    print(f"versions   {', '.join(f'{k} {v}' for k, v in ver.items())}")
    print(f"commit     {commit}")
    print(f"overrides  {' '.join(overrides) or '(none: the embedded default config)'}")
    print()
    print(runs_table(results))
    print()
    print(table)
    path = args.out or os.path.join(log_dir, "compare.json")
    record = {"mode": "compare", "world_size": nproc, "hardware": hw, "versions": ver, "commit": commit,
              "overrides": overrides, "results": results, "ratios": rat, "targets_met": met,
              "command": " ".join(sys.argv)}
    with open(path, "w") as f:
        json.dump(record, f, indent=1, default=str)
    print(f"json: {path}")
    e2e = results.get("e2e", {})
    print(json.dumps({
        "mode": "compare", "world_size": nproc,
        "samples_per_s": round(e2e.get("samples_per_s", 0.0), 1),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in results.values()),
        **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in rat.items()},
        "targets_met": met, "commit": commit, "json": path,
    }), flush=True)
    return 0
