import json

from deepfm_dist.plot import main, read_run


def write_run(path, scale: float, resumed: bool = False):
    path.mkdir()
    lines = [{"step": s, "samples": s * 100, "loss": scale / s, "lr": 0.1, "samples_per_s": 1000.0 + s} for s in range(1, 11)]
    lines += [{"step": s, "samples": s * 100, "val_auc": 0.6 + s / 100, "val_logloss": 0.5, "val_rows": 10} for s in (5, 10)]
    if resumed:  # a resume re-logs step 10 after restarting from step 8
        lines.append({"step": 10, "samples": 1000, "loss": 123.0, "lr": 0.1, "samples_per_s": 1.0})
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    (path / "summary.json").write_text(json.dumps({"oracle_val_auc": 0.8}))


def test_plot_overlays_runs_into_a_png(tmp_path):
    write_run(tmp_path / "a", 1.0)
    write_run(tmp_path / "b", 2.0, resumed=True)
    train, evals = read_run(str(tmp_path / "b"))
    assert [r["step"] for r in train] == list(range(1, 11)) and train[-1]["loss"] == 123.0
    assert [r["step"] for r in evals] == [5, 10]
    out = tmp_path / "p.png"
    assert main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out), "--labels", "A,B"]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_plot_errors_name_the_problem(tmp_path, capsys):
    assert main([str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text('{"step": 1}\nnot json\n')
    assert main([str(bad), "--out", str(tmp_path / "x.png")]) == 2
    assert "metrics.jsonl:2" in capsys.readouterr().err
