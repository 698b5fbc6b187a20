"""Compare estimators on one task: same data, model initialisation, batch order and budget.

Each estimator is given as a **spec**::

    NAME[:KEY=VALUE]...          e.g.  forward_gradient:num_directions=16:jvp_clip=1
                                       backprop:checkpoint=sqrt
                                       spsa:eps=1e-3:lr=1e-5
                                       forward_gradient:optimizer.name=sgd:schedule.decay=1e-5

* a KEY without a dot is an option of the estimator (``estimators.option_names``),
  except ``lr``: the optimizer's learning rate for this estimator (an
  estimator option that is itself called ``lr``, MeZO's update mode, is
  reached as ``mezo:estimator.lr=1e-6``);
* a KEY with a dot is any config key, for this run only;
* VALUE is a TOML literal where it parses as one (``16``, ``1e-4``, ``true``,
  ``[1, 2]``), else a plain string (``sqrt``);
* a list of specs is separated by commas; commas inside ``[...]``, ``{...}``
  or quotes do not split. The spec text is the run's label; its directory
  name is the label with characters other than letters, digits and ``._=+-``
  replaced by ``-`` and a leading ``.`` or ``-`` dropped (``bpfree.paths``).

Learning rate of each run, first found: the spec's ``lr``; ``lrs[label]``;
``lrs[name]``, where ``lrs`` is the config's ``[compare] lr`` table updated by
``--lr``; the base config's ``optimizer.lr``; else
``bpfree.config.DEFAULT_LR`` for the optimizer and estimator.

Every run shares the base config's ``train.seed``, so the model starts from
the same weights and sees the same batches in the same order
(``bpfree.train``). The compare directory gets one run directory per spec,
``compare.json`` listing them, and the report (``bpfree.report``).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from bpfree import config as config_lib
from bpfree import data, paths, provenance, report, runs, train
from bpfree.config import Config, ConfigError
from bpfree.measure.profile import EstimatorSpec

BUDGET_KEYS = {"steps": "max_steps", "seconds": "max_seconds", "epochs": "epochs"}


@dataclass(frozen=True)
class Spec(EstimatorSpec):
    """One parsed estimator spec (see the module docstring): the measure layer's labelled
    estimator (``label`` = the spec's text, ``name``, ``options``; ``make()``) plus what a
    spec sets beyond the estimator: its ``lr`` and dotted config ``overrides``."""

    options: dict[str, Any] = field(default_factory=dict)
    lr: float | None = None
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.label

    @property
    def dirname(self) -> str:
        return paths.safe_dirname(self.text)


def split_top_level(text: str, sep: str) -> list[str]:
    """``text`` split at ``sep`` outside brackets, braces and quotes; parts stripped."""
    parts, depth, quote, current = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    parts.append("".join(current).strip())
    return parts


def parse_specs(text: str | Sequence[str]) -> list[Spec]:
    """Parse a comma-separated spec list (or a list of spec strings); labels must be unique."""
    items = split_top_level(text, ",") if isinstance(text, str) else list(text)
    specs = [parse_spec(t) for t in items if t.strip()]
    if not specs:
        raise ConfigError("no estimators to compare; give e.g. --estimators backprop,forward_gradient")
    seen: dict[str, str] = {}
    for s in specs:
        if s.dirname in seen:
            raise ConfigError(f"estimator specs {seen[s.dirname]!r} and {s.text!r} would share a run directory")
        seen[s.dirname] = s.text
    return specs


def parse_spec(text: str) -> Spec:
    """``"forward_gradient:num_directions=16:lr=1e-4"`` → :class:`Spec`."""
    name, *pairs = split_top_level(text.strip(), ":")
    if not name:
        raise ConfigError(f"estimator spec {text!r} has no estimator name (NAME[:KEY=VALUE]...)")
    options: dict[str, Any] = {}
    overrides: dict[str, Any] = {}
    lr = None
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"estimator spec {text!r}: expected KEY=VALUE after ':', got {pair!r}")
        parsed = config_lib.parse_value(value.strip())
        if key == "lr":
            if isinstance(parsed, bool) or not isinstance(parsed, (int, float)):
                raise ConfigError(f"estimator spec {text!r}: lr must be a number, got {value!r}")
            lr = float(parsed)
        elif "." in key:
            config_lib.check_key(key, origin=f"estimator spec {text!r}")
            overrides[key] = parsed
        else:
            options[key] = parsed
    return Spec(text.strip(), name, options, lr, overrides)


def parse_budget(text: str) -> dict[str, Any]:
    """``"steps=200"`` / ``"seconds=60"`` / ``"epochs=1"`` (comma-combinable: whichever ends
    first) → ``{"train.max_steps": 200, "train.epochs": None, ...}`` replacing the budget
    (``bpfree.studies.budget``)."""
    from bpfree.studies import budget

    return budget.train_overrides(budget.parse_text(text, "--budget", units=("steps", "seconds", "epochs")))


def plan(base: Config, specs: Sequence[Spec], lrs: Mapping[str, float] | None = None) -> list[tuple[Spec, Config]]:
    """The resolved config of each spec's run (errors in any spec surface here, before training)."""
    lrs = {**base.compare.lr, **(lrs or {})}
    if base.estimator.options:
        keys = ", ".join(f"estimator.{k}" for k in base.estimator.options)
        raise ConfigError(f"compare takes estimator options in the specs (NAME:KEY=VALUE), not as {keys}")
    planned = []
    for spec in specs:
        values: dict[str, Any] = {"estimator.name": spec.name, "run.name": spec.dirname, **spec.overrides}
        lr = spec.lr if spec.lr is not None else lrs.get(spec.label, lrs.get(spec.name))
        if lr is not None:
            values["optimizer.lr"] = lr
        values.update({f"estimator.{k}": v for k, v in spec.options.items()})
        try:
            cfg = config_lib.updated(base, values, origin=f"estimator spec {spec.text!r}")
            cfg = config_lib.resolve(dataclasses.replace(cfg, compare=config_lib.CompareConfig()))
        except ConfigError as e:
            msg = str(e)
            raise ConfigError(msg if spec.text in msg else f"estimator spec {spec.text!r}: {msg}") from None
        planned.append((spec, cfg))
    return planned


def run(
    base: Config,
    specs: Sequence[Spec],
    out_dir: str | Path,
    *,
    lrs: Mapping[str, float] | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train every spec on ``base``'s task, write ``compare.json`` and the report.

    A run that fails (e.g. a model an estimator cannot handle) is recorded as
    ``failed`` and the comparison goes on; Ctrl-C stops it after writing the
    report of what ran. Config and data errors stop it before anything runs.
    Returns the ``compare.json`` content (plus ``"report"``: the report paths).
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    planned = plan(base, specs, lrs)
    out = Path(out_dir)
    if runs.is_compare_dir(out) and not overwrite:
        raise runs.RunExistsError(f"{out} already holds a comparison; choose another --out, or pass --overwrite")
    paths.check_output_dir(out, "compare", ["compare.json"])
    for spec, _ in planned:
        paths.inside(out, spec.dirname)
    checked = set()
    for _, cfg in planned:  # a missing data set fails here, before anything is written
        d = cfg.data
        if repr(d) not in checked:
            data.load(d.name, val_fraction=d.val_fraction, seed=d.seed, root=d.root, download=d.download, **d.options)
            checked.add(repr(d))
    first = planned[0][1]
    record: dict[str, Any] = {
        "task": f"{first.data.name}/{first.model.name}",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **provenance.code_version(),
        "budget": {k: getattr(first.train, k) for k in BUDGET_KEYS.values()},
        "seed": first.train.seed,
        "runs": [
            {
                "label": spec.label,
                "dir": spec.dirname,
                "estimator": cfg.estimator.name,
                "options": cfg.estimator.options,
                "optimizer": cfg.optimizer.name,
                "lr": cfg.optimizer.lr,
                "status": "pending",
            }
            for spec, cfg in planned
        ],
    }
    out.mkdir(parents=True, exist_ok=True)
    runs.write_json(out / "compare.json", record)
    for i, ((spec, cfg), entry) in enumerate(zip(planned, record["runs"]), 1):
        log(f"[{i}/{len(planned)}] {spec.label} (lr {cfg.optimizer.lr:g}) -> {out / spec.dirname}")
        try:
            summary = train.run(cfg, paths.inside(out, spec.dirname), label=spec.label, overwrite=overwrite)
        except (ConfigError, data.DatasetNotFoundError, runs.RunExistsError):
            raise
        except KeyboardInterrupt:  # before the run's loop started (e.g. while loading data)
            summary = {"status": "interrupted", "steps": 0}
        except Exception as e:  # recorded in the run's summary.json and error.txt
            summary = {"status": "failed", "reason": f"{type(e).__name__}: {e}"}
        entry["status"] = summary["status"]
        runs.write_json(out / "compare.json", record)
        log(f"    {_one_line(summary)}")
        if summary["status"] == "interrupted":
            for later in record["runs"][i:]:
                later["status"] = "not started (interrupted)"
            log("interrupted: writing the report of the runs so far")
            break
    record["report"] = {k: str(v) for k, v in report.build([out], out).items()}
    runs.write_json(out / "compare.json", record)
    return record


def _one_line(s: Mapping[str, Any]) -> str:
    if s.get("status") in ("failed",):
        return f"failed: {s.get('reason')}"
    acc = s.get("final_val_accuracy")
    ms = s.get("ms_per_step")
    parts = [s.get("status", "?"), f"{s.get('steps')} steps"]
    if acc is not None:
        parts.append(f"val acc {100 * acc:.2f}%")
    if ms is not None:
        parts.append(f"{ms:.2f} ms/step")
    if s.get("reason"):
        parts.append(str(s["reason"]))
    return ", ".join(parts)
