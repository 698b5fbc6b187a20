"""Nothing outside ``--out`` is ever written or deleted (``bpfree.paths``).

Each test puts a "victim" file beside the output directory, tries a name or option that
would reach it, and checks the victim is untouched and the error names the problem.
"""

from __future__ import annotations

import json

import pytest

from bpfree import cli, paths, runs
from bpfree.config import ConfigError
from test_sweep import TINY, tiny

optuna = pytest.importorskip("optuna")

from bpfree.studies import sweep  # noqa: E402


@pytest.mark.parametrize("name", ["..", ".", "../victim", "../../victim", "/tmp/victim", "a/b", "", ".hidden",
                                  "-x", "a\\b", "x" * 200, "tab\tname"])
def test_unsafe_names_are_refused(name):
    with pytest.raises(ConfigError, match="cannot be used as a directory name"):
        paths.check_name(name, "method name")


@pytest.mark.parametrize("name", ["nn-sgd-bp", "fg_k=4", "mezo+lr", "v1.2", "A"])
def test_safe_names_pass(name):
    assert paths.check_name(name, "method name") == name


def test_safe_dirname_never_escapes():
    for text in ["..", "../../x", "/abs/path", ".hidden", "-", "spsa:eps=1e-3"]:
        d = paths.safe_dirname(text)
        assert paths.SAFE_NAME.fullmatch(d), (text, d)
    assert paths.safe_dirname("spsa:eps=1e-3") == "spsa-eps=1e-3"


def test_inside_refuses_symlinks_out(tmp_path):
    out, outside = tmp_path / "out", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    (out / "m").symlink_to(outside)
    with pytest.raises(ConfigError, match="outside the output directory"):
        paths.inside(out, "m", "trial-0000")
    assert paths.inside(out, "ok", "trial-0000") == out / "ok" / "trial-0000"


@pytest.mark.parametrize("method", ["../../victim", "/tmp/victim-abs", "..", "a/b"])
def test_sweep_method_names_that_are_paths_are_refused(tmp_path, method):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    study = tmp_path / "s.toml"
    study.write_text(TINY.replace("[method.bp]", f'[method."{method}"]') % {
        "steps": 2, "num_train": 50, "model": "logreg", "model_options": ""})
    out = tmp_path / "a" / "b" / "out"
    assert cli.main(["sweep", str(study), "--out", str(out), "--overwrite"]) == 2
    assert (victim / "precious.txt").read_text() == "keep me"
    assert not out.exists()


def test_sweep_overwrite_deletes_only_what_bpfree_wrote(tmp_path):
    out = tmp_path / "out"
    path = tiny(tmp_path, steps=2)
    s = sweep.load_study(path)
    sweep.run(s, out, methods=["bp"], report=False, log=lambda m: None)
    trial = out / "bp" / "trial-0000"
    assert runs.is_bpfree_run_dir(trial)
    (trial / "my-notes.txt").write_text("mine")  # the user's file inside a bpfree run directory
    (out / "bp" / "analysis.csv").write_text("mine")  # and beside the runs
    fake = out / "bp" / "trial-9999"  # looks like a trial, but bpfree did not write it
    fake.mkdir()
    (fake / "summary.json").write_text(json.dumps({"status": "completed"}))
    (out / "readme.txt").write_text("mine")
    sweep.clear(s, out)
    assert not (out / "sweep.db").exists()
    assert not (trial / "summary.json").exists() and not (trial / "metrics.csv").exists()
    assert (trial / "my-notes.txt").read_text() == "mine"
    assert (out / "bp" / "analysis.csv").read_text() == "mine"
    assert (fake / "summary.json").exists()
    assert (out / "readme.txt").read_text() == "mine"
    assert not (out / "bp" / "trial-0001").exists()  # bpfree's own run dirs are gone entirely


def test_second_overwrite_is_stopped_while_a_worker_holds_the_storage(tmp_path, capsys):
    out = tmp_path / "out"
    path = tiny(tmp_path, steps=2)
    s = sweep.load_study(path)
    sweep.run(s, out, methods=["bp"], report=False, log=lambda m: None)
    with sweep.worker_lock(out, exclusive=False):  # a worker is running on out
        with pytest.raises(ConfigError, match="another bpfree sweep worker is using"):
            sweep.run(s, out, methods=["bp"], overwrite=True, log=lambda m: None)
        assert cli.main(["sweep", str(path), "--out", str(out), "--methods", "bp", "--overwrite"]) == 2
        assert "another bpfree sweep worker is using" in capsys.readouterr().err
        assert (out / "sweep.db").is_file() and (out / "bp" / "trial-0000" / "summary.json").is_file()
    with sweep.worker_lock(out, exclusive=False), sweep.worker_lock(out, exclusive=False):
        pass  # workers share it
    sweep.clear(s, out)  # once no worker holds it, --overwrite proceeds
    assert not (out / "sweep.db").exists()


@pytest.mark.parametrize("command", ["train", "compare", "sweep", "measure", "probe", "report", "study"])
def test_a_non_empty_non_run_directory_is_refused(tmp_path, capsys, command):
    user = tmp_path / "my-project"
    user.mkdir()
    for name in ("config.toml", "metrics.csv"):
        (user / name).write_text("the user's own file")
    config = tmp_path / "c.toml"
    config.write_text('[data]\nname = "synthetic"\nnum_train = 50\n[model]\nname = "logreg"\n'
                      '[estimator]\nname = "backprop"\n[train]\nmax_steps = 2\nwarmup = false\nmeasure = false\n')
    argv = {
        "train": ["train", str(config), "--out", str(user)],
        "compare": ["compare", "--task", "synthetic/logreg", "--estimators", "backprop", "--budget", "steps=2",
                    "--out", str(user)],
        "sweep": ["sweep", str(tiny(tmp_path, steps=2)), "--methods", "bp", "--out", str(user)],
        "measure": ["measure", "--task", "synthetic/logreg", "--estimators", "backprop", "--repeats", "1",
                    "--out", str(user)],
        "probe": ["probe", "--data", "synthetic", "--estimators", "spsa", "--widths", "4", "--depths", "1",
                  "--ks", "1", "--samples", "2", "--out", str(user)],
        "report": ["report", str(tmp_path), "--out", str(user)],
        "study": ["study", "run", "wang2025", "--out", str(user)],
    }[command]
    overwrite = command in ("train", "compare", "sweep", "study")
    for extra in ([], ["--overwrite"]) if overwrite else ([],):
        assert cli.main(argv + extra) == 2
        err = capsys.readouterr().err
        assert "not a bpfree" in err and len(err.strip().splitlines()) == 1, err
        assert sorted(p.name for p in user.iterdir()) == ["config.toml", "metrics.csv"]
        assert all((user / n).read_text() == "the user's own file" for n in ("config.toml", "metrics.csv"))


def test_train_overwrite_refuses_a_summary_bpfree_did_not_write(tmp_path, capsys):
    user = tmp_path / "d"
    user.mkdir()
    (user / "summary.json").write_text('{"mine": true}')
    (user / "config.toml").write_text("mine")
    config = tmp_path / "c.toml"
    config.write_text('[data]\nname = "synthetic"\nnum_train = 50\n[model]\nname = "logreg"\n'
                      '[estimator]\nname = "backprop"\n[train]\nmax_steps = 2\nwarmup = false\nmeasure = false\n')
    assert cli.main(["train", str(config), "--out", str(user), "--overwrite"]) == 2
    assert (user / "config.toml").read_text() == "mine"
    # a bpfree run directory is replaced with --overwrite, as before
    run = tmp_path / "run"
    assert cli.main(["train", str(config), "--out", str(run)]) == 0
    assert cli.main(["train", str(config), "--out", str(run)]) == 2
    assert cli.main(["train", str(config), "--out", str(run), "--overwrite"]) == 0
    capsys.readouterr()


@pytest.mark.parametrize("value", ["../escape", "/abs", ".."])
def test_run_names_are_checked(value):
    from bpfree import config as C

    cfg = C.from_dict({"data": {"name": "synthetic"}, "model": {"name": "logreg"}, "train": {"max_steps": 1},
                       "run": {"name": value}})
    with pytest.raises(ConfigError, match="run.name"):
        C.resolve(cfg)


def test_compare_spec_overrides_cannot_name_paths():
    from bpfree import config as C
    from bpfree.studies import compare

    base = C.from_dict({"data": {"name": "synthetic", "num_train": 50}, "model": {"name": "logreg"},
                        "train": {"max_steps": 1}})
    with pytest.raises(ConfigError, match="run.name"):
        compare.plan(base, compare.parse_specs("backprop:run.name=../../x"))


def test_a_run_killed_before_its_first_summary_is_still_bpfree_s(tmp_path):
    """The window between a run directory's creation and its first full summary: a process
    killed there (a sweep worker SIGKILLed mid-start) leaves a directory that a retry with
    ``overwrite`` reuses instead of refusing as a stranger's (which lost a grid point)."""
    d = tmp_path / "run"
    writer = runs.RunWriter(d, "# config\n")
    writer.close()  # no write_summary: as if the process died right after creating the directory
    assert runs.is_bpfree_run_dir(d)
    runs.check_run_dir(d)  # no RunExistsError
    runs.RunWriter(d, "# config\n", overwrite=True).close()
