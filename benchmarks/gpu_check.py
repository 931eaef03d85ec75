"""GPU acceptance: the GPU path end to end in one command, PASS or FAIL per check.

    ./launcher/gpu_check.sh                     # on a machine with GPUs: every visible GPU
    ./launcher/gpu_check.sh --dry-run           # anywhere: lists every check and its commands,
                                                # verifies the install and every run's config,
                                                # starts nothing on a GPU
    WHEELHOUSE=/shared/wheels ./launcher/gpu_check.sh   # a node without network

Each check runs the user's own commands (``launcher/train.sh``, ``launcher/bench.sh``,
``deepfm-predict``, ``deepfm-export``) with the default preset, scaled down by steps only, so
what passes here is what users run. Results: ``OUT/gpu_check.json`` (one record per check:
status, seconds, detail, commands, figures) and a table at the end. Exit 0 when every check
passed (or, in a dry run, was verified), else 1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from deepfm_dist.config import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.environ.get("VENV", os.path.join(ROOT, ".venv"))
BIN = os.path.join(VENV, "bin")
STEPS = 60
"""Training steps of each short run: enough for a meaningful AUC on the synthetic set."""
AUC_FLOOR = 0.6
"""The default run must learn: the synthetic set's planted AUC is about 0.78."""
AUC_CLOSE = 5e-3
"""fp32, quantized comms and the plain loop must land this close to the default run's AUC."""
HALF = STEPS // 2
"""Where the resume checks stop and continue."""
THROUGHPUT_BATCHES = (8192, 65536)


class CheckFailed(Exception):
    """A check's verdict, with what was seen."""


@dataclass
class Cmd:
    """One command of a check. ``train_args``: the arguments to ``launcher/train.sh``, which a
    dry run validates with ``deepfm-train --check-config`` instead of running."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    train_args: list[str] | None = None
    timeout: float = 300

    def line(self) -> str:
        return " ".join([*(f"{k}={v}" for k, v in self.env.items()), *map(shlex.quote, self.argv)])


@dataclass
class Check:
    name: str
    what: str
    commands: Callable[[Ctx], list[Cmd]]
    verdict: Callable[[Ctx, list[str]], tuple[str, dict]]
    """(detail, figures) from the commands' outputs; raises CheckFailed."""


@dataclass
class Ctx:
    out: str
    gpus: int
    dry_run: bool

    def run_dir(self, name: str) -> str:
        return os.path.join(self.out, name)

    def summary(self, name: str) -> dict:
        path = os.path.join(self.run_dir(name), "summary.json")
        if not os.path.isfile(path):
            raise CheckFailed(f"no {path}")
        with open(path) as f:
            return json.load(f)


def train(ctx: Ctx, name: str, *args: str, nproc: int | None = None, steps: int = STEPS) -> Cmd:
    """``launcher/train.sh`` on the default preset, ``steps`` steps, into OUT/name."""
    full = [f"--run_dir={ctx.run_dir(name)}", f"--train.max_steps={steps}", "--train.progress=false", *args]
    return Cmd(["./launcher/train.sh", *full], {"NPROC": str(nproc or ctx.gpus)}, train_args=full, timeout=420)


def trained(ctx: Ctx, name: str, steps: int = STEPS) -> dict:
    s = ctx.summary(name)
    if s["steps"] != steps or not math.isfinite(s["val_auc"]):
        raise CheckFailed(f"{name}: {s['steps']} steps (expected {steps}), val AUC {s['val_auc']}")
    return s


def close_to_default(ctx: Ctx, name: str) -> tuple[str, dict]:
    base, s = trained(ctx, "default"), trained(ctx, name)
    diff = abs(s["val_auc"] - base["val_auc"])
    detail = f"val AUC {s['val_auc']:.4f} vs default {base['val_auc']:.4f} (|diff| {diff:.4f}, allowed {AUC_CLOSE})"
    if diff > AUC_CLOSE:
        raise CheckFailed(detail)
    return detail, {"val_auc": s["val_auc"], "default_val_auc": base["val_auc"],
                    "samples_per_s_per_rank": s["train_samples_per_s_per_rank"]}


# --------------------------------------------------------------------------- the checks


def environment(ctx: Ctx) -> dict:
    """Versions, CUDA and NCCL, the GPUs: what every other check runs on."""
    out = subprocess.run([os.path.join(BIN, "python"), "-c", ENV_PROBE], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise CheckFailed(f"the environment does not import: {out.stderr.strip()[-800:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


ENV_PROBE = """
import json, torch, torchrec, fbgemm_gpu, pyarrow
from importlib.metadata import version
info = {"python": __import__("platform").python_version(), "torch": torch.__version__,
        "torchrec": version("torchrec"), "pyarrow": pyarrow.__version__, "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "gpus": torch.cuda.device_count()}
for name in ("fbgemm-gpu", "fbgemm-gpu-cpu"):
    try:
        info["fbgemm"] = f"{name} {version(name)}"
    except Exception:
        pass
if torch.cuda.is_available():
    info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    info["devices"] = [f"{torch.cuda.get_device_name(i)} (sm_{''.join(map(str, torch.cuda.get_device_capability(i)))}, "
                       f"{torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB)" for i in range(torch.cuda.device_count())]
print(json.dumps(info))
"""


def env_verdict(ctx: Ctx, _outputs: list[str]) -> tuple[str, dict]:
    info = environment(ctx)
    line = (f"torch {info['torch']} (CUDA {info['cuda']}), torchrec {info['torchrec']}, {info.get('fbgemm')}, "
            f"NCCL {info.get('nccl')}, {info['gpus']} GPU(s): {', '.join(info.get('devices', []))}")
    if ctx.dry_run:
        return line, info
    if not info["cuda_available"] or not info["cuda"] or info["gpus"] < 1:
        raise CheckFailed(f"no usable CUDA: {line}")
    if not str(info.get("fbgemm", "")).startswith("fbgemm-gpu "):
        raise CheckFailed(f"the CPU build of FBGEMM is installed ({info.get('fbgemm')}): run FBGEMM_FLAVOR=gpu launcher/setup.sh")
    return line, info


def default_verdict(ctx: Ctx, _outputs) -> tuple[str, dict]:
    s = trained(ctx, "default")
    if s["device"] != "cuda" or s["world_size"] != ctx.gpus:
        raise CheckFailed(f"ran on {s['world_size']} x {s['device']}, expected {ctx.gpus} x cuda")
    if s["val_auc"] < AUC_FLOOR:
        raise CheckFailed(f"val AUC {s['val_auc']:.4f} < {AUC_FLOOR}: the model did not learn")
    return (f"{s['world_size']} x cuda, {s['steps']} steps, val AUC {s['val_auc']:.4f}, "
            f"{s['train_samples_per_s_per_rank']:,.0f} samples/s per GPU"), {
        "val_auc": s["val_auc"], "samples_per_s_per_rank": s["train_samples_per_s_per_rank"]}


def pipeline_verdict(ctx: Ctx, _outputs) -> tuple[str, dict]:
    detail, figures = close_to_default(ctx, "plain_loop")
    base = trained(ctx, "default")
    if not base["config"]["train"]["pipeline"]:
        raise CheckFailed("the default run did not use the pipeline (train.pipeline=false)")
    return f"pipelined (CUDA streams) vs plain loop: {detail}", figures


def precision_verdict(ctx: Ctx, _outputs) -> tuple[str, dict]:
    """The default run resolved train.precision=auto to bf16 on Ampere or later (fp32 before),
    and fp32 lands close to it."""
    import torch

    base, fp32 = trained(ctx, "default"), trained(ctx, "fp32")
    chosen = base["config"]["train"]["precision"]
    expected = "bf16" if torch.cuda.get_device_capability(0) >= (8, 0) else "fp32"
    if chosen != expected:
        raise CheckFailed(f"train.precision=auto chose {chosen!r} on {torch.cuda.get_device_name(0)}, "
                          f"expected {expected!r}")
    detail, figures = close_to_default(ctx, "fp32")
    speedup = base["train_samples_per_s_per_rank"] / fp32["train_samples_per_s_per_rank"]
    figures.update(default_precision=chosen, default_over_fp32_samples_per_s=speedup)
    return f"auto chose {chosen}; fp32 {detail}; default / fp32 samples/s {speedup:.2f}", figures


def adam_verdict(ctx: Ctx, _outputs) -> tuple[str, dict]:
    import torch

    from deepfm_dist import checkpoint as ckpt
    from deepfm_dist.export import consolidate

    trained(ctx, "adam_straight", 2 * HALF)
    trained(ctx, "adam_resumed", 2 * HALF)
    # the latest checkpoints: a folder would resolve to its best one, which may be step HALF
    a, _, _ = consolidate(ckpt.latest(os.path.join(ctx.run_dir("adam_straight"), "checkpoints")))
    b, _, _ = consolidate(ckpt.latest(os.path.join(ctx.run_dir("adam_resumed"), "checkpoints")))
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    if differ:
        raise CheckFailed(f"resumed != uninterrupted in {len(differ)} of {len(a)} tensors "
                          f"(first {differ[0]}; max |diff| {worst:.3g})")
    return f"optimizer.embedding=adam: resume at step {HALF} equals the uninterrupted run bitwise ({len(a)} tensors)", {}


def cpu_to_gpu_verdict(ctx: Ctx, _outputs) -> tuple[str, dict]:
    s = trained(ctx, "cpu_then_gpu", 2 * HALF)
    if s["device"] != "cuda":
        raise CheckFailed(f"the resumed run ran on {s['device']}")
    return f"written on {ctx.gpus} CPU rank(s) at step {HALF}, resumed on {ctx.gpus} GPU(s) to step {s['steps']}", {}


def uvm_hbm_gb(ctx: Ctx) -> float:
    """An HBM budget per GPU of about half the default tables' share (26 x 8.4 MiB over the
    GPUs): too small to hold them, large enough for their caches."""
    return round(0.14 / ctx.gpus, 4)


def uvm_verdict(ctx: Ctx, _outputs) -> tuple[str, dict]:
    with open(os.path.join(ctx.run_dir("uvm"), "plan.json")) as f:
        plan = json.load(f)
    cached = [t["name"] for t in plan["tables"] if t["kernel"] == "fused_uvm_caching"]
    if not cached:
        raise CheckFailed("the plan holds no fused_uvm_caching table")
    detail, figures = close_to_default(ctx, "uvm")
    return f"{len(cached)} of {len(plan['tables'])} tables UVM-cached; {detail}", figures


def predict_verdict(ctx: Ctx, _outputs) -> tuple[str, dict]:
    base = trained(ctx, "default")
    sharded = _predictions(ctx, "predict_sharded")
    plain = _predictions(ctx, "predict_exported")
    with open(os.path.join(ctx.run_dir("predict_sharded"), "_summary.json")) as f:
        summary = json.load(f)
    if summary["rows"] != base["val_rows"]:
        raise CheckFailed(f"deepfm-predict scored {summary['rows']} rows, the validation set has {base['val_rows']}")
    auc = summary.get("auc")
    if auc is None or abs(auc - base["val_auc"]) > 1e-4:
        raise CheckFailed(f"deepfm-predict AUC {auc} vs the run's val AUC {base['val_auc']:.6f}")
    diff = float(abs(sharded - plain).max())
    if diff > 1e-5:
        raise CheckFailed(f"the exported model's probabilities differ from the checkpoint's by {diff:.3g}")
    return (f"{summary['rows']:,} rows, AUC {auc:.4f} (= the run's); the exported model.pt scores the same "
            f"(max |diff| {diff:.2g})"), {"predict_auc": auc}


def _predictions(ctx: Ctx, name: str):
    import numpy as np
    import pyarrow.parquet as pq

    parts = sorted(p for p in os.listdir(ctx.run_dir(name)) if p.startswith("part-"))
    if not parts:
        raise CheckFailed(f"{ctx.run_dir(name)}: no part files")
    return np.concatenate([pq.read_table(os.path.join(ctx.run_dir(name), p), columns=["probability"])
                           .column(0).to_numpy() for p in parts])


def bench_verdict(ctx: Ctx, outputs: list[str]) -> tuple[str, dict]:
    figures, parts = {}, []
    for batch, text in zip(THROUGHPUT_BATCHES, outputs):
        last = [line for line in text.strip().splitlines() if line.startswith("{")]
        if not last:
            raise CheckFailed(f"batch {batch}: the benchmark printed no JSON line")
        rate = json.loads(last[-1])["samples_per_s_per_rank"]
        figures[f"samples_per_s_per_gpu_batch_{batch}"] = rate
        parts.append(f"batch {batch}: {rate:,.0f}")
    return "samples/s per GPU (default model, pre-built batches): " + ", ".join(parts), figures


def checks() -> list[Check]:
    bin_ = lambda name: os.path.join(BIN, name)  # noqa: E731
    torchrun = lambda ctx: [bin_("torchrun"), "--standalone", f"--nproc-per-node={ctx.gpus}"]  # noqa: E731
    return [
        Check("environment", "versions, CUDA, NCCL, the GPUs", lambda ctx: [], env_verdict),
        Check("default_run", "the default preset on every visible GPU (the pipeline, train.precision auto)",
              lambda ctx: [train(ctx, "default")], default_verdict),
        Check("pipeline", "TrainPipelineSparseDist on CUDA streams against the plain loop",
              lambda ctx: [train(ctx, "plain_loop", "--train.pipeline=false")], pipeline_verdict),
        Check("precision", "train.precision: the default (auto: bf16 on Ampere and later) against fp32",
              lambda ctx: [train(ctx, "fp32", "--train.precision=fp32")], precision_verdict),
        Check("comm_fp16", "sharding.comm_precision=fp16 (quantized all-to-alls)",
              lambda ctx: [train(ctx, "comm_fp16", "--sharding.comm_precision=fp16")],
              lambda ctx, o: close_to_default(ctx, "comm_fp16")),
        Check("comm_bf16", "sharding.comm_precision=bf16 (quantized all-to-alls)",
              lambda ctx: [train(ctx, "comm_bf16", "--sharding.comm_precision=bf16")],
              lambda ctx, o: close_to_default(ctx, "comm_bf16")),
        Check("adam_resume", "GPU Adam: a resume equals the uninterrupted run bitwise",
              lambda ctx: [train(ctx, "adam_straight", "--optimizer.embedding=adam", steps=2 * HALF),
                           train(ctx, "adam_resumed", "--optimizer.embedding=adam", steps=HALF),
                           train(ctx, "adam_resumed", "--optimizer.embedding=adam", "--resume", steps=2 * HALF)],
              adam_verdict),
        Check("cpu_checkpoint_on_gpu", "a checkpoint written on CPU ranks resumes on the GPUs",
              lambda ctx: [train(ctx, "cpu_then_gpu", "--train.device=cpu", steps=HALF),
                           train(ctx, "cpu_then_gpu", "--resume", steps=2 * HALF)],
              cpu_to_gpu_verdict),
        Check("uvm_caching", "sharding.allow_uvm_caching: tables in host memory with an HBM cache (planned with "
              "a sharding.hbm_gb the default tables outgrow)",
              lambda ctx: [train(ctx, "uvm", "--sharding.allow_uvm_caching=true", f"--sharding.hbm_gb={uvm_hbm_gb(ctx)}")],
              uvm_verdict),
        Check("predict_export", "deepfm-predict on the GPUs, deepfm-export, the exported model scores the same",
              lambda ctx: [
                  Cmd([*torchrun(ctx), "-m", "deepfm_dist.predict", "--model", os.path.join(ctx.run_dir("default"), "checkpoints"),
                       "--data", "data/generated/synthetic/val", "--out", ctx.run_dir("predict_sharded"), "--overwrite"]),
                  Cmd([bin_("deepfm-export"), os.path.join(ctx.run_dir("default"), "checkpoints"),
                       "--out", os.path.join(ctx.out, "model.pt"), "--overwrite"]),
                  Cmd([bin_("deepfm-predict"), "--model", os.path.join(ctx.out, "model.pt"),
                       "--data", "data/generated/synthetic/val", "--out", ctx.run_dir("predict_exported"), "--overwrite"]),
              ], predict_verdict),
        Check("throughput", "samples/s per GPU, default model, batch 8192 and 65536 per GPU",
              lambda ctx: [Cmd(["./launcher/bench.sh", "step", f"--train.batch_size={b}", "--steps=50", "--warmup=10",
                                f"--out={os.path.join(ctx.out, f'step_batch{b}.json')}"], {"NPROC": str(ctx.gpus)})
                           for b in THROUGHPUT_BATCHES],
              bench_verdict),
    ]


# --------------------------------------------------------------------------- running


def run_check(ctx: Ctx, check: Check) -> dict[str, Any]:
    t0 = time.perf_counter()
    cmds = check.commands(ctx)
    record: dict[str, Any] = {"check": check.name, "what": check.what, "commands": [c.line() for c in cmds]}
    outputs = []
    try:
        for cmd in cmds:
            if ctx.dry_run:
                if cmd.train_args is not None:  # the run's config, validated as train.sh's --check-config does
                    try:
                        load_config(cmd.train_args)
                    except ConfigError as e:
                        raise CheckFailed(f"config refused: {cmd.line()}: {e}") from None
                continue
            log = os.path.join(ctx.out, "logs", f"{check.name}.log")
            os.makedirs(os.path.dirname(log), exist_ok=True)
            try:
                done = subprocess.run(cmd.argv, cwd=ROOT, env={**os.environ, **cmd.env}, capture_output=True,
                                      text=True, timeout=cmd.timeout)
            except subprocess.TimeoutExpired:
                raise CheckFailed(f"timed out after {cmd.timeout:.0f} s: {cmd.line()}") from None
            with open(log, "a") as f:
                f.write(f"$ {cmd.line()}\n{done.stdout}{done.stderr}\n")
            outputs.append(done.stdout)
            if done.returncode != 0:
                tail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-6:]
                raise CheckFailed(f"exit {done.returncode}: {cmd.line()}: " + " | ".join(tail) + f" (log: {log})")
        if ctx.dry_run and check.name != "environment":
            record.update(status="VERIFIED", detail=f"{len(cmds)} command(s), configs valid; not run (dry run)")
        else:
            detail, figures = check.verdict(ctx, outputs)
            record.update(status="VERIFIED" if ctx.dry_run else "PASS", detail=detail, figures=figures)
    except CheckFailed as e:
        record.update(status="FAIL", detail=str(e))
    except Exception as e:  # a check's own bug must not hide the other checks' verdicts
        record.update(status="FAIL", detail=f"{type(e).__name__}: {e}")
    record["seconds"] = round(time.perf_counter() - t0, 1)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="list and verify every check; start nothing on a GPU")
    parser.add_argument("--out", default=os.path.join("runs", "gpu_check"), help="run directories, logs and gpu_check.json")
    parser.add_argument("--only", default="", help="comma-separated check names (default: all)")
    args = parser.parse_args(argv)
    all_checks = checks()
    names = [c.name for c in all_checks]
    only = [n for n in args.only.split(",") if n]
    unknown = [n for n in only if n not in names]
    if unknown:
        parser.error(f"--only: unknown check(s) {', '.join(unknown)}; expected some of {', '.join(names)}")
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    info = {}
    try:
        info = environment(Ctx(out, 0, True))
    except CheckFailed as e:
        print(f"gpu_check: {e}", file=sys.stderr)
    ctx = Ctx(out, max(1, int(info.get("gpus", 0) or 0)), args.dry_run)
    results = []
    for check in all_checks:
        if only and check.name not in only and check.name != "environment":
            continue
        print(f"gpu_check: {check.name}: {check.what} ...", flush=True)
        if args.dry_run:
            for line in (c.line() for c in check.commands(ctx)):
                print(f"    $ {line}", flush=True)
        result = run_check(ctx, check)
        results.append(result)
        print(f"gpu_check: {check.name}: {result['status']} ({result['seconds']} s): {result['detail']}", flush=True)
    ok = all(r["status"] in ("PASS", "VERIFIED") for r in results)
    report = {"dry_run": args.dry_run, "passed": ok, "environment": info, "gpus": ctx.gpus,
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "checks": results}
    path = os.path.join(out, "gpu_check.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    width = max(len(r["check"]) for r in results)
    print("\n" + "\n".join(f"{r['check']:<{width}}  {r['status']:<8}  {r['seconds']:>6.1f} s  {r['detail']}" for r in results))
    print(f"\ngpu_check: {'PASSED' if ok else 'FAILED'}{' (dry run)' if args.dry_run else ''}; results in {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
