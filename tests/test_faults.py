"""Faults a user meets: signals inside a run, resume of an interrupted run, memory limits
before allocation, one-line CLI errors, loading a run directory, safe deserialisation."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
from pathlib import Path

import pytest
import torch

from bpfree import checkpoint, cli, limits, runs, train
from bpfree import config as C

SRC = Path(__file__).resolve().parents[1] / "src" / "bpfree"


def tiny(**train_options) -> C.Config:
    return C.from_dict({
        "data": {"name": "synthetic", "num_train": 200, "num_test": 100, "batch_size": 16},
        "model": {"name": "mlp", "hidden": [8]},
        "estimator": {"name": "spsa"},
        "optimizer": {"name": "adam", "lr": 1e-2},
        "train": {"max_steps": 40, "eval_every_steps": 10, "warmup": False, "measure": False, "progress": False,
                  "save_model": True, **train_options},
    })


def rows(path: Path, drop=("step_ms", "wall_time_s")) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k not in drop} for r in csv.DictReader(f)]


def same_run(a: Path, b: Path) -> None:
    pa, pb = (torch.load(d / "model.pt", weights_only=True) for d in (a, b))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert rows(a / "metrics.csv") == rows(b / "metrics.csv")
    assert rows(a / "eval.csv") == rows(b / "eval.csv")


# ------------------------------------------------------------------ signals inside a run


def test_first_sigterm_finishes_the_step_then_checkpoints(tmp_path, monkeypatch):
    original = train._Loop.train_step

    def signal_inside_step_7(self, x, y):
        if self.step == 6:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-step: recorded, the step completes
        return original(self, x, y)

    monkeypatch.setattr(train._Loop, "train_step", signal_inside_step_7)
    summary = train.run(tiny(), tmp_path / "r")
    assert summary["status"] == "interrupted" and summary["steps"] == 7
    assert summary["reason"] == "interrupted by SIGTERM after step 7"
    assert checkpoint.load(tmp_path / "r" / checkpoint.FILE)["step"] == 7
    assert signal.getsignal(signal.SIGTERM) is not None  # handlers restored (pytest's own)


def test_interrupted_run_resumes_bit_identical_in_process(tmp_path, monkeypatch):
    train.run(tiny(), tmp_path / "ref")
    original = train._Loop.stop_if_signalled

    def ctrl_c_after_step_23(self):
        if self.step == 23:
            raise KeyboardInterrupt
        original(self)

    monkeypatch.setattr(train._Loop, "stop_if_signalled", ctrl_c_after_step_23)
    assert train.run(tiny(), tmp_path / "run")["status"] == "interrupted"
    monkeypatch.undo()
    assert train.resumable(C.resolve(tiny()), tmp_path / "run")
    assert not train.resumable(C.resolve(tiny(max_steps=41)), tmp_path / "nothing")
    summary = train.run_or_resume(tiny(), tmp_path / "run")  # what sweeps and studies call
    assert summary["status"] == "completed" and len(summary["resumed_at"]) == 1
    same_run(tmp_path / "run", tmp_path / "ref")


def test_evaluation_stops_before_its_next_batch_and_restores_the_mode():
    model = torch.nn.Linear(4, 3)
    split = train.data.TensorSplit(torch.randn(50, 4), torch.randint(0, 3, (50,)))
    calls = []

    def signal_after_two_batches():
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train.evaluate(model, split, 10, between_batches=signal_after_two_batches)
    assert len(calls) == 3 and model.training  # two batches ran; the mode is back
    assert train.evaluate(model, split, 10, between_batches=lambda: None) == train.evaluate(model, split, 10)


@pytest.mark.parametrize("split, at_step", [("val", 20), ("test", 40)])
def test_sigterm_during_an_evaluation_stops_it_and_the_resumed_run_redoes_it(tmp_path, monkeypatch, split, at_step):
    """A minute-long evaluation must not outlive ``docker stop``'s grace period; the resumed run
    equals an uninterrupted one, the cut evaluation included."""
    train.run(tiny(), tmp_path / "ref")
    original = train._Loop.evaluate

    def sigterm_inside(self, which):
        if which == split and self.step == at_step:
            os.kill(os.getpid(), signal.SIGTERM)  # recorded; the evaluation stops before its next batch
        original(self, which)

    monkeypatch.setattr(train._Loop, "evaluate", sigterm_inside)
    summary = train.run(tiny(), tmp_path / "run")
    assert summary["status"] == "interrupted" and summary["steps"] == at_step
    assert summary["reason"].startswith(f"interrupted by SIGTERM during the {split} evaluation after step {at_step}")
    assert summary["final_test_accuracy"] is None
    assert all(int(r["step"]) < at_step or r["split"] != split for r in rows(tmp_path / "run" / "eval.csv"))
    monkeypatch.undo()
    resumed = train.resume(tmp_path / "run")
    assert resumed["status"] == "completed" and resumed["steps"] == 40  # no step past max_steps
    same_run(tmp_path / "run", tmp_path / "ref")


def test_a_killed_run_reports_its_latest_evaluations_from_eval_csv(tmp_path):
    """SIGKILL leaves the summary of the last checkpoint (here: the first one, before any
    evaluation); the report takes each split's last eval.csv row, as it takes steps from metrics.csv."""
    train.run(tiny(), tmp_path / "r")
    path = tmp_path / "r" / "summary.json"
    done = json.loads(path.read_text())
    first = {**done, "status": "running", "steps": 0,
             **{f"final_{s}_{m}": None for s in ("train", "val", "test") for m in ("loss", "accuracy")}}
    path.write_text(json.dumps(first))
    with open(tmp_path / "r" / "eval.csv") as f:
        lines = f.readlines()
    (tmp_path / "r" / "eval.csv").write_text("".join(lines[:-1]))  # killed during the test evaluation
    summary = runs.read_run(tmp_path / "r").summary
    assert summary["status"] == "killed" and summary["steps"] == 40
    evals = rows(tmp_path / "r" / "eval.csv")
    last_val = [r for r in evals if r["split"] == "val"][-1]
    assert summary["final_val_accuracy"] == pytest.approx(float(last_val["accuracy"]))
    assert summary["final_train_loss"] == pytest.approx(done["final_train_loss"])
    assert summary["final_test_accuracy"] is None  # its row was never written


def test_a_step_cut_by_a_second_signal_is_never_checkpointed(tmp_path, monkeypatch):
    original = train._Loop.train_step

    def cut_in_step_15(self, x, y):
        if self.step == 14:
            self.in_step = True
            raise KeyboardInterrupt  # as a second Ctrl-C inside the estimate would
        return original(self, x, y)

    monkeypatch.setattr(train._Loop, "train_step", cut_in_step_15)
    summary = train.run(tiny(checkpoint_every_steps=10), tmp_path / "r")
    assert summary["status"] == "interrupted" and "inside step 15" in summary["reason"]
    assert checkpoint.load(tmp_path / "r" / checkpoint.FILE)["step"] == 10  # the periodic one is kept
    assert not (tmp_path / "r" / "model.pt").exists()  # possibly perturbed parameters are not saved


def test_checkpoints_hold_no_code_and_refuse_other_formats(tmp_path):
    path = tmp_path / "c.pt"
    size, seconds = checkpoint.save(path, {"x": torch.ones(3)})
    assert size == path.stat().st_size and seconds >= 0 and not path.with_name("c.pt.tmp").exists()
    torch.save({"format": 99}, path)
    with pytest.raises(checkpoint.CheckpointError, match="format 99"):
        checkpoint.load(path)
    torch.save({"format": 1, "bad": Path("x")}, path)  # not a tensor or plain value: refused unread
    with pytest.raises(checkpoint.CheckpointError, match="not a readable bpfree checkpoint"):
        checkpoint.load(path)


def test_every_torch_load_reads_weights_only():
    calls = [(p, m) for p in SRC.rglob("*.py") for m in re.finditer(r"torch\.load\(([^)]*)\)", p.read_text())]
    assert calls, "no torch.load found: the check looks in the wrong place"
    unsafe = [f"{p.relative_to(SRC)}: torch.load({m.group(1)})" for p, m in calls if "weights_only=True" not in m.group(1)]
    assert not unsafe
    assert not [p for p in SRC.rglob("*.py") if re.search(r"\bpickle\.loads?\(", p.read_text())]


# ------------------------------------------------------------------ loading a run


def test_runs_load_gives_config_model_and_metrics(tmp_path):
    summary = train.run(tiny(save_best=True), tmp_path / "r")
    r = runs.load(tmp_path / "r")
    assert r.weights == "model.pt" and r.config == C.resolve(tiny(save_best=True))
    assert not r.model.training and len(r.metrics["loss"]) == summary["steps"] == 40
    x = torch.randn(5, 10, generator=torch.Generator().manual_seed(0))
    saved = torch.load(tmp_path / "r" / "model.pt", weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in r.model.state_dict().items())
    best = runs.load(tmp_path / "r", weights="best")
    assert best.weights == "best.pt" and best.model(x).shape == (5, 4)
    with pytest.raises(ValueError, match="'last' or 'best'"):
        runs.load(tmp_path / "r", weights="first")


def test_runs_load_reads_a_checkpoint_when_there_is_no_model_file(tmp_path, monkeypatch):
    monkeypatch.setattr(train._Loop, "stop_if_signalled", lambda self: (_ for _ in ()).throw(KeyboardInterrupt)
                        if self.step == 12 else None)
    train.run(tiny(save_model=False), tmp_path / "r")
    r = runs.load(tmp_path / "r")
    assert r.weights == checkpoint.FILE and r.summary["status"] == "interrupted"
    with pytest.raises(FileNotFoundError, match="train.save_best = true"):
        runs.load(tmp_path / "r", weights="best")


# ------------------------------------------------------------------ memory limits


def test_limits_refuse_oversized_data_and_directions_before_allocating(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[data]\nname = "synthetic"\n[model]\nname = "mlp"\nhidden = [8]\n[train]\nmax_steps = 1\n')
    for override, part in (("data.num_train=1000000000", "data"),
                           ("estimator.num_directions=1000000000", "directions")):
        name = "forward_gradient" if "directions" in override else "backprop"
        status = cli.main(["train", str(cfg), "--set", override, "--set", f"estimator.name={name}",
                           "--out", str(tmp_path / part)])
        err = capsys.readouterr().err
        assert status == 2 and err.count("\n") == 1, err
        assert re.search(rf"needs about [\d.]+ GiB \(.*{part} [\d.]+ GiB.*\) but this machine has [\d.]+ GiB "
                         r"available of [\d.]+ GiB", err), err
        assert not (tmp_path / part).exists()  # refused before the run directory was made


def test_limit_estimate_parts():
    cfg = C.resolve(C.from_dict({"estimator": {"name": "forward_gradient", "num_directions": 4},
                                 "optimizer": {"name": "adam"}, "train": {"max_steps": 1}}))
    parts = limits.run_bytes(cfg, 1000, 123)
    assert parts == {"data": 123, "model": 1000 * 4 * (2 + 2 + 1), "directions": 4 * 1000 * 4}
    assert limits.count_parameters_on_meta(C.resolve(C.from_dict({"model": {"hidden": [3]}, "train": {"max_steps": 1}})),
                                           (10,), 4) == 10 * 3 + 3 + 3 * 4 + 4


# ------------------------------------------------------------------ one-line errors


@pytest.fixture
def cfg_file(tmp_path) -> Path:
    p = tmp_path / "c.toml"
    p.write_text('[data]\nname = "synthetic"\nnum_train = 64\n[model]\nname = "mlp"\nhidden = [4]\n'
                 "[train]\nmax_steps = 1\nwarmup = false\nmeasure = false\n")
    return p


def one_line_error(capsys, argv: list[str], needle: str, status: int = 2) -> str:
    got = cli.main(argv)
    err = capsys.readouterr().err
    assert got == status, err
    assert err.startswith("bpfree: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert needle in err, err
    return err


def test_os_errors_are_one_line(tmp_path, capsys, cfg_file, monkeypatch):
    one_line_error(capsys, ["train", str(tmp_path)], "is a directory; give a TOML file")
    (tmp_path / "afile").write_text("x")
    one_line_error(capsys, ["train", str(cfg_file), "--out", str(tmp_path / "afile")], "afile")
    one_line_error(capsys, ["train", str(cfg_file), "--out", str(tmp_path / "afile" / "sub")], "afile")
    (tmp_path / "binary.toml").write_bytes(b"\xff\xfe\x00")
    one_line_error(capsys, ["train", str(tmp_path / "binary.toml")], "not UTF-8 text")

    def read_only(self, *a, **k):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)  # a read-only --out (root ignores chmod, so simulate it)
    one_line_error(capsys, ["train", str(cfg_file), "--out", str(tmp_path / "ro" / "run")], "permission denied: ")


def test_values_are_never_silently_replaced(capsys, cfg_file):
    task = ["--task", "synthetic/mlp", "--set", "data.num_train=64", "--set", "model.hidden=[4]"]
    one_line_error(capsys, ["compare", *task, "--budget", ""], "--budget is empty")
    one_line_error(capsys, ["compare", *task, "--estimators", " "], "--estimators is empty")
    one_line_error(capsys, ["measure", *task, "--batch", "0"], "--batch must be >= 1, got 0")
    one_line_error(capsys, ["measure", *task, "--repeats", "0"], "--repeats must be >= 1")
    one_line_error(capsys, ["measure", *task, "--cosine-draws", "-1"], "--cosine-draws must be >= 1")
    one_line_error(capsys, ["probe", "--data", "synthetic", "--samples", "1"], "--samples must be >= 2")
    one_line_error(capsys, ["probe", "--data", "synthetic", "--ks", ","], "--ks expects comma-separated integers")
    one_line_error(capsys, ["probe", "--data", "synthetic", "--widths", "0"], "--widths expects")
    one_line_error(capsys, ["train", str(cfg_file), "--set", "data.num_train=[1]"],
                   "data.num_train of 'synthetic' must be an integer, got [1]")
    one_line_error(capsys, ["sweep", "rike2024", "--methods", ""], "--methods is empty")


def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(capsys, cfg_file, monkeypatch, tmp_path):
    def boom(*a, **k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(train, "run", boom)
    one_line_error(capsys, ["train", str(cfg_file), "--out", str(tmp_path / "a")], "internal error: ZeroDivisionError: "
                   "a bug (run again with --debug for the traceback)", status=1)
    assert cli.main(["train", str(cfg_file), "--out", str(tmp_path / "a"), "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.rstrip().splitlines()[-1].startswith("bpfree: error:")


@pytest.mark.parametrize("failure", [
    lambda: torch.empty(2**62, dtype=torch.uint8),  # the CPU allocator refuses it at once
    lambda: (_ for _ in ()).throw(MemoryError()),
])
def test_allocation_failure_is_one_line(capsys, cfg_file, monkeypatch, tmp_path, failure):
    monkeypatch.setattr(train, "run", lambda *a, **k: failure())
    one_line_error(capsys, ["train", str(cfg_file), "--out", str(tmp_path / "a")], "out of memory")


def test_sigterm_outside_a_run_is_an_interrupt(capsys, cfg_file, monkeypatch, tmp_path):
    monkeypatch.setattr(train, "run", lambda *a, **k: os.kill(os.getpid(), signal.SIGTERM) or {})
    before = signal.getsignal(signal.SIGTERM)
    assert cli.main(["train", str(cfg_file), "--out", str(tmp_path / "a")]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before


def test_report_never_shows_a_diverged_accuracy(tmp_path):
    d = tmp_path / "old"
    train.run(tiny(), d)
    s = json.loads((d / "summary.json").read_text())
    s.update(status="diverged", diverged_at_step=3, final_val_accuracy=0.5)  # a record written before the rule
    runs.write_json(d / "summary.json", s)
    assert runs.read_run(d).summary["final_val_accuracy"] is None
