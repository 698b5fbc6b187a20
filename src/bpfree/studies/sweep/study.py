"""The study file and its search space: parsing, presets, grid points, and the resolved
config of each trial (``bpfree.studies.sweep``; the format is in ``docs/sweeps.md``)."""

from __future__ import annotations

import copy
import fnmatch
import itertools
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from bpfree import config as config_lib
from bpfree import data, paths
from bpfree.config import Config, ConfigError
from bpfree.studies import budget as budget_lib


BUDGET_KEYS = budget_lib.UNITS


SAMPLERS = ("grid", "tpe", "random")


OBJECTIVES = {"val_loss": ("final_val_loss", "minimize"), "val_accuracy": ("final_val_accuracy", "maximize")}


STUDY_KEYS = ("name", "title", "objective", "budget", "seeds", "search_seed", "sampler", "n_trials",
              "missing_data", "eval_every_steps", "default_preset", "description", "report")


METHOD_KEYS = ("set", "space", "tags", "sampler", "n_trials", "budget")


@dataclass(frozen=True)
class Method:
    """One method of a study: its fixed settings, search space, sampler and budget."""

    name: str
    set: dict[str, Any]
    space: dict[str, Any]
    tags: dict[str, Any]
    sampler: str
    n_trials: int | None
    budget: dict[str, float]


@dataclass(frozen=True)
class Study:
    """A parsed study file, with its preset (if any) applied."""

    name: str
    title: str
    objective: str
    seeds: tuple[int, ...]
    search_seed: int
    missing_data: str
    eval_every_steps: int | None
    base: dict[str, Any]
    methods: tuple[Method, ...]
    preset: str | None = None
    source: str = ""
    report: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    def method(self, name: str) -> Method:
        for m in self.methods:
            if m.name == name:
                return m
        raise ConfigError(f"study {self.name!r} has no method {name!r}; methods: {', '.join(self.names())}")

    def names(self) -> list[str]:
        return [m.name for m in self.methods]


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``update`` merged in: tables recursively, anything else replaced."""
    out = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_preset(raw: Mapping[str, Any], preset: str | None) -> dict[str, Any]:
    """The study dict with ``[preset.NAME]`` deep-merged onto it (``preset`` tables dropped).

    Inside a preset, ``method.PATTERN`` with ``*``/``?`` applies to every
    method whose name matches (``fnmatch``), in the preset's order.
    """
    presets = raw.get("preset", {})
    out = {k: copy.deepcopy(v) for k, v in raw.items() if k != "preset"}
    if preset is None:
        return out
    if preset not in presets:
        have = ", ".join(presets) or "(none)"
        raise ConfigError(f"the study has no preset {preset!r}; presets: {have}")
    patch = copy.deepcopy(presets[preset])
    method_patch = patch.pop("method", {})
    out = deep_merge(out, patch)
    methods = out.setdefault("method", {})
    for key, value in method_patch.items():
        targets = fnmatch.filter(list(methods), key) if any(c in key for c in "*?[") else [key]
        if not targets or (targets == [key] and key not in methods):
            raise ConfigError(f"preset {preset!r}: method {key!r} matches no method of the study")
        for name in targets:
            methods[name] = deep_merge(methods[name], value)
    return out


def load_study(path: str | Path, *, preset: str | None = None, overrides: Iterable[str] = ()) -> Study:
    """Read a study file, apply ``preset`` (else the study's ``default_preset``) and
    ``--set`` overrides (dotted config keys, applied to the base config of every method).

    A bare name such as ``rike2024`` that is not a file names a study shipped
    with bpfree (``bpfree/studies/configs/NAME.toml``).
    """
    path = Path(path)
    if not path.exists() and path.suffix == "" and len(path.parts) == 1:
        shipped = shipped_studies()
        if str(path) in shipped:
            path = shipped[str(path)]
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        names = ", ".join(shipped_studies()) or "(none)"
        raise ConfigError(f"study file {str(path)!r} does not exist (shipped studies, usable by name: {names})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    try:
        return from_dict(raw, preset=preset, overrides=overrides, source=str(path))
    except (TypeError, AttributeError, KeyError, IndexError, ZeroDivisionError, OverflowError) as e:
        # a value of the wrong kind that no specific check above named (e.g. a table where a list goes)
        raise ConfigError(f"{path}: a value has the wrong type or shape ({type(e).__name__}: {e}); "
                          "see docs/sweeps.md for the study file format") from None


def shipped_studies() -> dict[str, Path]:
    """``{name: path}`` of the study files shipped in ``bpfree/studies/configs``."""
    from importlib import resources

    folder = Path(str(resources.files("bpfree.studies") / "configs"))
    return {p.stem: p for p in sorted(folder.glob("*.toml"))}


def from_dict(
    raw: Mapping[str, Any], *, preset: str | None = None, overrides: Iterable[str] = (), source: str = "study"
) -> Study:
    """Build a :class:`Study` from the parsed TOML; every error names the key and the fix."""
    for key in raw:
        if key not in ("study", "base", "method", "preset"):
            raise ConfigError(f"{source}: unknown table [{key}]; a study file has [study], [base], [method.*], [preset.*]")
    preset = preset if preset is not None else raw.get("study", {}).get("default_preset")
    merged = apply_preset(raw, preset)
    s = merged.get("study", {})
    for key in s:
        if key not in STUDY_KEYS:
            raise ConfigError(f"{source}: unknown key study.{key}{_near(key, STUDY_KEYS)}")
    objective = s.get("objective", "val_loss")
    if not isinstance(objective, str) or objective not in OBJECTIVES:
        raise ConfigError(f"{source}: study.objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    missing = s.get("missing_data", "error")
    if not isinstance(missing, str) or missing not in ("error", "skip"):
        raise ConfigError(f"{source}: study.missing_data must be 'error' or 'skip', got {missing!r}")
    seeds = s.get("seeds", (1, 2, 3))
    seeds = tuple(seeds) if isinstance(seeds, (list, tuple)) else (seeds,)
    if not seeds or not all(isinstance(v, int) and not isinstance(v, bool) for v in seeds):
        raise ConfigError(f"{source}: study.seeds must be a non-empty list of integers, got {list(seeds)!r}")
    base = config_lib.apply_overrides(merged.get("base", {}), overrides)
    config_lib.from_dict(base, origin=f"{source} [base]")  # keys checked here, values per method
    methods = []
    paths.check_name(s.get("name") or Path(source).stem, f"{source}: study.name")
    for name, m in merged.get("method", {}).items():
        where = f"{source} [method.{name}]"
        paths.check_name(name, f"{source}: method name")
        for key in m:
            if key not in METHOD_KEYS:
                raise ConfigError(f"{where}: unknown key {key!r}{_near(key, METHOD_KEYS)}")
        sampler = m.get("sampler", s.get("sampler", "grid"))
        if sampler not in SAMPLERS:
            raise ConfigError(f"{where}: sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        n_trials = m.get("n_trials", s.get("n_trials"))
        if sampler != "grid" and not (isinstance(n_trials, int) and n_trials > 0):
            raise ConfigError(f"{where}: sampler {sampler!r} needs n_trials (a positive integer)")
        budget = parse_budget(m.get("budget", s.get("budget")), where)
        for key in ("set", "space", "tags"):
            if not isinstance(m.get(key, {}), Mapping):
                raise ConfigError(f"{where}: {key} must be a table, e.g. {key} = {{ \"optimizer.lr\" = 0.1 }}, "
                                  f"got {m[key]!r}")
        method = Method(name, dict(m.get("set", {})), dict(m.get("space", {})), dict(m.get("tags", {})),
                        sampler, n_trials, budget)
        for key in [*method.set, *method.space]:
            config_lib.check_key(key, origin=where)
        grid_points(method) if sampler == "grid" else None  # checks the space
        methods.append(method)
    if not methods:
        raise ConfigError(f"{source}: the study has no [method.NAME] tables")
    return Study(
        name=str(s.get("name") or Path(source).stem),
        title=str(s.get("title") or s.get("name") or Path(source).stem),
        objective=objective,
        seeds=seeds,
        search_seed=int(s.get("search_seed", 0)),
        missing_data=missing,
        eval_every_steps=s.get("eval_every_steps"),
        base=base,
        methods=tuple(methods),
        preset=preset,
        source=source,
        report=s.get("report"),
        raw=merged,
    )


def _near(key: str, valid: Sequence[str]) -> str:
    import difflib

    close = difflib.get_close_matches(key, list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else f"; valid keys: {', '.join(valid)}"


def parse_budget(budget: Any, where: str) -> dict[str, float]:
    """``{steps|epochs|seconds|flops: number}``: exactly one, positive (``bpfree.studies.budget``)."""
    return budget_lib.parse_table(budget, where)


def _encode(value: Any) -> Any:
    """A choice as optuna stores it: scalars as they are, lists/tables as ``"json:..."``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return "json:" + json.dumps(value, separators=(",", ":"))


def _decode(value: Any) -> Any:
    if isinstance(value, str) and value.startswith("json:"):
        return json.loads(value[5:])
    return value


def _axis(method: Method, key: str) -> list[Any]:
    """The grid values of one space entry (a list, or a range with ``num``)."""
    spec = method.space[key]
    if isinstance(spec, list):
        if not spec:
            raise ConfigError(f"[method.{method.name}] space {key!r} is an empty list")
        return [_encode(v) for v in spec]
    if isinstance(spec, Mapping) and "num" in spec:
        lo, hi, num, log = spec["low"], spec["high"], int(spec["num"]), bool(spec.get("log", False))
        if num == 1:
            return [lo]
        if log:
            return [float(lo * (hi / lo) ** (i / (num - 1))) for i in range(num)]
        return [lo + (hi - lo) * i / (num - 1) for i in range(num)]
    raise ConfigError(
        f"[method.{method.name}] space {key!r}: a grid needs a list of values or {{low, high, num}}, got {spec!r}"
    )


def grid_points(method: Method) -> list[dict[str, Any]]:
    """Every combination of the space's axes, in file order (encoded for optuna)."""
    keys = list(method.space)
    axes = [_axis(method, k) for k in keys]
    return [dict(zip(keys, combo)) for combo in itertools.product(*axes)]


def suggest(trial: Any, method: Method) -> dict[str, Any]:
    """Draw (or read back, for an enqueued trial) the trial's values; returns decoded values."""
    values = {}
    for key, spec in method.space.items():
        if isinstance(spec, list) or method.sampler == "grid":
            choice = trial.suggest_categorical(key, _axis(method, key))
        elif isinstance(spec, Mapping) and {"low", "high"} <= set(spec):
            lo, hi = spec["low"], spec["high"]
            if isinstance(lo, int) and isinstance(hi, int) and not spec.get("log", False):
                choice = trial.suggest_int(key, lo, hi, step=int(spec.get("step", 1)))
            else:
                choice = trial.suggest_float(key, float(lo), float(hi), log=bool(spec.get("log", False)),
                                             step=spec.get("step"))
        else:
            raise ConfigError(f"[method.{method.name}] space {key!r}: give a list or {{low, high[, log]}}, got {spec!r}")
        values[key] = _decode(choice)
    return values


def method_config(
    study: Study, method: Method, values: Mapping[str, Any], *, seed: int, budget: Mapping[str, Any] | None = None
) -> Config:
    """The resolved config of one trial: base, the method's ``set``, the trial's values, the seed
    and the ``train.*`` budget keys (``budget``; unset: the method's budget, FLOPs as one step)."""
    raw = deep_merge(study.base, {})
    cfg = config_lib.from_dict(raw, origin=f"{study.source} [base]")
    if budget is None:
        budget = budget_overrides(method, cfg, flops_per_step=lambda c: math.inf)
    fixed = {**method.set, **values, **budget, "train.seed": seed, "run.name": method.name}
    if study.eval_every_steps and "train.eval_every_steps" not in fixed:
        fixed["train.eval_every_steps"] = study.eval_every_steps
    cfg = config_lib.updated(cfg, fixed, origin=f"[method.{method.name}]")
    return config_lib.resolve(cfg)


def budget_overrides(method: Method, cfg: Config, flops_per_step: Callable[[Config], float] | None = None) -> dict:
    """The ``train.*`` budget keys of the method's budget (FLOPs → steps via one counted step)."""
    return budget_lib.train_overrides(method.budget, lambda: (flops_per_step or count_step_flops)(cfg))


def count_step_flops(cfg: Config) -> float:
    """FLOPs of one training estimate of ``cfg`` (model, estimator, batch size), counted on one batch."""
    import torch
    import torch.nn.functional as F

    from bpfree import estimators, models
    from bpfree.measure import flops

    d = cfg.data
    splits = data.load(d.name, val_fraction=d.val_fraction, seed=d.seed, root=d.root, download=d.download, **d.options)
    model = models.make(cfg.model.name, input_shape=splits.input_shape, num_classes=splits.num_classes,
                        seed=cfg.train.seed, **cfg.model.options)
    x, y = next(iter(data.batches(splits.train, d.batch_size, shuffle=False)))
    est = estimators.make(cfg.estimator.name, **cfg.estimator.options)
    out = flops.step_flops(est, model, lambda: F.cross_entropy(model(x), y), generator=torch.Generator().manual_seed(0))
    return float(out.step)
