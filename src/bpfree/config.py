"""Run configuration: TOML files read into frozen dataclasses.

A config has one table per concern::

    [data]       name, val_fraction, seed, batch_size, eval_batch_size, root, download,
                 then the data set's own options (e.g. num_train = 500 for synthetic)
    [model]      name, then the model's own options (e.g. hidden = [1024, 1024])
    [estimator]  name, then the estimator's own options (e.g. num_directions = 16)
    [optimizer]  name (sgd | nesterov | adam | adamw), lr, momentum, betas, eps, weight_decay
    [schedule]   decay                      (lr_t = lr · exp(−decay · t), see ScheduleConfig)
    [train]      epochs, max_steps, max_seconds, clip_grad_norm, eval_every_steps, seed, device,
                 warmup, measure, progress, save_model, save_best, checkpoint_every_steps,
                 checkpoint_every_seconds, keep_checkpoint, divergence_factor, divergence_bound
    [run]        out, name
    [compare]    estimators, lr             (only read by ``bpfree compare``)

* :func:`load` reads a file (plus ``--set`` overrides), :func:`from_dict`
  builds a :class:`Config` from nested dicts; every unknown key is a
  :class:`ConfigError` naming the nearest valid key (``difflib``).
* :func:`resolve` fills in every default that depends on other keys (the
  learning rate from :data:`DEFAULT_LR`, momentum and weight decay per
  optimizer, the estimator's options with their defaults, the device, the run
  name) and checks ranges. A resolved config, written by :func:`to_toml`,
  reproduces the run exactly: ``load(write(resolve(c))) == resolve(c)``.
* TOML has no null: an unset optional key (``None``) is written as a comment
  and read back as its default. ``--set train.max_steps=none`` unsets one.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import tomllib
import types
import typing
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

__all__ = [
    "Config",
    "ConfigError",
    "DEFAULT_LR",
    "apply_overrides",
    "default_lr",
    "from_dict",
    "load",
    "parse_override",
    "parse_value",
    "resolve",
    "to_dict",
    "to_toml",
    "updated",
    "write",
]


class ConfigError(ValueError):
    """A config key or value is wrong; the message says which and what is valid."""


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class DataConfig:
    """Which data set and how it is split and batched (``bpfree.data.load``).

    Keys of ``[data]`` other than these fields are the data set's own options
    (``bpfree.data.option_names(name)``, e.g. ``num_train`` for ``synthetic``).
    """

    name: str = "synthetic"
    val_fraction: float = 0.1
    seed: int = 0  # the train/val split only; the batch order is drawn from train.seed
    batch_size: int = 64
    eval_batch_size: int = 1000
    root: str | None = None
    download: bool = False
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelConfig:
    """``bpfree.models.make(name, **options)``; options are the other keys of ``[model]``."""

    name: str = "mlp"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EstimatorConfig:
    """``bpfree.estimators.make(name, **options)``; options are the other keys of ``[estimator]``."""

    name: str = "backprop"
    options: dict[str, Any] = field(default_factory=dict)


OPTIMIZERS = ("sgd", "nesterov", "adam", "adamw")


@dataclass(frozen=True)
class OptimizerConfig:
    """A ``torch.optim`` optimizer. ``nesterov`` is ``SGD(nesterov=True)``.

    Unset values are resolved per optimizer: ``lr`` from :data:`DEFAULT_LR`,
    ``momentum`` 0 for sgd and 0.9 for nesterov (it must be > 0 there),
    ``weight_decay`` 0.01 for adamw (torch's default) and 0 otherwise.
    ``momentum`` is an error for adam/adamw (their momentum is ``betas[0]``).
    """

    name: str = "adam"
    lr: float | None = None
    momentum: float | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float | None = None


@dataclass(frozen=True)
class ScheduleConfig:
    """Exponential learning-rate decay per optimizer step.

        lr_t = lr · exp(−decay · t),   t = optimizer steps taken so far (0, 1, 2, ...)

    This is the schedule of Baydin et al. (2022), η_i = η_0 e^{−ik} with i the
    iteration, which seed 002 (Rike & Førland) reproduces; its Table I column
    "decay" is k. For example decay = 1e-5 over seed 002's 50 epochs of MNIST
    at batch 64 (≈ 42,200 steps with a 10% validation split) ends at
    lr · e^{−0.42} ≈ 0.66 lr; decay = 0 (the default) keeps lr constant.
    """

    decay: float = 0.0


@dataclass(frozen=True)
class TrainConfig:
    """Budget, clipping, evaluation, randomness and device of the loop (``bpfree.train``).

    The run stops at whichever budget ends first: ``epochs`` (passes over the
    training split), ``max_steps`` (optimizer steps) or ``max_seconds``
    (training wall time, evaluation excluded); at least one must be set.
    ``clip_grad_norm`` clips the estimated gradient's total 2-norm before each
    step (``torch.nn.utils.clip_grad_norm_``). Validation runs after every
    epoch, and every ``eval_every_steps`` steps if set. ``seed`` seeds the
    model initialisation, the batch order (identical for every estimator) and
    the estimator's generator (via its ``seed`` option). ``device = "auto"``
    picks CUDA when available. ``warmup`` runs one untimed estimate on a copy
    of the model before training, so one-off first-call costs (e.g. loading
    forward-AD decompositions) do not count in ms/step, wall time or
    ``max_seconds``; it costs one extra copy of the parameters. ``measure``
    also records, on that copy, the FLOPs and the peak memory by category of
    one training step (``bpfree.measure``) in ``summary.json``. ``save_model``
    writes the final parameters to ``model.pt`` in the run directory
    (``torch.save`` of the ``state_dict``), also when the run diverged or was
    interrupted; ``save_best`` writes ``best.pt`` whenever the validation loss
    reaches a new low (``bpfree.runs.load(DIR, weights="best")`` reads it).
    ``accumulate = n`` averages the estimates of n consecutive
    minibatches before each optimizer step (``bpfree.estimators.accumulate``;
    every estimator, backprop included); steps count optimizer steps, and an
    epoch's last step averages what is left. ``eval_train_examples = n``
    evaluates the training split at the end on n examples (a fixed sample,
    drawn with ``seed``) instead of all of it: on a transformer the whole split
    can take longer than the training (MiniLM-L6, 30.9k tweets); the summary
    records how many were used (``train_eval_examples``).
    """

    epochs: int | None = None
    max_steps: int | None = None
    max_seconds: float | None = None
    clip_grad_norm: float | None = None
    eval_every_steps: int | None = None
    seed: int = 0
    device: str = "auto"
    warmup: bool = True
    measure: bool = True
    progress: bool = True
    save_model: bool = False
    accumulate: int = 1
    save_best: bool = False
    checkpoint_every_steps: int | None = None
    checkpoint_every_seconds: float | None = 600.0
    keep_checkpoint: bool = False
    divergence_factor: float = 100.0
    divergence_bound: float | None = None
    eval_train_examples: int | None = None


@dataclass(frozen=True)
class RunConfig:
    """Where the run directory goes: ``{out}/{name}`` unless the CLI is given ``--out``.

    ``name`` defaults to ``{data}-{model}-{estimator}``; it is one directory
    name (``bpfree.paths.SAFE_CHARS``), never a path.
    """

    out: str = "runs"
    name: str | None = None


@dataclass(frozen=True)
class CompareConfig:
    """What ``bpfree compare --config`` runs: estimator specs and per-spec learning rates.

    ``estimators`` holds specs like ``"forward_gradient:num_directions=16"``
    (syntax in ``bpfree.studies.compare``); ``lr`` maps a spec label or an
    estimator name to its learning rate.
    """

    estimators: tuple[str, ...] = ()
    lr: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Config:
    """A whole run configuration; see the module docstring for the tables."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)


SECTIONS: dict[str, type] = {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}
# Sections whose keys other than their fields are the options of the named data set, model
# or estimator; :func:`resolve` checks them against that factory's signature.
OPEN_SECTIONS = ("data", "model", "estimator")

# --------------------------------------------------------------------------- default learning rates

# Learning rate used when ``optimizer.lr`` is unset, by (optimizer family, estimator).
# Why these values: an estimate with random directions has the exact gradient as its
# mean but a second moment about N/K times larger (N parameters, K directions;
# ``bpfree.estimators.theory``), so plain SGD needs a step ~100x smaller than for
# backprop to stay stable; Adam normalises the step size, so its rates differ less, but
# most of each noisy step is noise. Sources (seed 002 = Rike & Førland, Table I, the
# 784-1024-1024-10 MLP on MNIST, batch 64, tuned on a validation split):
#   sgd family:  backprop 0.1 and forward gradient 4.64e-4, seed 002's tuned SGD values.
#   adam family: backprop 1e-3, Adam's usual default (Kingma & Ba 2015; seed 002 tuned
#                1e-4 for 50 epochs); forward gradient 5e-4, seed 002's tuned Adam value.
# SPSA and MeZO estimate the same directional derivatives (up to O(eps^2)) with the same
# variance, so they get the forward-gradient values; so does any estimator missing from
# the table ("*"). These are starting points, not tuned results: tune per task and budget
# (configs/demo.toml records a sweep) before drawing conclusions.
# Guessed gradients (activity perturbation, W^T, W-perp, W-perp-NS, W^P): seed 001
# (Wang, Markou, Campbell 2025) trains all of them with AdamW at 1e-4; with SGD they get
# the forward-gradient value (untuned).
_GUESSED = ("activity_perturbation", "wt_guess", "w_perp", "w_perp_ns", "w_p")
DEFAULT_LR: dict[str, dict[str, float]] = {
    "sgd": {"backprop": 0.1, "forward_gradient": 4.64e-4, "spsa": 4.64e-4, "mezo": 4.64e-4,
            **dict.fromkeys(_GUESSED, 4.64e-4), "*": 4.64e-4},
    "adam": {"backprop": 1e-3, "forward_gradient": 5e-4, "spsa": 5e-4, "mezo": 5e-4,
             **dict.fromkeys(_GUESSED, 1e-4), "*": 5e-4},
}
_FAMILY = {"sgd": "sgd", "nesterov": "sgd", "adam": "adam", "adamw": "adam"}


def default_lr(optimizer: str, estimator: str) -> float:
    """The learning rate :func:`resolve` uses when ``optimizer.lr`` is unset."""
    table = DEFAULT_LR[_FAMILY[optimizer]]
    return table.get(estimator, table["*"])


# --------------------------------------------------------------------------- reading


def load(path: str | Path, overrides: Iterable[str] = ()) -> Config:
    """Read a TOML config file and apply ``--set`` style overrides (``"optimizer.lr=0.01"``).

    Raises:
        ConfigError: unreadable TOML, unknown key or ill-typed value.
    """
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config {str(path)!r} is a directory; give a TOML file (e.g. configs/quick.toml)") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {str(path)!r}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text; give a TOML file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    raw = apply_overrides(raw, overrides)
    return from_dict(raw, origin=str(path))


def parse_value(text: str) -> Any:
    """A ``--set`` value: a TOML literal if it parses as one (``0.01``, ``true``,
    ``[64, 64]``, ``"x"``), else the text itself as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_override(text: str) -> tuple[str, Any]:
    """``"optimizer.lr=0.01"`` → ``("optimizer.lr", 0.01)``; the key must be ``section.key``."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set expects KEY=VALUE (e.g. optimizer.lr=0.01), got {text!r}")
    check_key(key, origin=f"--set {text}")
    return key, parse_value(value.strip())


def apply_overrides(raw: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """A copy of the nested dict ``raw`` with each ``"section.key=value"`` applied."""
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in raw.items()}
    for text in overrides:
        key, value = parse_override(text)
        section, _, leaf = key.partition(".")
        table = out.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"--set {text}: {section!r} is not a table")
        table[leaf] = value
    return out


def updated(config: Config, values: Mapping[str, Any], *, origin: str = "config") -> Config:
    """``config`` with ``{"section.key": value}`` set (keys and values checked as in a file)."""
    raw = to_dict(config)
    for key, value in values.items():
        check_key(key, origin=origin)
        section, _, leaf = key.partition(".")
        raw[section][leaf] = value
    return from_dict(raw, origin=origin)


def valid_keys() -> list[str]:
    """Every dotted key a config may contain (``model.*`` / ``estimator.*`` options aside)."""
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls) if f.name != "options"]


def check_key(key: str, *, origin: str) -> None:
    """Raise :class:`ConfigError` unless ``key`` (``"section.leaf"``) is valid; name the nearest one."""
    section, dot, leaf = key.partition(".")
    if section in SECTIONS and dot and leaf and "." not in leaf:
        if section in OPEN_SECTIONS or leaf in {f.name for f in dataclasses.fields(SECTIONS[section])}:
            return
    if section in SECTIONS and not dot:
        first = dataclasses.fields(SECTIONS[section])[0].name
        raise ConfigError(f"{origin}: {section!r} is a table; set one of its keys, e.g. {section}.{first}")
    raise ConfigError(f"{origin}: unknown config key {key!r}{_nearest(key)}")


def _nearest(key: str) -> str:
    """`` (did you mean 'x.y'?)`` for the nearest valid key or table, else the list of tables."""
    keys = valid_keys()
    section, dot, leaf = key.partition(".")
    if not dot:  # a table name, or a key that belongs inside a table
        close = difflib.get_close_matches(key, list(SECTIONS), n=1, cutoff=0.6)
        if close:
            return f" (did you mean [{close[0]}]?)"
        leaf = key
    same_leaf = [k for k in keys if k.rpartition(".")[2] == leaf]
    if not dot:
        close = same_leaf[:1]
    else:
        close = difflib.get_close_matches(key, same_leaf, n=1, cutoff=0.0) or difflib.get_close_matches(key, keys, n=1)
    if not close:  # a misspelt table: the leaf within the nearest table
        table = difflib.get_close_matches(section, list(SECTIONS), n=1, cutoff=0.6)
        if table and table[0] in OPEN_SECTIONS:
            close = [f"{table[0]}.{leaf}"]
        elif table:
            close = difflib.get_close_matches(f"{table[0]}.{leaf}", keys, n=1, cutoff=0.0)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f"; tables are {', '.join(SECTIONS)}"


def from_dict(raw: Mapping[str, Any], *, origin: str = "config") -> Config:
    """Build a :class:`Config` from nested dicts (e.g. parsed TOML), checking keys and types."""
    sections: dict[str, Any] = {}
    for name, table in raw.items():
        if not isinstance(table, Mapping):
            raise ConfigError(f"{origin}: unknown top-level key {name!r}; keys belong in tables{_nearest(name)}")
        if name not in SECTIONS:
            raise ConfigError(f"{origin}: unknown config table [{name}]{_nearest(name)}")
        for key in table:
            check_key(f"{name}.{key}", origin=origin)
        sections[name] = _section(SECTIONS[name], name, table, origin)
    return Config(**sections)


def _section(cls: type, name: str, table: Mapping[str, Any], origin: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {k: v for k, v in table.items() if k in hints and k != "options"}
    values = {k: _coerce(hints[k], v, f"{origin}: {name}.{k}") for k, v in fields.items()}
    if name in OPEN_SECTIONS:
        values["options"] = {k: _plain(v) for k, v in table.items() if k not in fields}
    return cls(**values)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert ints to floats and lists to tuples."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        (tp,) = [a for a in args if a is not type(None)]
        args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    ok = True
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif tp is str:
        ok = isinstance(value, str)
    elif origin is tuple:
        ok = isinstance(value, (list, tuple))
        if ok:
            item = args[0]
            if args[-1] is not Ellipsis and len(value) != len(args):
                raise ConfigError(f"{where} must have {len(args)} entries, got {value!r}")
            value = tuple(_coerce(item, v, where) for v in value)
    elif origin is dict:
        ok = isinstance(value, Mapping)
        if ok:
            value = {str(k): _coerce(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if not ok:
        raise ConfigError(f"{where} must be {_type_name(tp)}, got {value!r}")
    return value


def _type_name(tp: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if tp in names:
        return names[tp]
    if typing.get_origin(tp) is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}s"
    return "a table"


def _plain(value: Any) -> Any:
    """Tuples to lists, recursively, so options compare equal after a TOML round trip."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------- resolving


def resolve(config: Config) -> Config:
    """Fill in every derived default and check values; idempotent.

    Checks names against ``bpfree.estimators`` / ``bpfree.data`` /
    ``bpfree.models`` registries and builds the estimator once, so its options
    come back complete (every default filled in) and invalid ones fail here,
    before anything runs.

    A config this function returned is returned as it is (no second check): callers that
    resolve early to surface errors (``bpfree train``, ``compare``, sweeps) and
    ``bpfree.train.run`` then resolve each run once.

    Raises:
        ConfigError: an invalid name, option or value.
    """
    if _RESOLVED.get(id(config)) is config:
        return config
    resolved = _resolve(config)
    _RESOLVED[id(resolved)] = resolved
    return resolved


# The configs resolve() returned, by id (weakly: a config that is gone leaves the table).
_RESOLVED: "weakref.WeakValueDictionary[int, Config]" = weakref.WeakValueDictionary()


def _resolve(config: Config) -> Config:
    from bpfree import data, estimators, models

    c = config
    _check_name("data.name", c.data.name, data.available())
    _check_name("model.name", c.model.name, models.available())
    _check_name("estimator.name", c.estimator.name, estimators.available())
    _check_name("optimizer.name", c.optimizer.name, list(OPTIMIZERS))

    data_options = _with_defaults(c.data, data.option_names(c.data.name), data.option_defaults(c.data.name),
                                  data.option_types(c.data.name))
    model_options = _with_defaults(c.model, models.option_names(c.model.name), models.option_defaults(c.model.name),
                                   models.option_types(c.model.name))
    # text data is tokenised by the model's own tokenizer; attention="auto" picks the kernel the estimator needs
    data_options, model_options = models.link_options(
        c.data.name, data_options, c.model.name, model_options, c.estimator.name
    )
    est_options = dict(c.estimator.options)
    _check_options(c.estimator, estimators.option_names(c.estimator.name))
    _check_types(c.estimator, estimators.option_types(c.estimator.name), "estimator")
    if "seed" in estimators.option_names(c.estimator.name) and "seed" not in est_options:
        est_options["seed"] = c.train.seed
    try:
        est_options = estimators.make(c.estimator.name, **est_options).options()
    except ValueError as e:
        raise ConfigError(f"[estimator] {e}") from None
    # None means "unset" (TOML cannot hold it); the writer lists such options as comments.
    est_options = {k: _plain(v) for k, v in est_options.items() if v is not None}
    _check_range(c)

    o = c.optimizer
    momentum = o.momentum
    if momentum is None:
        momentum = {"sgd": 0.0, "nesterov": 0.9}.get(o.name)
    elif o.name not in ("sgd", "nesterov"):
        raise ConfigError(f"optimizer.momentum applies to sgd and nesterov; {o.name} uses optimizer.betas")
    if o.name == "nesterov" and not momentum > 0:
        raise ConfigError("optimizer 'nesterov' needs optimizer.momentum > 0 (e.g. 0.9)")
    optimizer = dataclasses.replace(
        o,
        lr=o.lr if o.lr is not None else default_lr(o.name, c.estimator.name),
        momentum=momentum,
        weight_decay=o.weight_decay if o.weight_decay is not None else (0.01 if o.name == "adamw" else 0.0),
    )

    device = c.train.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return dataclasses.replace(
        c,
        data=dataclasses.replace(c.data, options=data_options),
        model=dataclasses.replace(c.model, options=model_options),
        estimator=dataclasses.replace(c.estimator, options=est_options),
        optimizer=optimizer,
        train=dataclasses.replace(c.train, device=device),
        run=dataclasses.replace(c.run, name=_run_name(c)),
    )


def _run_name(c: Config) -> str:
    """``run.name``, checked to be a safe directory name (``bpfree.paths``), or its default."""
    from bpfree import paths

    if c.run.name is None:
        return paths.safe_dirname(f"{c.data.name}-{c.model.name}-{c.estimator.name}")
    return paths.check_name(c.run.name, "run.name")


def _check_options(section: Any, valid: list[str]) -> None:
    """Raise :class:`ConfigError` for an option the named data set / model / estimator lacks."""
    kind = {DataConfig: "data", ModelConfig: "model", EstimatorConfig: "estimator"}[type(section)]
    fixed = [f.name for f in dataclasses.fields(section) if f.name != "options"]
    for key in section.options:
        if key not in valid:
            close = difflib.get_close_matches(key, valid + fixed, n=1)
            hint = f" (did you mean '{kind}.{close[0]}'?)" if close else ""
            raise ConfigError(
                f"unknown config key '{kind}.{key}' for {kind} {section.name!r}{hint}; "
                f"its options are: {', '.join(valid) or '(none)'}"
            )


def _with_defaults(section: Any, names: list[str], defaults: dict[str, Any], hints: dict[str, Any]) -> dict[str, Any]:
    """``section.options`` checked against the named data set's / model's options (names, and
    types where annotated), with their defaults filled in."""
    _check_options(section, names)
    _check_types(section, hints, {DataConfig: "data", ModelConfig: "model"}.get(type(section), "option"))
    out = dict(defaults)
    out.update(section.options)
    return {k: _plain(v) for k, v in out.items() if v is not None}


def _check_types(section: Any, hints: dict[str, Any], kind: str) -> None:
    """Raise :class:`ConfigError` for an option whose value does not fit its annotation in ``hints``."""
    for key, value in section.options.items():
        if key in hints and _fits(hints[key], value) is False:
            raise ConfigError(f"{kind}.{key} of {section.name!r} must be {_hint_name(hints[key])}, got {value!r}")


def _fits(tp: Any, value: Any) -> bool | None:
    """Whether ``value`` fits the annotation ``tp`` (``None``: an annotation this check does not know)."""
    import collections.abc

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        results = [_fits(a, value) for a in args]
        return True if any(r is True for r in results) else (None if None in results else False)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin is typing.Literal:
        return value in args
    if origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        item = args[0] if args else None
        return None if item is None else all(_fits(item, v) is not False for v in value)
    return None


def _hint_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_hint_name(a) for a in args)
    if tp is type(None):
        return "unset"
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (list, tuple) or str(origin) == "<class 'collections.abc.Sequence'>":
        return f"a list of {_hint_name(args[0])}s" if args else "a list"
    return _type_name(tp)


def _check_name(key: str, value: str, valid: list[str]) -> None:
    if value not in valid:
        close = difflib.get_close_matches(value, valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown {key} {value!r}{hint}; available: {', '.join(valid)}")


def _check_range(c: Config) -> None:
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ConfigError(what)

    t, o = c.train, c.optimizer
    need(0.0 <= c.data.val_fraction < 1.0, f"data.val_fraction must be in [0, 1), got {c.data.val_fraction}")
    need(c.data.batch_size >= 1, f"data.batch_size must be >= 1, got {c.data.batch_size}")
    need(c.data.eval_batch_size >= 1, f"data.eval_batch_size must be >= 1, got {c.data.eval_batch_size}")
    need(o.lr is None or o.lr > 0, f"optimizer.lr must be > 0, got {o.lr}")
    need(o.momentum is None or o.momentum >= 0, f"optimizer.momentum must be >= 0, got {o.momentum}")
    need(all(0 <= b < 1 for b in o.betas), f"optimizer.betas must be in [0, 1), got {list(o.betas)}")
    need(o.weight_decay is None or o.weight_decay >= 0, f"optimizer.weight_decay must be >= 0, got {o.weight_decay}")
    need(c.schedule.decay >= 0, f"schedule.decay must be >= 0, got {c.schedule.decay}")
    need(
        any(v is not None for v in (t.epochs, t.max_steps, t.max_seconds)),
        "set a budget: train.epochs, train.max_steps or train.max_seconds (whichever ends first)",
    )
    for key in ("epochs", "max_steps", "max_seconds", "clip_grad_norm", "eval_every_steps",
                "checkpoint_every_steps", "checkpoint_every_seconds", "divergence_bound", "eval_train_examples"):
        v = getattr(t, key)
        need(v is None or v > 0, f"train.{key} must be > 0 (or unset), got {v}")
    need(isinstance(t.accumulate, int) and not isinstance(t.accumulate, bool) and t.accumulate >= 1,
         f"train.accumulate must be an int >= 1 (minibatches averaged per optimizer step), got {t.accumulate!r}")
    need(t.accumulate == 1 or not (c.estimator.name == "mezo" and c.estimator.options.get("lr") is not None),
         "train.accumulate > 1 cannot average MeZO's update mode (estimator.lr steps inside every estimate); "
         "unset estimator.lr and use an optimizer")
    need(t.divergence_factor > 1, f"train.divergence_factor must be > 1, got {t.divergence_factor}")


# --------------------------------------------------------------------------- writing


def to_dict(config: Config) -> dict[str, dict[str, Any]]:
    """Nested plain dicts as they appear in TOML (data/model/estimator options flattened)."""
    out: dict[str, dict[str, Any]] = {}
    for name in SECTIONS:
        section = getattr(config, name)
        table = {f.name: _plain(getattr(section, f.name)) for f in dataclasses.fields(section) if f.name != "options"}
        out[name] = {**table, **getattr(section, "options", {})}
    return out


def to_toml(config: Config, *, header: str = "") -> str:
    """TOML text for ``config``; unset (``None``) keys become comments. Reads back equal."""
    lines = [f"# {line}" for line in header.splitlines()]
    for name, table in to_dict(config).items():
        if name == "compare" and not config.compare.estimators and not config.compare.lr:
            continue  # only compare configs carry a [compare] table
        lines += ["", f"[{name}]"]
        unset = [k for k in _option_names(name, table["name"]) if k not in table and k not in _SCHEME_OPTIONS] \
            if name in OPEN_SECTIONS else []  # (variance-reduction options are listed in docs, not per run)
        for key, value in table.items():
            if value is None:
                lines.append(f"# {_toml_key(key)} is unset")
            else:
                lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
        lines += [f"# {_toml_key(key)} is unset" for key in unset]
    return "\n".join(lines).lstrip("\n") + "\n"


def _scheme_options() -> frozenset[str]:
    from bpfree.estimators import variance

    return frozenset(variance.option_names())


_SCHEME_OPTIONS = _scheme_options()


def _option_names(kind: str, name: str) -> list[str]:
    """The options the named data set / model / estimator takes ([] if the name is unknown)."""
    from bpfree import data, estimators, models

    try:
        return {"data": data.option_names, "model": models.option_names, "estimator": estimators.option_names}[kind](
            name
        )
    except ValueError:
        return []


def write(config: Config, path: str | Path, *, header: str = "") -> None:
    """Write ``to_toml(config)`` to ``path``."""
    Path(path).write_text(to_toml(config, header=header))


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON string escapes are valid TOML
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise ConfigError(f"cannot write {value!r} ({type(value).__name__}) to TOML")
