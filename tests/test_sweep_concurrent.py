"""Sweep storage under concurrent starts: workers released at the same instant on a fresh
``--out`` (SQLite) all run, and the grid is covered exactly once (PostgreSQL: test_sweep_postgres)."""

from __future__ import annotations

import json

import pytest

from concurrent_start import run_together
from test_sweep import grid_params, tiny

optuna = pytest.importorskip("optuna")
from optuna.trial import TrialState  # noqa: E402

from bpfree.studies import sweep  # noqa: E402


@pytest.mark.parametrize("round_", range(4))
def test_storage_creation_does_not_race(tmp_path, round_):
    """Six processes open one fresh SQLite storage at once (optuna/optuna#1092: without the
    creation lock some die with "UNIQUE constraint failed: alembic_version.version_num")."""
    url = sweep.default_storage(tmp_path)
    run_together(tmp_path / "procs", [("open-storage", [url])] * 6)
    storage = sweep.open_storage(url)
    try:
        assert optuna.get_all_study_summaries(storage) == []
    finally:
        sweep.close_storage(storage)


@pytest.mark.parametrize("round_", range(2))
def test_workers_started_together_cover_the_grid_once(tmp_path, round_):
    path = tiny(tmp_path, steps=3)
    out = tmp_path / "out"
    argv = ["sweep", str(path), "--methods", "bp", "--out", str(out)]
    run_together(tmp_path / "procs", [("cli", argv)] * 3)
    study = sweep.load_study(path)
    storage = sweep.open_storage(sweep.default_storage(out))
    try:
        search = optuna.load_study(study_name="tiny/bp", storage=storage)
        final = optuna.load_study(study_name="tiny/bp/final", storage=storage)
        grid = sorted(json.dumps(p, sort_keys=True) for p in sweep.grid_points(study.method("bp")))
        assert grid_params(search) == grid and len(search.trials) == len(grid)
        seeds = sorted(t.params["seed"] for t in final.get_trials(states=(TrialState.COMPLETE,)))
        assert seeds == list(study.seeds) and len(final.trials) == len(study.seeds)
    finally:
        sweep.close_storage(storage)



def test_each_waiting_trial_is_claimed_by_one_worker(tmp_path):
    """SQLite ignores optuna's ``FOR UPDATE``: without :func:`sweep.claim_lock` two workers read
    the same WAITING trial and both flip it to RUNNING, both train it, and the second ``tell``
    fails (UpdateFinishedTrialError: the flake of test_cli_workers_share_the_default_sqlite_storage).
    Without the lock, four processes claiming 24 trials double-claimed in 3 of 3 tries."""
    url = sweep.default_storage(tmp_path)
    storage = sweep.open_storage(url)
    try:
        study = optuna.create_study(study_name="race", storage=storage)
        for i in range(24):
            study.enqueue_trial({"x": i})
    finally:
        sweep.close_storage(storage)
    outputs = run_together(tmp_path / "procs", [("claim", [url, "race"])] * 4)
    claimed = [n for out in outputs for n in json.loads(out.split("claimed ", 1)[1])]
    assert sorted(claimed) == list(range(24)), "a trial was claimed twice (or never)"
