"""Which code produced a result: the bpfree version, its git commit and whether the checkout
had uncommitted changes.

Every record bpfree writes (``summary.json``, ``compare.json``, ``sweep.json``,
``study.json``) and every report carries :func:`code_version`, so a number in a table
can be traced to the code that made it, and tables that drift from the code can be told
apart (``docs/`` tables say which commit produced them).

The commit is read with ``git`` from the checkout the package was imported from, and only
when that checkout *is* bpfree's: the package directory must be ``<toplevel>/src/bpfree`` of
the work tree ``git`` reports (a package installed into site-packages inside some other
repository would otherwise report that repository's commit). Without ``git``, outside a
checkout, or on any git error the commit is ``"unknown"`` and the dirty flag ``None``:
this never raises. ``dirty`` counts modified tracked files only (``git status --porcelain
--untracked-files=no``): run directories and other untracked files do not make code dirty.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path
from typing import Any

UNKNOWN = "unknown"


def _git(args: list[str], cwd: Path) -> str | None:
    """``git args`` in ``cwd``: its stdout stripped, or None on any failure (no git, no repo, timeout)."""
    exe = shutil.which("git")
    if exe is None:
        return None
    try:
        done = subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state(package_dir: str | Path) -> tuple[str, bool | None]:
    """``(commit, dirty)`` of the bpfree checkout holding ``package_dir``, or ``("unknown", None)``."""
    package_dir = Path(package_dir).resolve()
    if not package_dir.is_dir():
        return UNKNOWN, None
    top = _git(["rev-parse", "--show-toplevel"], package_dir)
    if not top or Path(top).resolve() / "src" / "bpfree" != package_dir:
        return UNKNOWN, None
    commit = _git(["rev-parse", "HEAD"], package_dir)
    if not commit:
        return UNKNOWN, None
    status = _git(["status", "--porcelain", "--untracked-files=no"], package_dir)
    return commit, (None if status is None else bool(status))


@functools.lru_cache(maxsize=1)
def _installed() -> tuple[str, str, bool | None]:
    import bpfree

    commit, dirty = git_state(Path(bpfree.__file__).parent)
    return bpfree.__version__, commit, dirty


def code_version() -> dict[str, Any]:
    """``{"bpfree_version", "bpfree_commit", "bpfree_dirty"}`` of the running bpfree (read once
    per process)."""
    version, commit, dirty = _installed()
    return {"bpfree_version": version, "bpfree_commit": commit, "bpfree_dirty": dirty}


def line(record: Any = None) -> str:
    """``"bpfree 0.1.0, commit 1a2b3c4d5e6f (uncommitted changes)"`` of ``record``'s provenance keys
    (a mapping holding them), else of the running code."""
    v = dict(code_version() if record is None else record)
    commit = v.get("bpfree_commit") or UNKNOWN
    short = commit[:12] if commit != UNKNOWN else UNKNOWN
    dirty = v.get("bpfree_dirty")
    state = " (uncommitted changes)" if dirty else ""
    return f"bpfree {v.get('bpfree_version') or UNKNOWN}, commit {short}{state}"


__all__ = ["UNKNOWN", "code_version", "git_state", "line"]
