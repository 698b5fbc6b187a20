"""Start several processes at the same instant: each imports everything, says it is ready,
then waits for one "go" file, so that their first storage access collides for real.

No wait here has a deadline a dead process could never meet: while waiting for the
processes to get ready, one that exits fails the test at once with its output.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

LAUNCHER = r"""
import os, sys, time
ready, go, mode, *argv = sys.argv[1:]
from bpfree import cli
from bpfree.studies import sweep
import optuna  # noqa: F401  (imported before the barrier, like everything else)
if mode == "claim":  # connect first, so that the claims themselves collide
    import json
    storage = sweep.open_storage(argv[0])
    study = optuna.load_study(study_name=argv[1], storage=storage)
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.001)
if mode == "claim":
    claimed = []
    while (trial := sweep._claim_waiting(study)) is not None:
        claimed.append(trial.number)
    print("claimed", json.dumps(claimed))
    sweep.close_storage(storage)
    sys.exit(0)
if mode == "open-storage":
    sweep.close_storage(sweep.open_storage(argv[0]))
    sys.exit(0)
sys.exit(cli.main(argv))
"""


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}


def run_together(tmp: Path, commands: list[tuple[str, list[str]]]) -> list[str]:
    """Run each ``(mode, argv)`` ("open-storage" [URL], "claim" [URL, study name]: claim
    WAITING trials until none is left, printing ``claimed [numbers]``, or "cli" [bpfree argv]) in its own
    process, released together; return their outputs, failing (with them) unless all exit 0."""
    tmp.mkdir(parents=True, exist_ok=True)
    launcher = tmp / "launcher.py"
    launcher.write_text(LAUNCHER)
    go = tmp / "go"
    procs, logs, ready = [], [], []
    for i, (mode, argv) in enumerate(commands):
        logs.append(tmp / f"proc{i}.log")
        ready.append(tmp / f"ready{i}")
        with open(logs[-1], "w") as f:
            procs.append(subprocess.Popen([sys.executable, str(launcher), str(ready[-1]), str(go), mode, *argv],
                                          env=env(), stdout=f, stderr=subprocess.STDOUT))
    try:
        while not all(r.exists() for r in ready):
            for p, log in zip(procs, logs):
                if p.poll() is not None:
                    pytest.fail(f"a process exited (code {p.returncode}) before the start:\n{log.read_text()}")
            time.sleep(0.05)
        go.touch()
        for p in procs:
            p.wait()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    outputs = [log.read_text() for log in logs]
    failed = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode != 0]
    assert not failed, "\n\n".join(f"process {i} exited with {rc}:\n{outputs[i]}" for i, rc in failed)
    return outputs
