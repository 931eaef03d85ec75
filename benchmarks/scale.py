"""The whole pipeline at the size users bring: ``./launcher/bench.sh scale --scale S``.

Runs, in order, what a user runs, each stage as its own command through the console scripts and
launchers (so every process is the one a user would start):

1. ``generate``: ``deepfm-gen-criteo --like criteo-kaggle --scale S`` (raw TSV, planted labels);
2. ``prepare``: ``prepare-criteo --split kaggle --vocab-threshold 10``;
3. ``train-hash``: ``launcher/train.sh --config criteo_kaggle``, one epoch on NPROC ranks, ids
   hashed into the preset's full tables (33.8M rows), validated at the end;
4. ``train-vocab``: the same with ``--data.vocab`` (tables sized by the vocabulary);
5. ``resume``: ``--resume`` of run 3 for ``--resume-steps`` more steps;
6. ``predict``: ``deepfm-predict`` on the test split, NPROC ranks (torchrun);
7. ``export``: ``deepfm-export`` of run 3;
8. ``throughput``: ``--throughput-steps`` steps with the default tables (26 x 100k rows), then the
   same with the Kaggle tables, back to back on the same data: the samples/s ratio.

Per stage: wall time, rows/s, the peak RSS of every process of the stage (read from each
process's ``VmHWM`` while it runs: ranks, loader and converter workers, torchrun's agent), the
bytes it wrote, and for training the planner's per-rank estimate (``plan.json``) beside each
rank's peak. Prints a table, then one JSON line:
``{"mode": "scale", "scale": S, "rows": N, "stages": [...], "val_auc": ..., "oracle_auc": ...,
"memory_within_plan": ..., "ok": ...}``. A rank is within plan when its peak RSS is at most
``PLAN_FACTOR`` x the plan's bytes for that rank + ``PLAN_SLACK_MB``.

Standard library only (the stages import torch, this process does not).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.sysinfo import cpu_name, git_commit
from deepfm_dist import cli

PLAN_FACTOR = 1.25
PLAN_SLACK_MB = 1536
POLL_SECONDS = 0.25
DEFAULT_TABLE_ROWS = 100_000
"""The default run's rows per table (``data.num_embeddings``), for the throughput stage."""
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class ScaleOptions:
    scale: float = 0.01
    """Fraction of the real data set's rows and distinct values (1.0: all of Criteo Kaggle)."""
    like: str = field(default="criteo-kaggle", metadata={"choices": ("criteo-kaggle", "criteo-1tb-day")})
    """The shape to rehearse. criteo-1tb-day (one Terabyte day, day_0) runs generate and prepare
    only (--split terabyte, --vocab-partitions): the converter and vocabulary at a day's size."""
    vocab_partitions: int = 1
    """prepare-criteo --vocab-partitions (each column counted in this many passes)."""
    dir: str = ""
    """Work folder (default: runs/scale/LIKE_S); the generated and prepared data are kept and reused."""
    nproc: int = 2
    """Ranks of the training, resume and predict stages."""
    seed: int = 0
    """Seed of the generated data."""
    resume_steps: int = 20
    """Steps the resume stage adds to run 3."""
    throughput_steps: int = 100
    """Steps of each throughput run (default tables, then Kaggle tables)."""
    stages: str = "generate,prepare,train-hash,train-vocab,resume,predict,export,throughput"
    """Stages to run, comma separated (later stages need the earlier ones' outputs)."""
    overrides: list[str] = field(default_factory=list, metadata={"metavar": "--section.key=value"})
    """Training overrides for every training stage (after --)."""

    def __post_init__(self) -> None:
        if not self.scale > 0:
            raise ValueError(f"argument --scale: expected a fraction > 0, got {self.scale}")
        for flag, value in (("--nproc", self.nproc), ("--resume-steps", self.resume_steps),
                            ("--throughput-steps", self.throughput_steps)):
            if value < 1:
                raise ValueError(f"argument {flag}: expected a positive integer, got {value}")
        unknown = [s for s in self.stage_list if s not in STAGES]
        if unknown:
            raise ValueError(f"argument --stages: unknown {unknown}; expected some of {', '.join(STAGES)}")
        if self.like == "criteo-1tb-day" and not set(self.stage_list) <= {"generate", "prepare"}:
            raise ValueError("argument --like criteo-1tb-day: only --stages generate,prepare (a day is converted, "
                             "not trained on)")
        if self.vocab_partitions < 1:
            raise ValueError(f"argument --vocab-partitions: expected a positive integer, got {self.vocab_partitions}")

    @property
    def stage_list(self) -> list[str]:
        return [s for s in self.stages.split(",") if s]


STAGES = ("generate", "prepare", "train-hash", "train-vocab", "resume", "predict", "export", "throughput")


# --- Watching a stage's processes ---------------------------------------------------------------

def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, from /proc."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _read(f"/proc/{entry}/stat")
            if stat:
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                tree.setdefault(ppid, []).append(int(entry))
    return tree


def _hwm_kb(pid: int) -> int:
    for line in _read(f"/proc/{pid}/status").splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _role(pid: int, parent_role: str | None) -> str:
    """What a process is: torchrun's agent, rank N, a worker of its parent, or its program."""
    cmd = _read(f"/proc/{pid}/cmdline").split("\0")
    env = dict(kv.split("=", 1) for kv in _read(f"/proc/{pid}/environ").split("\0") if "=" in kv)
    text = " ".join(cmd)
    if "torchrun" in text:
        return "agent"
    if "RANK" in env and parent_role == "agent":
        return f"rank{env['RANK']}"
    if parent_role is not None and parent_role not in ("bash", "shell"):
        return f"{parent_role}/worker"
    program = os.path.basename(cmd[0]) if cmd and cmd[0] else "?"
    if program in ("bash", "sh"):
        return "shell"
    if program.startswith("python"):
        mod = next((cmd[i + 1] for i, a in enumerate(cmd[:-1]) if a == "-m"), None)
        script = next((a for a in cmd[1:] if not a.startswith("-")), "python")
        return mod or os.path.basename(script)
    return program


@dataclass
class Watched:
    role: str
    peak_kb: int = 0


def run_watched(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> tuple[int, float, list[Watched]]:
    """Runs ``cmd`` (output to ``log``) and follows the peak RSS of every process it starts.

    Returns (exit status, wall seconds, one ``Watched`` per process, by first appearance)."""
    watched: dict[int, Watched] = {}
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        try:
            while True:
                tree = _children()
                todo = [(proc.pid, None)]
                while todo:
                    pid, parent = todo.pop()
                    if pid not in watched:
                        watched[pid] = Watched(_role(pid, parent))
                    hwm = _hwm_kb(pid)
                    watched[pid].peak_kb = max(watched[pid].peak_kb, hwm)
                    todo += [(c, watched[pid].role) for c in tree.get(pid, [])]
                if proc.poll() is not None:
                    break
                time.sleep(POLL_SECONDS)
        except BaseException:
            os.killpg(proc.pid, 9)
            raise
    return proc.returncode, time.perf_counter() - start, [w for w in watched.values() if w.peak_kb > 0]


def disk_bytes(*paths: Path) -> int:
    total = 0
    for p in paths:
        if p.is_file():
            total += p.stat().st_size
        elif p.is_dir():
            total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return total


# --- The stages ----------------------------------------------------------------------------------

def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


class Rehearsal:
    def __init__(self, opts: ScaleOptions) -> None:
        self.opts = opts
        self.dir = Path(opts.dir or ROOT / "runs" / "scale" / f"{opts.like}_{opts.scale:g}").resolve()
        self.raw, self.prepared = self.dir / "raw", self.dir / "prepared"
        self.runs, self.logs = self.dir / "runs", self.dir / "logs"
        self.stages: list[dict[str, Any]] = []
        self.failed = False

    def train_args(self, run: str, *extra: str) -> list[str]:
        return ["--config", "criteo_kaggle", f"--data.train={self.prepared}/train", f"--data.val={self.prepared}/val",
                f"--run_dir={self.runs / run}", "--train.progress=false", "--train.tensorboard=false",
                *self.opts.overrides, *extra]

    def train_cmd(self, run: str, *extra: str) -> list[str]:
        return ["bash", str(ROOT / "launcher" / "train.sh"), *self.train_args(run, *extra)]

    def env(self) -> dict[str, str]:
        return {**os.environ, "NPROC": str(self.opts.nproc)}

    def stage(self, name: str, cmd: list[str], outputs: list[Path], rows: int | None = None,
              fresh: list[Path] = ()) -> dict[str, Any]:
        for p in fresh:  # a stage's own outputs from an earlier invocation
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        rc, wall, procs = run_watched(cmd, self.logs / f"{name}.log", self.env())
        result = {
            "name": name, "rc": rc, "wall_s": round(wall, 1), "rows": rows,
            "rows_per_s": round(rows / wall) if rows and wall > 0 else None,
            "peak_rss_mb": [{"process": w.role, "mb": round(w.peak_kb / 1024)} for w in procs
                            if w.role not in ("shell", "agent/worker")],
            "disk_mb": round(disk_bytes(*outputs) / 1e6, 1),
            "command": " ".join(cmd),
        }
        self.stages.append(result)
        if rc != 0:
            self.failed = True
            tail = (self.logs / f"{name}.log").read_text(errors="replace").splitlines()[-15:]
            print(f"scale: stage {name} failed (exit {rc}); log {self.logs / name}.log:\n  " + "\n  ".join(tail),
                  file=sys.stderr)
        return result

    def training(self, result: dict[str, Any], run: str, steps_before: int = 0) -> None:
        """Adds a training stage's samples/s, AUC and each rank's peak beside the plan's bytes
        (a resume's rows: those of the steps it added)."""
        summary = _read_json(self.runs / run / "summary.json")
        steps = summary.get("steps")
        if steps:
            rows = (steps - steps_before) * self.opts.nproc * summary["config"]["train"]["batch_size"]
            result["rows"], result["rows_per_s"] = rows, round(rows / result["wall_s"])
        result["samples_per_s"] = round(summary.get("train_samples_per_s") or 0) or None
        result["val_auc"] = summary.get("val_auc")
        result["steps"] = steps
        self.within_plan(result, run)

    def within_plan(self, result: dict[str, Any], run: str) -> None:
        """Each rank's peak against ``PLAN_FACTOR`` x its bytes in ``run``'s plan + ``PLAN_SLACK_MB``."""
        plan = _read_json(self.runs / run / "plan.json")
        planned = {r["rank"]: (r["ddr_bytes"] + r["hbm_bytes"]) / 2**20 for r in plan.get("ranks", [])}
        ranks = {p["process"]: p["mb"] for p in result["peak_rss_mb"] if p["process"].startswith("rank")
                 and "/" not in p["process"]}
        result["plan_mb"] = [round(planned[r]) for r in sorted(planned)]
        within = [ranks.get(f"rank{r}", 0) <= PLAN_FACTOR * mb + PLAN_SLACK_MB for r, mb in planned.items()]
        result["memory_within_plan"] = bool(planned) and all(within)

    def run(self) -> dict[str, Any]:
        o = self.opts
        for d in (self.raw, self.runs, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        meta_path = self.raw / "criteo_like.json"
        todo = o.stage_list
        if self.want(todo, "generate"):
            meta = _read_json(meta_path)
            if meta.get("scale") == o.scale and meta.get("seed") == o.seed and meta.get("like") == o.like:
                print(f"scale: reusing {self.raw} (same shape, scale and seed)", file=sys.stderr)
            else:
                self.stage("generate", [_bin("deepfm-gen-criteo"), "--like", o.like, "--scale", str(o.scale),
                                        "--seed", str(o.seed), "--out", str(self.raw), "--force"],
                           [self.raw], rows=None)
                self.stages[-1]["rows"] = _read_json(meta_path).get("rows")
                self._rate(self.stages[-1])
        meta = _read_json(meta_path)
        rows = meta.get("rows")
        if self.want(todo, "prepare"):
            split = "kaggle" if o.like == "criteo-kaggle" else "terabyte"
            r = self.stage("prepare", [_bin("prepare-criteo"), "--input", str(self.raw / meta.get("file", "train.txt")), "--output",
                                       str(self.prepared), "--split", split, "--vocab-threshold", "10",
                                       "--vocab-partitions", str(o.vocab_partitions), "--overwrite", "--quiet"],
                           [self.prepared], rows=rows, fresh=[self.prepared])
            r["vocab"] = self.vocab_stats(meta)
        if self.want(todo, "train-hash"):
            r = self.stage("train-hash", self.train_cmd("hash"), [self.runs / "hash"], fresh=[self.runs / "hash"])
            self.training(r, "hash")
        if self.want(todo, "train-vocab"):
            r = self.stage("train-vocab", self.train_cmd("vocab", f"--data.vocab={self.prepared}"),
                           [self.runs / "vocab"], fresh=[self.runs / "vocab"])
            self.training(r, "vocab")
        if self.want(todo, "resume"):
            done = _read_json(self.runs / "hash" / "summary.json").get("steps", 0)
            before = disk_bytes(self.runs / "hash")
            r = self.stage("resume", self.train_cmd("hash", "--resume", "--train.epochs=2",
                                                    f"--train.max_steps={done + o.resume_steps}"), [self.runs / "hash"])
            self.training(r, "hash", steps_before=done)
            r["disk_mb"] = round((disk_bytes(self.runs / "hash") - before) / 1e6, 1)
        if self.want(todo, "predict"):
            test_rows = meta.get("oracle", {}).get("test", {}).get("rows")
            r = self.stage("predict", [_bin("torchrun"), "--standalone", "--nnodes=1", f"--nproc_per_node={o.nproc}",
                                       "-m", "deepfm_dist.predict", "--model", str(self.runs / "hash" / "checkpoints"),
                                       "--data", str(self.prepared / "test"), "--out", str(self.dir / "predictions"),
                                       "--overwrite"], [self.dir / "predictions"], rows=test_rows)
            r["test_auc"] = _read_json(self.dir / "predictions" / "_summary.json").get("auc")
            self.within_plan(r, "hash")  # the model is sharded as it was trained
        if self.want(todo, "export"):
            out = self.dir / "model.pt"
            self.stage("export", [_bin("deepfm-export"), str(self.runs / "hash" / "checkpoints"), "--out", str(out),
                                  "--overwrite"], [out, Path(str(out) + ".json")])
        if self.want(todo, "throughput"):
            default = ",".join([str(DEFAULT_TABLE_ROWS)] * 26)
            steps = f"--train.max_steps={o.throughput_steps}"
            a = self.stage("throughput-default", self.train_cmd("tp_default", steps, 
                                                                f"--data.num_embeddings_per_feature={default}"),
                           [self.runs / "tp_default"], fresh=[self.runs / "tp_default"])
            self.training(a, "tp_default")
            b = self.stage("throughput-kaggle", self.train_cmd("tp_kaggle", steps),
                           [self.runs / "tp_kaggle"], fresh=[self.runs / "tp_kaggle"])
            self.training(b, "tp_kaggle")
            if a.get("samples_per_s") and b.get("samples_per_s"):
                b["ratio_to_default"] = round(b["samples_per_s"] / a["samples_per_s"], 3)
        return self.result(meta)

    def want(self, todo: list[str], stage: str) -> bool:
        """A stage runs when asked for and no earlier stage failed (each needs the ones before)."""
        return stage in todo and not self.failed

    def _rate(self, r: dict[str, Any]) -> None:
        if r.get("rows") and r["wall_s"] > 0:
            r["rows_per_s"] = round(r["rows"] / r["wall_s"])

    def vocab_stats(self, meta: dict[str, Any]) -> dict[str, Any] | None:
        """Per column, distinct values and values kept at the threshold (prepare's manifest),
        beside the generator's target distinct count."""
        manifest = _read_json(self.prepared / "manifest.json")
        columns = (manifest.get("vocab") or {}).get("columns")
        if not columns:
            return None
        targets = meta.get("columns", {})
        return {c: {"distinct_train": s["distinct"], "kept_at_10": s["ids"],
                    "target_distinct_file": targets.get(c, {}).get("target_distinct")} for c, s in columns.items()}

    def result(self, meta: dict[str, Any]) -> dict[str, Any]:
        trained = [s for s in self.stages if "memory_within_plan" in s]
        hash_run = next((s for s in self.stages if s["name"] == "train-hash"), {})
        return {
            "mode": "scale", "scale": self.opts.scale, "like": self.opts.like, "rows": meta.get("rows"),
            "nproc": self.opts.nproc, "cpu": cpu_name(), "cores": os.cpu_count(), "commit": git_commit(),
            "dir": str(self.dir),
            "stages": self.stages,
            "val_auc": hash_run.get("val_auc"),
            "oracle_auc": meta.get("oracle", {}).get("val", {}).get("auc"),
            "memory_within_plan": bool(trained) and all(s["memory_within_plan"] for s in trained),
            "ok": bool(self.stages) and all(s["rc"] == 0 for s in self.stages)
                  and all(s["memory_within_plan"] for s in trained),
        }


def print_table(result: dict[str, Any]) -> None:
    print(f"\nscale {result['scale']} ({result['like']}, {result['rows']:,} rows), {result['nproc']} ranks, "
          f"{result['cpu']}, {result['cores']} cores, commit {result['commit']}")
    print(f"{'stage':<20} {'wall s':>8} {'rows/s':>10} {'disk MB':>9}  peak RSS MB (process)")
    for s in result["stages"]:
        peaks = ", ".join(f"{p['process']} {p['mb']}" for p in s["peak_rss_mb"])
        extra = ""
        if "plan_mb" in s:
            extra = f" | plan MB/rank {s['plan_mb']}, within: {s['memory_within_plan']}, samples/s {s.get('samples_per_s')}"
        rate = f"{s['rows_per_s']:,}" if s.get("rows_per_s") else "-"
        print(f"{s['name']:<20} {s['wall_s']:>8} {rate:>10} {s['disk_mb']:>9}  {peaks}{extra}"
              + ("" if s["rc"] == 0 else f"  FAILED (exit {s['rc']})"))
    print(f"val AUC {result['val_auc']} (oracle {result['oracle_auc']}); memory within plan: "
          f"{result['memory_within_plan']}; ok: {result['ok']}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    opts = cli.parse("bench scale", ScaleOptions, argv, __doc__.split("\n\n")[0])
    opts.overrides = overrides
    result = Rehearsal(opts).run()
    print_table(result)
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
