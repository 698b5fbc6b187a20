"""The run record's schema (bpfree.schema) and the code provenance every record carries (bpfree.provenance)."""

import json
import subprocess
from pathlib import Path

import pytest

from bpfree import config as config_lib
from bpfree import provenance, report, runs, schema, train

REPO = Path(__file__).resolve().parents[1]


def tiny_config(**train_opts):
    return config_lib.from_dict({
        "data": {"name": "synthetic", "num_train": 64, "val_fraction": 0.25, "batch_size": 16},
        "model": {"name": "mlp", "hidden": [8]},
        "estimator": {"name": "forward_gradient"},
        "optimizer": {"name": "sgd", "lr": 0.01},
        "train": {"max_steps": 3, "eval_every_steps": 2, "progress": False, "warmup": False, **train_opts},
    })


@pytest.fixture(scope="module")
def measured_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("schema") / "run"
    summary = train.run(tiny_config(measure=True), out)
    return out, summary


def test_what_train_writes_fits_the_schema(measured_run):
    out, summary = measured_run
    on_disk = json.loads((out / "summary.json").read_text())
    schema.check(on_disk)  # every key declared, every value of its declared type
    assert on_disk["schema_version"] == schema.SCHEMA_VERSION
    # the measured cost fills every cost key, and the record names the code
    assert all(on_disk.get(k) is not None for k in ("flops_per_step", "peak_memory_mb", "estimate_peak_memory_mb"))
    assert set(schema.PROVENANCE_KEYS) <= set(on_disk)
    assert isinstance(summary, schema.Summary) and summary == on_disk


def test_every_key_train_writes_is_declared_and_none_is_left_unwritten(measured_run):
    out, _ = measured_run
    on_disk = json.loads((out / "summary.json").read_text())
    never_written = set(schema.SUMMARY_KEYS) - set(on_disk)
    # only keys that belong to other situations may be absent from a fresh, completed, measured run
    assert never_written <= {"resumed_at"}, never_written


def test_a_reader_of_an_undeclared_key_fails_loudly(measured_run):
    out, _ = measured_run
    s = runs.read_run(out).summary
    assert s.get("final_val_loss") is not None
    with pytest.raises(KeyError, match="'final_val_los' is not a declared summary.json key.*did you mean 'final_val_loss'"):
        s.get("final_val_los")
    with pytest.raises(KeyError, match="not a declared"):
        s["val_loss"]


def test_a_writer_of_an_undeclared_key_or_wrong_type_is_refused():
    with pytest.raises(schema.SchemaError, match="key 'val_loss' is not declared"):
        schema.summary_record({"status": "completed", "val_loss": 1.0})
    with pytest.raises(schema.SchemaError, match="steps must be int, got str"):
        schema.summary_record({"status": "completed", "steps": "3"})
    with pytest.raises(schema.SchemaError, match="steps must be int, got bool"):
        schema.check({"steps": True})
    schema.check({"final_val_loss": float("nan"), "steps": None})  # unknown / non-finite is allowed


def test_the_estimator_block_is_free_form():
    nested = {"name": "forward_gradient", "options": {"rank": 1}, "fallback": {"embedding": {"why": "dense rows"}}}
    assert schema.summary_record({"estimator": nested})["estimator"] == nested


def test_a_run_written_by_the_previous_version_still_loads_and_reports(measured_run, tmp_path):
    out, _ = measured_run
    old = tmp_path / "old"
    old.mkdir()
    for name in ("config.toml", "metrics.csv", "eval.csv"):
        (old / name).write_bytes((out / name).read_bytes())
    record = json.loads((out / "summary.json").read_text())
    for key in ("schema_version", "bpfree_commit", "bpfree_dirty"):  # what version 1 did not write
        record.pop(key)
    (old / "summary.json").write_text(json.dumps(record))
    run = runs.read_run(old)
    assert run.summary.version == 1 and run.summary.get("bpfree_commit") is None
    assert run.summary.get("final_val_loss") == record["final_val_loss"]
    written = report.build([old], tmp_path / "report")
    assert "commit unknown" in written["markdown"].read_text()


def test_a_newer_version_gets_a_one_line_error_naming_it(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"schema_version": 99, "status": "completed"}))
    with pytest.raises(schema.SchemaError) as e:
        runs.read_run(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "schema_version 99" in msg and "reads versions 1, 2" in msg


def test_the_schema_table_in_the_docs_is_current():
    doc = (REPO / "docs" / "runs.md").read_text()
    assert schema.describe() in doc, "docs/runs.md's summary.json table differs from bpfree.schema.describe()"


# ------------------------------------------------------------------ provenance


def test_provenance_names_this_checkout():
    v = provenance.code_version()
    import bpfree

    assert v["bpfree_version"] == bpfree.__version__
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if git.returncode != 0:
        pytest.skip("not a git checkout")
    # code_version() is read once per process; git_state() reads HEAD now, so a commit made
    # while the suite runs cannot make this fail
    commit, dirty = provenance.git_state(Path(bpfree.__file__).parent)
    assert commit == git.stdout.strip() and isinstance(dirty, bool)
    assert set(v) == {"bpfree_version", "bpfree_commit", "bpfree_dirty"} and len(v["bpfree_commit"]) == 40


def test_provenance_is_unknown_without_git_or_outside_a_checkout(tmp_path, monkeypatch):
    pkg = tmp_path / "site-packages" / "bpfree"
    pkg.mkdir(parents=True)
    assert provenance.git_state(pkg) == ("unknown", None)  # not in any work tree
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True, capture_output=True)
    assert provenance.git_state(pkg) == ("unknown", None)  # in someone else's repository, not src/bpfree
    assert provenance.git_state(tmp_path / "absent") == ("unknown", None)
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))  # no git on PATH
    assert provenance.git_state(REPO / "src" / "bpfree") == ("unknown", None)
    assert provenance.line({"bpfree_version": "0.1.0", "bpfree_commit": "unknown"}) == "bpfree 0.1.0, commit unknown"
    assert provenance.line({"bpfree_version": "0.1.0", "bpfree_commit": "a" * 40, "bpfree_dirty": True}) \
        == "bpfree 0.1.0, commit aaaaaaaaaaaa (uncommitted changes)"
