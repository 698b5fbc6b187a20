"""``bpfree sweep``: study files, presets, per-method search, resume after SIGKILL, the seed-002 study.

Every sweep here trains tiny models on synthetic Gaussian blobs for a few
steps; the oracle for "no trial lost or repeated" is the grid itself: after
the sweep, the COMPLETE trials hold every grid point exactly once.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bpfree import cli
from bpfree.config import ConfigError
from bpfree.studies import rike2024, sweep
from report_checks import assert_self_contained

optuna = pytest.importorskip("optuna")
from optuna.trial import TrialState  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

TINY = """
[study]
name = "tiny"
budget = { steps = %(steps)d }
seeds = [1, 2]
eval_every_steps = 5

[base.data]
name = "synthetic"
num_train = %(num_train)d
[base.model]
name = "%(model)s"
%(model_options)s
[base.train]
warmup = false
measure = false

[method.bp]
set = { "estimator.name" = "backprop", "optimizer.name" = "sgd" }
space = { "optimizer.lr" = [0.01, 0.1, 0.5], "schedule.decay" = [0, 1e-2] }
tags = { gradient = "BP" }

[method.fg]
set = { "estimator.name" = "forward_gradient", "optimizer.name" = "adam" }
space = { "optimizer.betas" = [[0.9, 0.999], [0.99, 0.999]], "optimizer.lr" = { low = 1e-4, high = 1e-1, log = true } }
sampler = "tpe"
n_trials = 3

[preset.short]
study.budget = { steps = 4 }
method."b*".space = { "optimizer.lr" = [0.1] }
"""


def tiny(tmp_path: Path, *, steps: int = 10, num_train: int = 200, model: str = "logreg", extra: str = "") -> Path:
    path = tmp_path / "tiny.toml"
    options = "hidden = [256, 256]" if model == "mlp" else ""
    path.write_text(TINY % {"steps": steps, "num_train": num_train, "model": model, "model_options": options} + extra)
    return path


def grid_params(study) -> list[str]:
    return sorted(json.dumps(t.params, sort_keys=True) for t in study.get_trials(states=(TrialState.COMPLETE,)))


# --------------------------------------------------------------------------- the study file


def test_study_file_presets_and_grid(tmp_path):
    s = sweep.load_study(tiny(tmp_path))
    assert s.names() == ["bp", "fg"] and s.seeds == (1, 2) and s.preset is None
    assert len(sweep.grid_points(s.method("bp"))) == 6
    assert s.method("fg").sampler == "tpe" and s.method("fg").n_trials == 3
    short = sweep.load_study(tiny(tmp_path), preset="short")
    assert short.method("bp").budget == {"steps": 4} and short.method("fg").budget == {"steps": 4}
    # a preset's space is merged key by key: lr replaced, decay kept
    assert sweep.grid_points(short.method("bp")) == [{"optimizer.lr": 0.1, "schedule.decay": 0},
                                                     {"optimizer.lr": 0.1, "schedule.decay": 1e-2}]
    # lists as choices are encoded for optuna and decoded for the config
    point = sweep.grid_points(sweep.Method("m", {}, {"optimizer.betas": [[0.9, 0.999]]}, {}, "grid", None, {"steps": 1}))
    assert point == [{"optimizer.betas": "json:[0.9,0.999]"}] and sweep._decode(point[0]["optimizer.betas"]) == [0.9, 0.999]
    # {low, high, num} gives a grid
    m = sweep.Method("m", {}, {"optimizer.lr": {"low": 1e-4, "high": 1e-2, "num": 3, "log": True}}, {}, "grid", None, {"steps": 1})
    assert [p["optimizer.lr"] for p in sweep.grid_points(m)] == pytest.approx([1e-4, 1e-3, 1e-2])


@pytest.mark.parametrize(
    "extra, message",
    [
        ("[method.x]\nsapce = {}\n", "did you mean 'space'"),
        ("[method.x]\nset = { \"optimizer.lrr\" = 1 }\n", "optimizer.lr"),
        ("[method.x]\nsampler = \"tpe\"\n", "needs n_trials"),
        ("[method.x]\nbudget = { hours = 1 }\n", "unknown budget 'hours'"),
        ("[method.x]\nspace = { \"optimizer.lr\" = { low = 1, high = 2 } }\n", "a grid needs a list"),
    ],
)
def test_study_file_errors_name_the_key(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        sweep.load_study(tiny(tmp_path, extra=extra))


def test_unknown_preset_lists_the_presets(tmp_path):
    with pytest.raises(ConfigError, match="presets: short"):
        sweep.load_study(tiny(tmp_path), preset="nope")


# --------------------------------------------------------------------------- a whole sweep


def test_sweep_grid_and_tpe_then_finals_and_report(tmp_path):
    out = tmp_path / "out"
    lines: list[str] = []
    results = sweep.run(sweep.load_study(tiny(tmp_path)), out, log=lines.append)
    bp, fg = results["methods"]
    assert bp["n_complete"] == 6 and len({json.dumps(t["params"], sort_keys=True) for t in bp["trials"]}) == 6
    assert fg["n_complete"] == 3
    for m in (bp, fg):
        assert [f["seed"] for f in m["finals"]] == [1, 2]
        assert m["test_loss"]["n"] == 2 and m["test_loss"]["mean"] is not None
        for t in m["trials"]:  # every trial keeps its run directory, numbered
            assert Path(t["run_dir"]).name == f"trial-{t['number']:04d}" and (Path(t["run_dir"]) / "summary.json").is_file()
        best = m["best"]
        assert best["value"] == min(t["value"] for t in m["trials"] if t["state"] == "COMPLETE")
    # finals use the best values with the study's seeds, not the search seed
    final_cfg = (Path(bp["finals"][0]["run_dir"]) / "config.toml").read_text()
    assert f"lr = {bp['best']['params']['optimizer.lr']!r}" in final_cfg and "seed = 1" in final_cfg
    # progress: done/left, best so far, ETA
    assert lines[-1].startswith("[13/13]") and "0 left, ETA" in lines[-1] and "| best " in lines[-1]
    for name in ("sweep.json", "report.md", "report.html", "final_curves.png"):
        assert (out / name).is_file()
    md = (out / "report.md").read_text()
    assert "| bp | grid | 6/6 |" in md and " ± " in md
    assert "## Memory" in md and "## Comparable memory" in md and "estimate peak" in md  # finals measure memory
    assert_self_contained((out / "report.html").read_text())
    # running it again does nothing (all done) and rebuilds the same numbers
    again = sweep.run(sweep.load_study(tiny(tmp_path)), out, log=lines.append)
    assert again["methods"][0]["n_complete"] == 6 and len(again["methods"][1]["trials"]) == 3
    rebuilt = sweep.report_only(sweep.load_study(tiny(tmp_path)), out)
    assert rebuilt["methods"][0]["test_loss"] == bp["test_loss"]


def test_changed_space_is_refused_not_mixed(tmp_path):
    out = tmp_path / "out"
    sweep.run(sweep.load_study(tiny(tmp_path), preset="short"), out, methods=["bp"], log=lambda m: None)
    with pytest.raises(ConfigError, match="different search space"):
        sweep.run(sweep.load_study(tiny(tmp_path)), out, methods=["bp"], log=lambda m: None)


def test_flops_budget_becomes_steps(tmp_path):
    s = sweep.load_study(tiny(tmp_path, extra='[method.f]\nset = { "estimator.name" = "backprop" }\nbudget = { flops = 1e6 }\n'))
    m = s.method("f")
    cfg = sweep.method_config(s, m, {}, seed=0)
    per_step = sweep.count_step_flops(cfg)
    assert per_step > 0
    assert sweep.budget_overrides(m, cfg)["train.max_steps"] == max(1, int(1e6 // per_step))


def test_diverged_trial_scores_worst_and_missing_data_is_skipped(tmp_path):
    path = tmp_path / "t2.toml"
    path.write_text("""
[study]
name = "t2"
budget = { steps = 5 }
seeds = [1]
missing_data = "skip"
[base.data]
name = "cifar10"
root = "%s"
[base.model]
name = "logreg"
[base.train]
warmup = false
measure = false
[method.boom]
set = { "data.name" = "synthetic", "data.num_train" = 200, "model.name" = "mlp", "model.hidden" = [8], "optimizer.name" = "sgd" }
space = { "optimizer.lr" = [1e30, 0.1] }
[method.cifar]
set = { "estimator.name" = "backprop" }
""" % (tmp_path / "nothing"))
    results = sweep.run(sweep.load_study(path), tmp_path / "out", log=lambda m: None)
    boom, cifar = results["methods"]
    values = {t["params"]["optimizer.lr"]: t["value"] for t in boom["trials"]}
    assert values[1e30] == math.inf and math.isfinite(values[0.1])
    assert boom["best"]["params"]["optimizer.lr"] == 0.1
    assert "cifar10" in cifar["skipped"] and "not on this machine" in cifar["skipped"]
    assert "skipped" in (tmp_path / "out" / "report.md").read_text()


def test_cli_sweep_and_one_line_errors(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = cli.main(["sweep", str(tiny(tmp_path)), "--preset", "short", "--out", str(out), "--methods", "bp"])
    assert rc == 0 and "report.html" in capsys.readouterr().out
    assert json.loads((out / "sweep.json").read_text())["methods"][0]["n_complete"] == 2
    assert cli.main(["sweep", str(tiny(tmp_path)), "--preset", "short", "--out", str(out), "--report-only"]) == 0
    capsys.readouterr()
    assert sweep.load_study("rike2024").name == "rike2024"  # a shipped study by name
    assert cli.main(["sweep", "no-such-study"]) == 2
    assert "shipped studies, usable by name: rike2024" in capsys.readouterr().err
    assert cli.main(["sweep", str(tiny(tmp_path)), "--preset", "bogus"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bpfree: error:") and "presets: short" in err and len(err.strip().splitlines()) == 1


def test_cli_workers_share_the_default_sqlite_storage(tmp_path):
    """``--workers 2``: a second local process joins through the same SQLite file; the grid is
    run once in all."""
    out = tmp_path / "w"
    rc = subprocess.run([sys.executable, "-m", "bpfree.cli", "sweep", str(tiny(tmp_path, steps=30, model="mlp")),
                         "--methods", "bp", "--workers", "2", "--out", str(out)], env=_worker_env(),
                        capture_output=True, text=True, timeout=300)
    assert rc.returncode == 0, rc.stderr
    storage = sweep.open_storage(sweep.default_storage(out))
    try:
        st = optuna.load_study(study_name="tiny/bp", storage=storage)
        grid = sorted(json.dumps(p, sort_keys=True) for p in sweep.grid_points(sweep.load_study(tiny(tmp_path)).method("bp")))
        assert grid_params(st) == grid and len(st.trials) == len(grid)
    finally:
        sweep.close_storage(storage)


# --------------------------------------------------------------------------- resume after SIGKILL


def _worker_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}


def started(argv: list[str], log: Path) -> subprocess.Popen:
    """A bpfree process whose stdout and stderr go to ``log`` (read back by :func:`alive_or_fail`)."""
    with open(log, "w") as f:
        return subprocess.Popen(argv, env=_worker_env(), stdout=f, stderr=subprocess.STDOUT)


def alive_or_fail(proc: subprocess.Popen, log: Path, what: str) -> None:
    """Fail at once, showing the process's output, when it has exited before it should have."""
    if proc.poll() is not None:
        pytest.fail(f"{what} exited early with code {proc.returncode}:\n{log.read_text()}")


def test_killed_sweep_resumes_without_losing_or_repeating_trials(tmp_path):
    """A real worker process is SIGKILLed mid-trial; the same command then finishes the grid.

    The wait ends when the worker has a trial running (then it is killed) or exits early
    (then the test fails at once with its output); the 600 s guard only catches a worker
    that is alive but hung."""
    path = tiny(tmp_path, steps=400, num_train=2000, model="mlp")
    out = tmp_path / "out"
    log = tmp_path / "worker.log"
    proc = started([sys.executable, "-m", "bpfree.cli", "sweep", str(path), "--out", str(out), "--methods", "bp"], log)
    before, storage = None, None
    hung = time.monotonic() + 600
    try:
        while before is None:
            time.sleep(0.2)
            alive_or_fail(proc, log, "the sweep worker")
            if time.monotonic() > hung:
                pytest.fail(f"the sweep worker is alive but never ran a trial in 600 s:\n{log.read_text()}")
            if storage is None:
                if not (out / "sweep.db").is_file():
                    continue
                storage = sweep.open_storage(sweep.default_storage(out))  # creation_lock: no race with the worker
            try:
                st = optuna.load_study(study_name="tiny/bp", storage=storage)
            except KeyError:
                continue
            trials = st.get_trials()
            done = [t for t in trials if t.state == TrialState.COMPLETE]
            running = [t for t in trials if t.state == TrialState.RUNNING]
            # kill only once the running trial has started writing its run directory: a kill
            # between the storage's RUNNING mark and the directory's creation leaves no data to keep
            if len(done) >= 2 and running and (out / "bp" / f"trial-{running[0].number:04d}").is_dir():
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                before = {t.number: t.datetime_complete for t in st.get_trials() if t.state == TrialState.COMPLETE}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    st = optuna.load_study(study_name="tiny/bp", storage=storage)
    killed = [t for t in st.get_trials() if t.state == TrialState.RUNNING]
    assert len(killed) == 1  # left RUNNING by the dead process
    lines: list[str] = []
    results = sweep.run(sweep.load_study(path), out, methods=["bp"], log=lines.append)
    assert any("left running by a dead worker" in line for line in lines)
    st = optuna.load_study(study_name="tiny/bp", storage=storage)
    complete = st.get_trials(states=(TrialState.COMPLETE,))
    failed = st.get_trials(states=(TrialState.FAIL,))
    grid = sorted(json.dumps(p, sort_keys=True) for p in sweep.grid_points(sweep.load_study(path).method("bp")))
    assert grid_params(st) == grid  # every grid point once: none lost, none repeated
    assert [t.number for t in failed] == [killed[0].number]
    retry = [t for t in complete if t.user_attrs.get("bpfree:retry_of") == killed[0].number]
    assert len(retry) == 1 and retry[0].params == killed[0].params
    for number, finished in before.items():  # finished trials were not re-run
        assert st.trials[number].datetime_complete == finished
    assert (out / "bp" / f"trial-{killed[0].number:04d}").is_dir()  # the killed run's data is kept
    assert results["methods"][0]["done"]


# --------------------------------------------------------------------------- the seed-002 study


def test_rike2024_presets_load_and_cover_table_one():
    quick, full = rike2024.load("quick"), rike2024.load("full")
    assert rike2024.study_path().is_file()
    tags = {rike2024._key(m.tags) for m in quick.methods}
    assert tags == {(p["gradient"], p["model"], p["data"], p["optimizer"]) for p in rike2024.PAPER}
    assert all(m.budget == {"epochs": 50} for m in full.methods if m.tags["data"] == "MNIST")
    assert all(m.budget == {"epochs": 100} for m in full.methods if m.tags["data"] == "CIFAR-10")
    # the full grids contain every value Table I reports
    for p in rike2024.PAPER:
        m = next(m for m in full.methods if rike2024._key(m.tags) == (p["gradient"], p["model"], p["data"], p["optimizer"]))
        assert p["lr"] in m.space["optimizer.lr"] and p["decay"] in m.space["schedule.decay"], m.name
        if "momentum" in p:
            assert p["momentum"] in m.space["optimizer.momentum"], m.name
        if "beta1" in p:
            assert [p["beta1"], p["beta2"]] in m.space["optimizer.betas"], m.name
    cnn = quick.method("cnn-sgd-bp")
    assert cnn.set["model.channels"] == 16 and quick.missing_data == "skip"
    with pytest.raises(ConfigError, match="presets"):
        rike2024.load("medium")


def _fake_method(gradient: str, optimizer: str, val: list[float], lr: float) -> dict:
    steps = [0, 50, 100, 150, 200]
    finals = [{"seed": s, "run_dir": None,
               "summary": {"final_test_loss": val[-1] + 0.01 * s, "final_test_accuracy": 0.9,
                           "final_train_loss": val[-1], "status": "completed"},
               "curves": {"val": [[st, v, 0.9] for st, v in zip(steps, val)],
                          "train": [[st, v] for st, v in zip(steps[1:], val[1:])]}} for s in (1, 2)]
    stat = {"mean": val[-1] + 0.015, "std": 0.007, "n": 2}
    return {"name": f"nn-{optimizer.lower()}-{gradient.lower()}", "sampler": "grid", "budget": {"steps": 200},
            "tags": {"gradient": gradient, "model": "NN", "data": "MNIST", "optimizer": optimizer},
            "finals": finals, "test_loss": stat, "test_accuracy": {"mean": 0.9, "std": 0.0, "n": 2},
            "train_loss": stat, "n_complete": 2, "n_planned": 2, "diverged_finals": 0,
            "best": {"number": 0, "value": val[-1], "params": {"optimizer.lr": lr}},
            "resolved": {"optimizer": {"name": optimizer.lower(), "lr": lr, "momentum": 0.0, "betas": [0.9, 0.999]},
                         "schedule_decay": 0.0, "steps": 200, "steps_per_epoch": 100,
                         "model": {"options": {"hidden": [1024, 1024]}, "num_parameters": 1}}}


def test_rike2024_ratio_claims_and_report(tmp_path):
    bp = _fake_method("BP", "SGD", [2.3, 0.5, 0.3, 0.2, 0.1], 0.1)
    fg = _fake_method("FG", "SGD", [2.3, 1.5, 0.9, 0.6, 0.5], 4.64e-4)
    r = rike2024.iterations_to_target(bp, fg)
    # FG's best is 0.5 at step 200; BP's mean curve first reaches <= 0.5 at step 50 (its first evaluation)
    assert r == {"target": 0.5, "steps_fg": 200, "steps_bp": 50, "ratio": 4.0, "bound": ">="}
    results = {"title": "t", "preset": "quick", "source": "s.toml", "out": str(tmp_path), "objective": "val_loss",
               "direction": "minimize", "seeds": [1, 2], "search_seed": 0, "storage": "sqlite://",
               "methods": [bp, fg]}
    verdicts = {c[0]: c[1] for c in rike2024.claims(results)}
    assert verdicts["BP converges 2-4x faster in iterations"] == "reproduces (2-4x)"
    assert verdicts["Tuned separately, BP takes a much higher learning rate than FG"] == "reproduces"
    paths = rike2024.build_report(results, tmp_path)
    md = paths["markdown"].read_text()
    assert "| BP | NN | MNIST | SGD | 0.1 | 0 |" in md  # the paper's row, beside ours
    assert "0.332" in md and ">=4.0x" in md and "not in this study" in md
    assert paths["figure2_mnist_nn.png"].read_bytes().startswith(b"\x89PNG")
    assert "data:image/png;base64," in paths["html"].read_text()
