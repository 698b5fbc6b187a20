"""Where bpfree may write: names that become paths, output directories, what ``--overwrite`` removes.

One place for the rules every command follows, so that no name or option makes
bpfree write or delete outside the output directory the user gave:

* **Names** that become path components (method, run, study names, spec
  directory names) use a safe character set — letters, digits and ``._=+-``,
  not starting with ``.`` or ``-`` (so never ``.`` or ``..``), at most 128
  characters — and are checked by :func:`check_name`.
* **Paths** built from them are resolved (symlinks followed) and must lie
  under the resolved output directory (:func:`inside`).
* **Output directories**: a non-empty directory is used only when it already
  holds what bpfree writes there (:func:`check_output_dir`); anything else is
  refused, so a user's own folder is never filled or overwritten.
* **Deleting** (``--overwrite``): only files bpfree itself writes, by name,
  and directories left empty by that (:func:`remove_written`); a directory
  holding anything else keeps it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

from bpfree.config import ConfigError

SAFE_NAME = re.compile(r"[A-Za-z0-9_=+][A-Za-z0-9._=+-]{0,127}")
SAFE_CHARS = "letters, digits and . _ = + - (not starting with '.' or '-', at most 128 characters)"


def check_name(name: object, what: str) -> str:
    """``name`` if it is a safe single path component, else a ``ConfigError`` naming the fix."""
    text = str(name)
    if not SAFE_NAME.fullmatch(text):
        raise ConfigError(f"{what} {text!r} cannot be used as a directory name: use {SAFE_CHARS}")
    return text


def safe_dirname(text: str, fallback: str = "run") -> str:
    """``text`` made a safe name: runs of other characters become ``-``; a leading ``.``/``-`` is dropped."""
    name = re.sub(r"[^A-Za-z0-9._=+-]+", "-", text).lstrip(".-").rstrip("-")[:128]
    return name if SAFE_NAME.fullmatch(name) else fallback


def inside(root: str | Path, *parts: str) -> Path:
    """``root / parts...``, after checking that it resolves to a path under ``root``."""
    base = Path(root).resolve()
    path = Path(root).joinpath(*parts)
    resolved = path.resolve()
    if resolved != base and base not in resolved.parents:
        raise ConfigError(f"{path} resolves to {resolved}, outside the output directory {base}; "
                          "use a plain name (no '..', no absolute path, no symlink out)")
    return path


def check_output_dir(path: str | Path, kind: str, markers: Iterable[str]) -> None:
    """Refuse ``path`` when it is a file, or a non-empty directory holding none of ``markers``
    (the files by which bpfree recognises its own ``kind`` directory)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {path} is a file, not a directory; choose a new or empty directory")
    if not path.is_dir() or not any(path.iterdir()):
        return
    markers = tuple(markers)
    if not any((path / m).exists() for m in markers):
        raise ConfigError(
            f"--out {path} is a non-empty directory that is not a bpfree {kind} directory (it holds none of "
            f"{', '.join(markers)}); bpfree will not write into it: choose a new or empty directory"
        )


def remove_written(directory: Path, names: Iterable[str]) -> None:
    """Delete the files ``names`` in ``directory`` (never following a symlink out), then the
    directory itself if that left it empty."""
    for name in names:
        f = directory / name
        if f.is_symlink() or f.is_file():
            f.unlink()
    try:
        directory.rmdir()  # only when empty: anything that is not ours stays
    except OSError:
        pass
