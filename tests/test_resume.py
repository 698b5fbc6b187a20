"""Kill a real training process, resume it, and get the uninterrupted run bit for bit.

Each test starts ``bpfree train`` as a subprocess (stderr captured; a process
that exits before it should fails the test at once, showing its stderr),
waits for its first checkpoint, kills it (SIGKILL: no final write; SIGTERM:
handled like Ctrl-C), resumes it with ``bpfree train --resume`` and compares
final parameters, ``metrics.csv`` and ``eval.csv`` (wall-time columns aside)
with a run that was never interrupted. The reference run trains in this
process while the victim starts up (one thread each, as in the subprocess);
the resume runs here too, except in the SIGTERM test, which resumes in a
fresh process. Run them repeatedly with ``pytest tests/test_resume.py --count``
-style loops (``for i in $(seq 5); do pytest -q tests/test_resume.py; done``).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bpfree import checkpoint, cli, runs

WALL_COLUMNS = {"step_ms", "wall_time_s"}

CONFIG = """
[data]
name = "synthetic"
num_train = 2000
num_test = 200
batch_size = 16

[model]
name = "mlp"
hidden = [32]

[estimator]
name = "{estimator}"
{options}

[optimizer]
name = "{optimizer}"
{optimizer_options}

[schedule]
decay = 1e-4

[train]
max_steps = {max_steps}
eval_every_steps = 40
checkpoint_every_steps = 25
save_model = true
warmup = false
measure = false
progress = false
"""

CASES = {
    "backprop": ("backprop", "", "adam", ""),
    "forward_gradient": ("forward_gradient", "num_directions = 2", "sgd", "lr = 0.01\nmomentum = 0.9"),
    "spsa": ("spsa", "num_directions = 2", "adam", "lr = 1e-3"),
    "mezo_update_mode": ("mezo", "lr = 1e-3", "sgd", ""),
    # stateful variance reduction: SVRG's snapshot θ̃, μ̃ and refresh step, sparse masks (estimator.state_dict)
    "forward_gradient_svrg": ("forward_gradient", "num_directions = 2\nsvrg_every = 40\nsvrg_directions = 4",
                              "adam", "lr = 1e-3"),
    "mezo_sparse": ("mezo", "sparse_fraction = 0.2\nsparse_every = 40", "adam", "lr = 1e-3"),
}


def write_config(path: Path, case: str, max_steps: int = 600) -> Path:
    estimator, options, optimizer, optimizer_options = CASES[case]
    path.write_text(CONFIG.format(estimator=estimator, options=options, optimizer=optimizer,
                                  optimizer_options=optimizer_options, max_steps=max_steps))
    return path


class Train:
    """``bpfree train ...`` as a subprocess; stderr goes to a file shown on any failure."""

    def __init__(self, tmp: Path, name: str, *args: str):
        self.err_path = tmp / f"{name}.stderr"
        self.err = open(self.err_path, "w")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "bpfree.cli", "train", *args],
                                     stdout=subprocess.DEVNULL, stderr=self.err, env=env)

    def stderr(self) -> str:
        self.err.flush()
        return self.err_path.read_text()

    def wait_for(self, path: Path, timeout: float = 120.0) -> None:
        """Return once ``path`` exists; fail at once (with stderr) if the process exits first."""
        t0 = time.monotonic()
        while not path.exists():
            if self.proc.poll() is not None:
                pytest.fail(f"bpfree train exited ({self.proc.returncode}) before {path.name} appeared:\n{self.stderr()}")
            if time.monotonic() - t0 > timeout:
                self.proc.kill()
                pytest.fail(f"no {path.name} after {timeout:.0f} s of a live process:\n{self.stderr()}")
            time.sleep(0.005)

    def finish(self, expect: int = 0, timeout: float = 300.0) -> None:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"bpfree train still running after {timeout:.0f} s:\n{self.stderr()}")
        self.err.close()
        assert rc == expect, f"exit status {rc}, expected {expect}:\n{self.stderr()}"


@contextlib.contextmanager
def one_thread():
    """Train in this process with one intra-op thread, like the subprocesses (OMP_NUM_THREADS=1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def reference_run(cfg: Path, out: Path) -> None:
    with one_thread():
        assert cli.main(["train", str(cfg), "--out", str(out)]) == 0


def resume_here(run_dir: Path, *extra: str) -> None:
    with one_thread():
        assert cli.main(["train", "--resume", str(run_dir), *extra]) == 0


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k not in WALL_COLUMNS} for r in csv.DictReader(f)]


def assert_identical(resumed: Path, reference: Path, *, evals: bool = True) -> None:
    a = torch.load(resumed / "model.pt", weights_only=True)
    b = torch.load(reference / "model.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"parameter {k} differs after resume"
    assert rows(resumed / "metrics.csv") == rows(reference / "metrics.csv")
    if not evals:
        return
    assert rows(resumed / "eval.csv") == rows(reference / "eval.csv")
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (resumed, reference))
    for key in ("status", "steps", "final_val_loss", "final_test_accuracy", "forward_passes_total"):
        assert sa[key] == sb[key], key


@pytest.mark.parametrize("case", list(CASES))
def test_sigkill_then_resume_is_bit_identical(tmp_path, case):
    cfg = write_config(tmp_path / "c.toml", case)
    victim = Train(tmp_path, "victim", str(cfg), "--out", str(tmp_path / "run"))
    reference_run(cfg, tmp_path / "ref")  # while the victim starts
    victim.wait_for(tmp_path / "run" / checkpoint.FILE)
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(60)
    victim.err.close()
    killed = runs.read_run(tmp_path / "run").summary
    saved = checkpoint.load(tmp_path / "run" / checkpoint.FILE)
    assert killed["status"] == "killed", "the victim finished before it was killed"
    assert saved["step"] < 600 and killed["steps"] >= saved["step"]  # rows after the checkpoint are redone
    assert killed["steps"] == len(rows(tmp_path / "run" / "metrics.csv"))
    resume_here(tmp_path / "run")
    assert_identical(tmp_path / "run", tmp_path / "ref")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["resumed_at"] and summary["checkpoints"]["count"] >= 1 and summary["checkpoints"]["bytes"] > 0
    assert not (tmp_path / "run" / checkpoint.FILE).exists()  # a completed run drops it (train.keep_checkpoint)


def test_sigterm_is_handled_like_ctrl_c_and_resumes_bit_identical(tmp_path):
    cfg = write_config(tmp_path / "c.toml", "backprop")
    victim = Train(tmp_path, "victim", str(cfg), "--out", str(tmp_path / "run"))
    reference_run(cfg, tmp_path / "ref")
    victim.wait_for(tmp_path / "run" / checkpoint.FILE)
    victim.proc.send_signal(signal.SIGTERM)
    victim.finish(130)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and "SIGTERM" in summary["reason"]
    assert summary["steps"] == len(rows(tmp_path / "run" / "metrics.csv")) > 0
    assert checkpoint.load(tmp_path / "run" / checkpoint.FILE)["step"] == summary["steps"]  # checkpoint at the stop
    assert summary["final_test_accuracy"] is None  # no evaluation after the signal
    Train(tmp_path, "resume", "--resume", str(tmp_path / "run")).finish(0)  # a fresh process
    assert_identical(tmp_path / "run", tmp_path / "ref")


def test_a_second_sigterm_during_the_stop_leaves_whole_records(tmp_path):
    cfg = write_config(tmp_path / "c.toml", "backprop", max_steps=100_000)
    victim = Train(tmp_path, "victim", str(cfg), "--out", str(tmp_path / "run"))
    victim.wait_for(tmp_path / "run" / checkpoint.FILE)
    for _ in range(2):
        victim.proc.send_signal(signal.SIGTERM)
    victim.finish(130)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())  # strict JSON, whole
    assert summary["status"] == "interrupted"
    saved = checkpoint.load(tmp_path / "run" / checkpoint.FILE)  # loadable: never torn
    assert 0 < saved["step"] <= summary["steps"] == len(rows(tmp_path / "run" / "metrics.csv"))
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_report_shows_a_killed_run_with_steps_from_metrics(tmp_path, capsys):
    cfg = write_config(tmp_path / "c.toml", "backprop", max_steps=100_000)
    victim = Train(tmp_path, "victim", str(cfg), "--out", str(tmp_path / "run"))
    victim.wait_for(tmp_path / "run" / checkpoint.FILE)
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(60)
    victim.err.close()
    raw = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert raw["status"] == "running"  # what the dead process left
    assert cli.main(["report", str(tmp_path / "run")]) == 0
    md = (tmp_path / "run" / "report.md").read_text()
    n = len(rows(tmp_path / "run" / "metrics.csv"))
    assert "killed" in md and n > 0
    assert runs.read_run(tmp_path / "run").summary["steps"] == n


def test_resume_refuses_what_it_cannot_continue(tmp_path, capsys):
    cfg = write_config(tmp_path / "c.toml", "backprop", max_steps=30)
    assert cli.main(["train", str(cfg), "--out", str(tmp_path / "done")]) == 0
    assert cli.main(["train", "--resume", str(tmp_path / "done")]) == 2
    assert "the run completed" in capsys.readouterr().err
    assert cli.main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert cli.main(["train", "--resume", str(tmp_path / "done"), "--set", "optimizer.lr=1"]) == 2
    assert "only train.epochs" in capsys.readouterr().err
    assert cli.main(["train", str(cfg), "--resume", str(tmp_path / "done")]) == 2
    assert "either CONFIG (a new run) or --resume" in capsys.readouterr().err


def test_keep_checkpoint_then_train_further(tmp_path):
    cfg = write_config(tmp_path / "c.toml", "spsa", max_steps=60)
    text = cfg.read_text().replace("max_steps = 60", "max_steps = 60\nkeep_checkpoint = true")
    cfg.write_text(text)
    reference_run(cfg, tmp_path / "a")
    resume_here(tmp_path / "a", "--set", "train.max_steps=120")
    cfg.write_text(text.replace("max_steps = 60", "max_steps = 120"))
    reference_run(cfg, tmp_path / "b")
    assert_identical(tmp_path / "a", tmp_path / "b", evals=False)  # 'a' also evaluated at its first end


SWEEP_STUDY = """
[study]
name = "ck"
objective = "val_loss"
seeds = [1]
sampler = "grid"
budget = { steps = 40 }

[base.data]
name = "synthetic"
num_train = 200
batch_size = 16

[base.model]
name = "mlp"
hidden = [8]

[base.train]
warmup = false
checkpoint_every_steps = 5

[method.m]
set = { "estimator.name" = "spsa", "optimizer.name" = "adam" }
space = { "optimizer.lr" = [0.01] }
"""


def test_a_sweep_trial_interrupted_mid_run_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    from bpfree import train
    from bpfree.studies import sweep

    path = tmp_path / "ck.toml"
    path.write_text(SWEEP_STUDY)
    original = train._Loop.stop_if_signalled

    def ctrl_c_after_step_17(self):
        if self.step == 17:
            raise KeyboardInterrupt
        original(self)

    monkeypatch.setattr(train._Loop, "stop_if_signalled", ctrl_c_after_step_17)
    with pytest.raises(KeyboardInterrupt):
        sweep.run(sweep.load_study(path), tmp_path / "out", methods=["m"], log=lambda line: None)
    trial_dir = tmp_path / "out" / "m" / "trial-0000"
    assert checkpoint.load(trial_dir / checkpoint.FILE)["step"] == 17
    monkeypatch.undo()
    sweep.run(sweep.load_study(path), tmp_path / "out", methods=["m"], log=lambda line: None)
    summary = json.loads((trial_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 40 and len(summary["resumed_at"]) == 1
    assert [int(r["step"]) for r in rows(trial_dir / "metrics.csv")] == list(range(1, 41))
    assert not (tmp_path / "out" / "m" / "trial-0001").exists()  # the retry worked in the dead trial's directory
