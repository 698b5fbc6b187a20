"""The ``bpfree`` command in-process: train, compare, report, spec parsing, one-line errors."""

from __future__ import annotations

import json
import math
import pathlib

import pytest

from bpfree import cli, runs
from bpfree import config as C
from bpfree.studies import compare
from report_checks import assert_self_contained

TASK = ["--task", "synthetic/mlp", "--set", "model.hidden=[8]", "--set", "data.num_train=200"]
EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "configs"
PNGS = ("val_vs_steps.png", "val_vs_time.png", "train_loss.png", "val_vs_flops.png", "accuracy_vs_memory.png",
        "memory_by_category.png")


def check_report(directory, labels):
    for name in ("report.md", "report.html", *PNGS):
        assert (directory / name).is_file(), name
    for png in PNGS:
        assert (directory / png).read_bytes().startswith(b"\x89PNG")
    md = (directory / "report.md").read_text()
    html = (directory / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(PNGS)
    assert_self_contained(html)
    for label in labels:
        assert f"| {label} |" in md and label in html
    assert "Gaussian blobs" in md  # the data source
    assert "## Comparable memory" in md and "GFLOP/step" in md and "estimate peak MB" in md
    assert "## Memory" in md and "Expected ordering" in md and "What dominates each peak" in md


def test_compare_then_report(tmp_path, capsys):
    out = tmp_path / "cmp"
    specs = "backprop,backprop:checkpoint=sqrt,forward_gradient:num_directions=2:jvp_clip=1,spsa:lr=1e-3,mezo"
    rc = cli.main(["compare", *TASK, "--estimators", specs, "--budget", "steps=6",
                   "--lr", "forward_gradient=2e-3", "--set", "train.eval_every_steps=3", "--out", str(out)])
    assert rc == 0
    assert "report.html" in capsys.readouterr().out
    labels = compare.split_top_level(specs, ",")
    check_report(out, labels)
    listing = json.loads((out / "compare.json").read_text())
    assert [r["label"] for r in listing["runs"]] == labels
    assert all(r["status"] == "completed" for r in listing["runs"])
    lrs = {r["label"]: r["lr"] for r in listing["runs"]}
    assert lrs["spsa:lr=1e-3"] == 1e-3 and lrs["forward_gradient:num_directions=2:jvp_clip=1"] == 2e-3
    assert lrs["backprop"] == C.default_lr("adam", "backprop")
    summaries = [runs.read_run(out / r["dir"]).summary for r in listing["runs"]]
    assert all(s["steps"] == 6 and s["budget"]["max_steps"] == 6 for s in summaries)
    # same initial weights and data: the first evaluation is identical for every estimator
    first_val = {runs.read_run(out / r["dir"]).evals[0]["loss"] for r in listing["runs"]}
    assert len(first_val) == 1

    for name in ("report.md", "report.html", *PNGS):
        (out / name).unlink()
    assert cli.main(["report", str(out)]) == 0
    check_report(out, labels)
    # individual run directories, report elsewhere
    assert cli.main(["report", str(out / "backprop"), str(out / "mezo"), "--out", str(tmp_path / "r2")]) == 0
    check_report(tmp_path / "r2", ["backprop", "mezo"])


def test_compare_from_config_file(tmp_path):
    cfg = tmp_path / "cmp.toml"
    cfg.write_text(
        """
[data]
name = "synthetic"
num_train = 200
[model]
name = "logreg"
[optimizer]
name = "sgd"
[train]
max_steps = 3
[compare]
estimators = ["backprop", "forward_gradient:num_directions=2"]
lr = { backprop = 0.05 }
"""
    )
    out = tmp_path / "out"
    assert cli.main(["compare", "--config", str(cfg), "--out", str(out), "--no-progress"]) == 0
    listing = json.loads((out / "compare.json").read_text())
    assert [(r["label"], r["lr"]) for r in listing["runs"]] == [
        ("backprop", 0.05),
        ("forward_gradient:num_directions=2", C.default_lr("sgd", "forward_gradient")),
    ]
    run_cfg = C.load(out / "backprop" / "config.toml")  # per-run config has no [compare] table
    assert run_cfg.compare == C.CompareConfig() and run_cfg.train.max_steps == 3
    # an existing comparison is not overwritten
    assert cli.main(["compare", "--config", str(cfg), "--out", str(out)]) == 2


def test_train_command(tmp_path, capsys):
    cfg = tmp_path / "t.toml"
    cfg.write_text('[data]\nname = "synthetic"\nnum_train = 200\n[model]\nname = "mlp"\nhidden = [4]\n'
                   "[train]\nmax_steps = 3\n")
    out = tmp_path / "run"
    assert cli.main(["train", str(cfg), "--set", "estimator.name=spsa", "--out", str(out)]) == 0
    assert "completed" in capsys.readouterr().out
    assert C.load(out / "config.toml").estimator.name == "spsa"
    assert cli.main(["train", str(cfg), "--out", str(out)]) == 2  # exists
    assert cli.main(["train", str(cfg), "--set", "optimizer.name=sgd", "--set", "optimizer.lr=1e12",
                     "--set", "train.max_steps=60", "--out", str(tmp_path / "div")]) == 1
    assert runs.read_run(tmp_path / "div").summary["status"] == "diverged"
    assert cli.main(["report", str(tmp_path / "div")]) == 0  # a diverged run still reports


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["compare", *TASK, "--estimators", "backprop,forwrd_gradient"], "did you mean 'forward_gradient'"),
        (["compare", *TASK, "--estimators", "spsa:epss=1"], "did you mean 'estimator.eps'"),
        (["compare", *TASK, "--set", "optimizer.lrr=1"], "did you mean 'optimizer.lr'"),
        (["compare", *TASK, "--budget", "stepz=3"], "--budget expects"),
        (["compare", *TASK, "--lr", "spsa=fast"], "--lr expects"),
        (["compare", "--task", "synthetic"], "DATA/MODEL"),
        (["compare", "--task", "cifar10/mlp", "--estimators", "backprop"], "CIFAR-10 not found"),
        (["report", "does/not/exist"], "does not exist"),
    ],
)
def test_errors_are_one_line_exit_2(tmp_path, monkeypatch, capsys, argv, needle):
    monkeypatch.setenv("BPFREE_DATA", str(tmp_path / "no-data"))
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("bpfree: error: ") and err.count("\n") == 1
    assert needle in err and "Traceback" not in err


def test_unknown_key_in_config_file_exit_2(tmp_path, capsys):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[train]\nmax_steps = 3\nlearning_rate = 0.1\n")
    assert cli.main(["train", str(cfg)]) == 2
    assert "unknown config key 'train.learning_rate'" in capsys.readouterr().err


def test_spec_parsing():
    s = compare.parse_spec("forward_gradient:num_directions=16:jvp_clip=1:lr=1e-4:schedule.decay=1e-5")
    assert (s.name, s.options, s.lr, s.overrides) == (
        "forward_gradient",
        {"num_directions": 16, "jvp_clip": 1},
        1e-4,
        {"schedule.decay": 1e-5},
    )
    assert compare.parse_spec("backprop:checkpoint=sqrt").options == {"checkpoint": "sqrt"}
    specs = compare.parse_specs('backprop:checkpoint=["0", "2"],spsa:eps=1e-3')
    assert [s.options for s in specs] == [{"checkpoint": ["0", "2"]}, {"eps": 1e-3}]
    assert specs[0].dirname == "backprop-checkpoint=-0-2"
    with pytest.raises(C.ConfigError, match="share a run directory"):
        compare.parse_specs("spsa,spsa")
    with pytest.raises(C.ConfigError, match="KEY=VALUE"):
        compare.parse_spec("spsa:eps")
    with pytest.raises(C.ConfigError, match="did you mean 'optimizer.lr'"):
        compare.parse_spec("spsa:optimizer.lrr=1")


def test_budget_parsing():
    assert compare.parse_budget("steps=10") == {"train.max_steps": 10, "train.max_seconds": None, "train.epochs": None}
    both = compare.parse_budget("epochs=2,seconds=1.5")
    assert both["train.epochs"] == 2 and both["train.max_seconds"] == 1.5 and both["train.max_steps"] is None
    for bad in ("steps=0", "steps=1.5", "minutes=3", "steps"):
        with pytest.raises(C.ConfigError):
            compare.parse_budget(bad)


def test_lr_precedence():
    base = C.from_dict({"train": {"max_steps": 1}, "compare": {"lr": {"spsa": 1.0, "mezo": 2.0}}})
    specs = compare.parse_specs("spsa,spsa:eps=1e-2,spsa:lr=3.0,mezo,backprop")
    planned = compare.plan(base, specs, {"spsa:eps=1e-2": 4.0, "mezo": 5.0})
    assert [cfg.optimizer.lr for _, cfg in planned] == [1.0, 4.0, 3.0, 5.0, C.default_lr("adam", "backprop")]
    assert all(math.isclose(cfg.schedule.decay, 0.0) for _, cfg in planned)


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.toml")), ids=lambda p: p.name)
def test_example_compare_configs_plan(path):
    base = C.load(path)
    if base.compare.estimators:
        planned = compare.plan(base, compare.parse_specs(list(base.compare.estimators)))
        assert len({cfg.run.name for _, cfg in planned}) == len(planned)


def test_measure_prints_and_writes_the_table(tmp_path, capsys):
    out = tmp_path / "m"
    code = cli.main(["measure", *TASK, "--estimators", "backprop,forward_gradient:num_directions=2,mezo:estimator.lr=1e-6",
                 "--repeats", "2", "--cosine-draws", "2", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    labels = ["backprop", "forward_gradient:num_directions=2", "mezo:estimator.lr=1e-6"]
    for label in labels:
        assert f"| {label} |" in printed
    rows = json.loads((out / "measure.json").read_text())["rows"]
    assert [r["label"] for r in rows] == labels
    assert rows[2]["options"] == {"lr": 1e-6} and rows[2]["mb_gradients"] == 0  # update mode: no .grad
    assert rows[0]["time_ratio"] == 1.0 and rows[0]["cosine_mean"] > 0.999
    # backprop > 2 forwards; K=2 tangents in one pass: one primal plus two (cheaper) tangent passes
    assert rows[0]["flops_forward_equivalents"] > 2 and 1 < rows[1]["flops_forward_equivalents"] < 3
    assert (out / "measure.csv").read_text().count("\n") == 4


def test_probe_cli_and_its_errors(tmp_path, capsys):
    out = tmp_path / "p"
    code = cli.main(["probe", "--data", "synthetic", "--estimators", "forward_gradient", "--widths", "8,16",
                 "--depths", "1", "--ks", "1,2", "--samples", "3", "--out", str(out)])
    assert code == 0 and (out / "cosine_vs_width.png").is_file()
    assert cli.main(["probe", "--estimators", "forward_gradeint", "--out", str(tmp_path / "x")]) == 2
    assert "did you mean 'forward_gradient'" in capsys.readouterr().err
    assert cli.main(["probe", "--widths", "a,b", "--out", str(tmp_path / "y")]) == 2
