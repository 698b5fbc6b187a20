"""Property-based fuzzing (hypothesis) of everything a user types: TOML configs, ``--set``,
estimator specs and study files.

The property: every generated input gives either a valid run (exit 0, or 1 for a run that
diverged or failed *inside its record*) or one line ``bpfree: error: ...`` with exit status 2
— never a traceback, never an "internal error". Inputs mutate a tiny valid config (a 10-4-4
MLP on 64 Gaussian blobs, 2 steps, no warm-up or measurement) with keys drawn from the real
ones plus misspellings, and values drawn from edge cases (0, negatives, 10**12, 2**63 - 1,
NaN, ±inf, 1e300, empty strings and lists, nested tables, broken TOML literals).

The examples are derandomised (the same inputs every run, so the suite cannot flake) and
bounded: ``FUZZ_EXAMPLES`` per test below (set ``BPFREE_FUZZ_EXAMPLES=N`` for a longer hunt);
:data:`TRIED` counts the inputs each test tried, printed at the end of the session.
"""

from __future__ import annotations

import collections
import os
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from bpfree import cli, config as C  # noqa: E402
from bpfree.studies import compare, sweep  # noqa: E402

FUZZ_EXAMPLES = int(os.environ.get("BPFREE_FUZZ_EXAMPLES", "40"))
TRIED: collections.Counter[str] = collections.Counter()
OUTCOMES: collections.Counter[str] = collections.Counter()  # exit statuses seen, per test

FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)

BASE = {
    "data": {"name": "synthetic", "num_train": 64, "num_test": 32, "batch_size": 16, "eval_batch_size": 64},
    "model": {"name": "mlp", "hidden": [4]},
    "estimator": {"name": "spsa"},
    "optimizer": {"name": "sgd", "lr": 0.01},
    "train": {"max_steps": 2, "warmup": False, "measure": False, "progress": False},
}

# keys a mutation may touch: every real key, the estimators' and data sets' options, and misspellings
KEYS = sorted(
    set(C.valid_keys())
    | {f"estimator.{k}" for k in ("num_directions", "eps", "distribution", "rank", "lr", "seed", "scheme",
                                  "checkpoint", "jvp_clip", "orthogonal", "k", "weight_decay")}
    | {f"data.{k}" for k in ("num_train", "num_test", "num_features", "num_classes", "separation", "data_seed")}
    | {"model.hidden", "model.channels", "train.epoch", "optimiser.lr", "data.batchsize", "estimator.num_direction"}
)
NAMES = ["synthetic", "mnist1d", "cifar10", "mlp", "logreg", "cnn_mnist", "backprop", "forward_gradient", "spsa",
         "mezo", "w_perp", "sgd", "nesterov", "adam", "adamw", "rademacher", "gaussian", "noise_table", "full",
         "sqrt", "central", "forward", "auto", "cpu", "cuda", "meta", "none", "nope", ""]
EDGE_NUMBERS = [0, 1, 2, -1, 10**12, 2**63 - 1, -(2**63), 0.0, -0.5, 1e-300, 1e300,
                float("nan"), float("inf"), float("-inf")]

atoms = st.one_of(
    st.booleans(),
    st.integers(-3, 12),
    st.sampled_from(EDGE_NUMBERS),
    st.floats(-10, 10, allow_nan=False),
    st.sampled_from(NAMES),
    st.text(max_size=6),
)
values = st.recursive(
    atoms,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["a", "num", "low"]), inner, max_size=2),
    max_leaves=4,
)

def _default_of(key: str):
    """The value a key has in a resolved tiny config (``None`` if unset or unknown)."""
    section, _, leaf = key.partition(".")
    resolved = C.to_dict(C.resolve(C.from_dict(BASE)))
    return resolved.get(section, {}).get(leaf)


PLAUSIBLE = {  # per key: values a user might well write, mostly valid
    "data.name": st.sampled_from(["synthetic", "mnist1d"]),
    "model.name": st.sampled_from(["mlp", "logreg"]),
    "estimator.name": st.sampled_from(["backprop", "forward_gradient", "spsa", "mezo"]),
    "optimizer.name": st.sampled_from(["sgd", "nesterov", "adam", "adamw"]),
    "estimator.distribution": st.sampled_from(["rademacher", "gaussian"]),
    "estimator.rank": st.sampled_from([1, "full"]),
    "estimator.scheme": st.sampled_from(["central", "forward"]),
    "model.hidden": st.lists(st.integers(1, 8), max_size=2),
    "train.device": st.just("cpu"),
    "data.num_features": st.integers(1, 12),
    "data.num_classes": st.integers(2, 5),
}


def plausible(key: str):
    if key in PLAUSIBLE:
        return PLAUSIBLE[key]
    default = _default_of(key)
    if isinstance(default, bool):
        return st.booleans()
    if isinstance(default, int):
        return st.integers(1, 6)
    if isinstance(default, float):
        return st.floats(1e-4, 1.0)
    return st.one_of(st.integers(1, 6), st.floats(1e-4, 1.0), st.booleans())


def key_and_value(keys):
    """A key with either a plausible value for it or an edge-case value."""
    return st.sampled_from(keys).flatmap(lambda k: st.tuples(st.just(k), st.one_of(plausible(k), plausible(k), values)))


mutations = st.lists(key_and_value(KEYS), min_size=1, max_size=4).map(dict)


def toml_text(raw: dict) -> str:
    """TOML for nested dicts of any values (``bpfree.config``'s own writer for the values)."""
    lines = []
    for section, table in raw.items():
        lines.append(f"[{C._toml_key(section)}]")
        lines += [f"{C._toml_key(k)} = {C._toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def mutated(changes: dict) -> dict:
    raw = {s: dict(t) for s, t in BASE.items()}
    for key, value in changes.items():
        section, _, leaf = key.partition(".")
        raw.setdefault(section, {})[leaf] = value
    return raw


def assert_run_or_one_line_error(status: int, err: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert "internal error" not in err, err
    if status == 2:
        assert len(lines) == 1 and lines[0].startswith("bpfree: error: "), err
    else:
        assert status in (0, 1), (status, err)  # 1: diverged or failed, recorded in the run directory


def run_cli(argv: list[str], capsys, kind: str) -> None:
    capsys.readouterr()
    status = cli.main(argv)
    OUTCOMES[f"{kind}: exit {status}"] += 1
    assert_run_or_one_line_error(status, capsys.readouterr().err)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _case_dir(work: Path, kind: str) -> Path:
    TRIED[kind] += 1
    d = work / f"{kind}-{TRIED[kind]:04d}"
    d.mkdir()
    return d


# Keep every fuzzed run short whatever the mutation did to the budget.
BOUND = ["--set", "train.max_seconds=3"]


@FUZZ
@given(changes=mutations)
def test_fuzz_toml_config(work, capsys, changes):
    d = _case_dir(work, "toml configs")
    raw = mutated(changes)
    try:
        text = toml_text(raw)
    except C.ConfigError:  # a value TOML cannot hold (our writer refuses it): write it raw as a string
        text = toml_text({s: {k: str(v) for k, v in t.items()} for s, t in raw.items()})
    (d / "c.toml").write_text(text)
    run_cli(["train", str(d / "c.toml"), "--out", str(d / "run"), *BOUND], capsys, "toml configs")


override_values = st.one_of(
    values.map(lambda v: C._toml_value(v) if not isinstance(v, dict) else "{a = 1}"),
    st.text(max_size=10),
    st.sampled_from(["[1, 2", "'x", "1e", "none", "true", "[]", "{}", "=", "1=2"]),
)
def _literal(v) -> str:
    return C._toml_value(v) if not isinstance(v, dict) else "{a = 1}"


overrides = st.lists(
    st.one_of(
        key_and_value(KEYS).map(lambda kv: f"{kv[0]}={_literal(kv[1])}"),
        key_and_value(KEYS).map(lambda kv: f"{kv[0]}={_literal(kv[1])}"),
        st.tuples(st.sampled_from(KEYS + ["train", "nokey", "", "a.b.c", ".x", "data."]), override_values)
        .map(lambda kv: f"{kv[0]}={kv[1]}"),
        st.text(max_size=12),
    ),
    min_size=1,
    max_size=3,
)


@FUZZ
@given(sets=overrides)
def test_fuzz_set_overrides(work, capsys, sets):
    d = _case_dir(work, "--set overrides")
    (d / "c.toml").write_text(toml_text(BASE))
    argv = ["train", str(d / "c.toml"), "--out", str(d / "run")]
    for text in sets:
        argv += ["--set", text]
    run_cli([*argv, *BOUND], capsys, "--set overrides")


ESTIMATOR_KEYS = [k for k in KEYS if k.startswith("estimator.") and k != "estimator.name"]
spec_parts = st.one_of(
    key_and_value(ESTIMATOR_KEYS).map(lambda kv: f"{kv[0].split('.', 1)[1]}={_literal(kv[1])}"),
    key_and_value(ESTIMATOR_KEYS).map(lambda kv: f"{kv[0].split('.', 1)[1]}={_literal(kv[1])}"),
    st.tuples(st.sampled_from([k.split(".", 1)[1] for k in ESTIMATOR_KEYS] + ["lr", "x"]),
              override_values).map(lambda kv: f"{kv[0]}={kv[1]}"),
    st.tuples(st.sampled_from(KEYS), override_values).map(lambda kv: f"{kv[0]}={kv[1]}"),
    st.text(max_size=6),
)
specs = st.tuples(st.sampled_from(NAMES[6:12] + ["", "backprop ", "spsa,mezo"]), st.lists(spec_parts, max_size=3)).map(
    lambda t: ":".join([t[0], *t[1]])
)


@FUZZ
@given(spec=specs)
def test_fuzz_estimator_specs(work, capsys, spec):
    """A spec is parsed and planned as ``bpfree compare`` does; a valid one is trained for two steps."""
    d = _case_dir(work, "estimator specs")
    base = C.from_dict(BASE)
    base = C.updated(base, {"estimator.name": "backprop"})
    try:
        planned = compare.plan(C.from_dict({**C.to_dict(base), "estimator": {"name": "backprop"}}),
                               compare.parse_specs(spec))
    except C.ConfigError as e:
        assert "\n" not in cli._one_line(e)
        return
    (_, cfg), *_ = planned
    (d / "c.toml").write_text(C.to_toml(cfg))
    run_cli(["train", str(d / "c.toml"), "--out", str(d / "run"), *BOUND], capsys, "estimator specs")


STUDY = {
    "study": {"name": "fuzz", "objective": "val_loss", "seeds": [1], "sampler": "grid", "budget": "steps=2"},
    "base": {k: dict(v) for k, v in BASE.items()},
    "method": {"m": {"set": {"estimator.name": "spsa"}, "space": {"optimizer.lr": [0.01, 0.1]}}},
}
STUDY_KEYS = (
    [f"study.{k}" for k in ("name", "objective", "seeds", "sampler", "n_trials", "budget", "missing_data",
                            "eval_every_steps", "search_seed", "default_preset", "bogus")]
    + ["method.m.set", "method.m.space", "method.m.sampler", "method.m.n_trials", "method.m.budget",
       "method.m.tags", "method.m.bogus", "base.train", "base.data", "preset.p", "extra.x"]
)
study_values = st.one_of(
    values,
    st.sampled_from(["steps=2", "epochs=0", "flops=1e9", "seconds=-1", "tpe", "random", "grid", "val_accuracy",
                     "skip", "error"]),
    st.dictionaries(st.sampled_from(KEYS), values, max_size=2),
    st.dictionaries(st.sampled_from(["optimizer.lr", "estimator.eps", "nokey.x"]),
                    st.one_of(st.lists(atoms, max_size=3), st.fixed_dictionaries({"low": atoms, "high": atoms,
                                                                                   "num": atoms})), max_size=2),
)


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(STUDY_KEYS), study_values, min_size=1, max_size=3))
def test_fuzz_study_files(work, capsys, changes):
    """A study file is loaded as ``bpfree sweep`` does and every method's first trial config is
    resolved; only a one-line ``ConfigError`` may come out."""
    d = _case_dir(work, "study files")
    raw = {"study": dict(STUDY["study"]), "base": {k: dict(v) for k, v in STUDY["base"].items()},
           "method": {"m": {k: v for k, v in STUDY["method"]["m"].items()}}}
    for key, value in changes.items():
        *path, leaf = key.split(".")
        table = raw
        for p in path:
            table = table.setdefault(p, {}) if isinstance(table.get(p, {}), dict) else {}
        table[leaf] = value
    try:
        text = _study_toml(raw)
    except C.ConfigError:
        return  # not writable as TOML: nothing a user could give
    (d / "s.toml").write_text(text)
    try:
        study = sweep.load_study(d / "s.toml")
        for method in study.methods:
            points = sweep.grid_points(method) if method.sampler == "grid" else [{}]
            sweep.method_config(study, method, {k: sweep._decode(v) for k, v in points[0].items()} if points else {},
                                seed=study.seeds[0])
    except C.ConfigError as e:
        assert cli.describe_error(e)[0] == 2 and "\n" not in cli._one_line(e)
    # the command line says the same in one line (or runs): nothing else may escape
    run_cli(["sweep", str(d / "s.toml"), "--out", str(d / "out"), "--report-only"], capsys, "study files")


def _study_toml(raw: dict, prefix: str = "") -> str:
    lines, tables = [], []
    for k, v in raw.items():
        if isinstance(v, dict) and (not prefix or prefix.count(".") < 2) and k not in ("set", "space", "tags"):
            tables.append((k, v))
        else:
            lines.append(f"{C._toml_key(k)} = {C._toml_value(v)}")
    out = ([f"[{prefix}]"] if prefix and lines else []) + lines
    for k, v in tables:
        out.append(_study_toml(v, f"{prefix}.{C._toml_key(k)}" if prefix else C._toml_key(k)))
    return "\n".join(out) + "\n"


def test_fuzz_counts(capsys):
    """How many inputs the fuzz tests above tried (``pytest -s`` shows the line)."""
    with capsys.disabled():
        print(f"\nfuzzing counts: {dict(TRIED)}\noutcomes: {dict(sorted(OUTCOMES.items()))}")
    assert not TRIED or all(n >= 1 for n in TRIED.values())
