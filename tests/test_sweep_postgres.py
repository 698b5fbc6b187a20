"""Two ``bpfree sweep`` workers in parallel on one study in a real PostgreSQL server.

The fixture starts a throwaway server on localhost (``initdb`` + ``pg_ctl`` in
a temporary directory, trust authentication, a free port) and removes it
afterwards. PostgreSQL refuses to run as root, so under root the server runs
as the ``postgres`` system user (else ``nobody``) via ``runuser``. Without the
server binaries (``.ci/run`` installs Debian's ``postgresql`` package when it
is root) or the driver, the test skips and says why.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from test_sweep import REPO, grid_params, tiny

optuna = pytest.importorskip("optuna")
from optuna.trial import TrialState  # noqa: E402

from bpfree.studies import sweep  # noqa: E402


def _bindir() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(dirs[-1]).parent if dirs else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    pytest.importorskip("psycopg", reason="the PostgreSQL driver is missing: pip install 'bpfree[postgres]'")
    bindir = _bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found; as root, .ci/run installs them with "
                    "apt-get install postgresql")
    prefix: list[str] = []
    user = None
    if os.geteuid() == 0:  # postgres refuses root: run it as an unprivileged user
        for name in ("postgres", "nobody"):
            try:
                user = pwd.getpwnam(name)
                break
            except KeyError:
                continue
        if user is None or shutil.which("runuser") is None:
            pytest.skip("running as root without a 'postgres'/'nobody' user or runuser: cannot start PostgreSQL")
        prefix = ["runuser", "-u", user.pw_name, "--"]
    base = Path(tempfile.mkdtemp(prefix="bpfree-pg-", dir="/tmp"))
    os.chmod(base, 0o755)
    if user is not None:
        os.chown(base, user.pw_uid, user.pw_gid)
    datadir, port = base / "data", _free_port()
    run = lambda *cmd: subprocess.run([*prefix, *cmd], check=True, capture_output=True, text=True)  # noqa: E731
    try:
        run(str(bindir / "initdb"), "-D", str(datadir), "-U", "bpfree", "--auth=trust", "-E", "UTF8")
        run(str(bindir / "pg_ctl"), "-D", str(datadir), "-l", str(base / "server.log"), "-w", "-t", "60",
            "-o", f"-p {port} -k {base} -c listen_addresses=127.0.0.1", "start")
    except subprocess.CalledProcessError as e:
        shutil.rmtree(base, ignore_errors=True)
        pytest.fail(f"could not start PostgreSQL: {e.stderr or e.stdout}")
    try:
        yield f"postgresql://bpfree@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(datadir), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


class _Trials:
    """Trials read before the storage was closed, with the two accessors the test uses."""

    def __init__(self, trials):
        self.trials = trials

    def get_trials(self, states=None):
        return [t for t in self.trials if states is None or t.state in states]


def test_two_workers_share_one_study_in_postgres(tmp_path, postgres_url):
    path = tiny(tmp_path, steps=60, num_train=1000, model="mlp")
    study = sweep.load_study(path)
    grid = sorted(json.dumps(p, sort_keys=True) for p in sweep.grid_points(study.method("bp")))
    total = len(grid) + len(study.seeds)  # search trials + final re-runs of method bp
    cap = total // 2  # each worker may run half: the study completes only if both work
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    workers = [
        subprocess.Popen([sys.executable, "-m", "bpfree.cli", "sweep", str(path), "--methods", "bp",
                          "--storage", postgres_url, "--out", str(tmp_path / f"worker{i}"), "--n-trials", str(cap)],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in (1, 2)
    ]
    logs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n\n".join(logs)
    storage = sweep.open_storage(postgres_url)
    try:
        search = optuna.load_study(study_name="tiny/bp", storage=storage)
        final = optuna.load_study(study_name="tiny/bp/final", storage=storage)
        search_trials, final_trials = search.trials, final.trials
    finally:
        sweep.close_storage(storage)
    search, final = _Trials(search_trials), _Trials(final_trials)
    assert len(search.trials) == len(grid)  # no extra trial was created
    assert grid_params(search) == grid  # every grid point exactly once
    seeds = sorted(t.params["seed"] for t in final.get_trials(states=(TrialState.COMPLETE,)))
    assert seeds == list(study.seeds)
    pids = {t.user_attrs["bpfree:worker"]["pid"] for t in [*search.trials, *final.trials]}
    assert len(pids) == 2  # both workers ran trials
    # each worker's run directories hold only its own trials, together all of them
    dirs = {p.name for i in (1, 2) for p in (tmp_path / f"worker{i}" / "bp").glob("trial-*")}
    assert dirs == {f"trial-{t.number:04d}" for t in search.trials}
    for i in (1, 2):  # each worker wrote the results it saw when it stopped; the password is never written
        report = json.loads((tmp_path / f"worker{i}" / "sweep.json").read_text())
        assert report["storage"] == postgres_url


@pytest.mark.parametrize("round_", range(2))
def test_workers_started_together_on_a_fresh_database(tmp_path, postgres_url, round_):
    """Three workers released at the same instant on an empty PostgreSQL database (optuna's
    tables not yet created) all run, and the grid is covered once (optuna/optuna#1092)."""
    import psycopg

    from concurrent_start import run_together

    db = f"fresh_{round_}_{os.getpid()}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    url = postgres_url.rsplit("/", 1)[0] + f"/{db}"
    path = tiny(tmp_path, steps=3)
    study = sweep.load_study(path)
    run_together(tmp_path / "procs", [("cli", ["sweep", str(path), "--methods", "bp", "--storage", url,
                                               "--out", str(tmp_path / f"worker{i}")]) for i in range(3)])
    storage = sweep.open_storage(url)
    try:
        search = optuna.load_study(study_name="tiny/bp", storage=storage)
        final = optuna.load_study(study_name="tiny/bp/final", storage=storage)
        search_trials, final_trials = search.trials, final.trials
    finally:
        sweep.close_storage(storage)
    grid = sorted(json.dumps(p, sort_keys=True) for p in sweep.grid_points(study.method("bp")))
    assert grid_params(_Trials(search_trials)) == grid and len(search_trials) == len(grid)
    seeds = sorted(t.params["seed"] for t in final_trials if t.state == TrialState.COMPLETE)
    assert seeds == list(study.seeds) and len(final_trials) == len(study.seeds)
