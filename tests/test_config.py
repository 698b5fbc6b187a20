"""Configs: TOML round trip, resolved defaults, and errors that name the nearest valid key."""

from __future__ import annotations

import dataclasses
import math
import pathlib
import tomllib

import pytest

from bpfree import config as C
from bpfree import estimators

CONFIGS = sorted((pathlib.Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))

TINY = {
    "data": {"name": "synthetic", "num_train": 200, "num_test": 100},
    "model": {"name": "mlp", "hidden": [8]},
    "estimator": {"name": "forward_gradient", "num_directions": 4, "jvp_clip": 1.0},
    "optimizer": {"name": "nesterov", "betas": [0.9, 0.99]},
    "schedule": {"decay": 1e-5},
    "train": {"max_steps": 5, "clip_grad_norm": 2.5, "eval_every_steps": 2},
    # run.name is one safe directory name (bpfree.paths); the parent folder run.out may be any path
    "run": {"name": "tiny", "out": "runs/tiny \"quoted\" ünïcode"},
}


def write_toml(tmp_path, text: str) -> pathlib.Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def round_trip(cfg: C.Config, tmp_path) -> C.Config:
    path = tmp_path / "resolved.toml"
    C.write(cfg, path, header="written by a test\nsecond line")
    return C.load(path)


def test_round_trip_load_resolve_write_load(tmp_path):
    resolved = C.resolve(C.from_dict(TINY))
    assert round_trip(resolved, tmp_path) == resolved
    assert C.resolve(resolved) == resolved  # idempotent


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_configs_resolve_and_round_trip(path, tmp_path):
    resolved = C.resolve(C.load(path))
    assert round_trip(resolved, tmp_path) == resolved


def test_example_configs_exist():
    assert any(p.name == "demo.toml" for p in CONFIGS)


def test_resolve_fills_every_default():
    r = C.resolve(C.from_dict(TINY))
    assert r.optimizer.lr == C.default_lr("nesterov", "forward_gradient")
    assert r.optimizer.momentum == 0.9 and r.optimizer.weight_decay == 0.0
    assert r.estimator.options == {
        "num_directions": 4,
        "distribution": "rademacher",
        "orthogonal": False,
        "jvp_clip": 1.0,
        "rank": 1,
        "embedding_rows": True,
        "seed": 0,  # from train.seed
    }
    assert r.data.options["num_features"] == 10  # the data set's own default
    assert r.model.options == {"hidden": [8], "init": "torch"}
    assert r.train.device in ("cpu", "cuda")
    text = C.to_toml(r)
    assert "# momentum" not in text and "# epochs is unset" in text


def test_resolved_per_optimizer_defaults():
    def resolved(**opt):
        return C.resolve(C.from_dict({"optimizer": opt, "train": {"epochs": 1}})).optimizer

    assert resolved(name="adamw").weight_decay == 0.01
    assert resolved(name="sgd").momentum == 0.0
    assert resolved(name="adam", lr=0.5).lr == 0.5
    with pytest.raises(C.ConfigError, match="nesterov.*momentum > 0"):
        resolved(name="nesterov", momentum=0.0)
    with pytest.raises(C.ConfigError, match="betas"):
        resolved(name="adam", momentum=0.9)


def test_default_lr_table_covers_every_estimator():
    for family in C.DEFAULT_LR.values():
        assert set(estimators.available()) <= set(family)
        assert family["backprop"] > family["forward_gradient"]


def test_budget_required_and_positive():
    with pytest.raises(C.ConfigError, match="set a budget"):
        C.resolve(C.from_dict({}))
    with pytest.raises(C.ConfigError, match="train.max_steps must be > 0"):
        C.resolve(C.from_dict({"train": {"max_steps": 0}}))


@pytest.mark.parametrize(
    "text, nearest",
    [
        ("[optimizer]\nlrr = 0.1\n", "'optimizer.lr'"),
        ("[optimiser]\nlr = 0.1\n", "[optimizer]"),
        ("[train]\nlr = 0.1\n", "'optimizer.lr'"),
        ("[train]\nmax_step = 3\n", "'train.max_steps'"),
        ("lr = 0.1\n", "'optimizer.lr'"),
        (
            "[train]\nepochs = 1\n[estimator]\nname = 'forward_gradient'\nnum_direction = 4\n",
            "'estimator.num_directions'",
        ),
        ("[train]\nepochs = 1\n[model]\nhiden = [4]\n", "'model.hidden'"),
        ("[train]\nepochs = 1\n[data]\nbatchsize = 4\n", "'data.batch_size'"),
        ("[train]\nepochs = 1\n[estimator]\nname = 'forward_gradiant'\n", "'forward_gradient'"),
    ],
)
def test_unknown_key_in_file_names_nearest(tmp_path, text, nearest):
    with pytest.raises(C.ConfigError) as err:
        C.resolve(C.load(write_toml(tmp_path, text)))
    assert nearest in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "override, nearest",
    [
        ("optimizer.lrr=0.1", "'optimizer.lr'"),
        ("trian.epochs=3", "'train.epochs'"),
        ("train.lr=3", "'optimizer.lr'"),
        ("estimator.num_direction=4", "'estimator.num_directions'"),
    ],
)
def test_unknown_key_in_set_names_nearest(tmp_path, override, nearest):
    path = write_toml(tmp_path, "[estimator]\nname = 'forward_gradient'\n[train]\nepochs = 1\n")
    with pytest.raises(C.ConfigError) as err:
        C.resolve(C.load(path, [override]))
    assert nearest in str(err.value)


def test_set_values_are_toml_literals(tmp_path):
    path = write_toml(tmp_path, "[train]\nepochs = 2\n")
    cfg = C.load(
        path,
        [
            "optimizer.lr=1e-3",
            "model.hidden=[4, 4]",
            "train.progress=false",
            "train.epochs=none",
            "train.max_steps=7",
            "estimator.name=backprop",
            "estimator.checkpoint=sqrt",  # not a TOML literal: a string
            "run.name=a=b",  # only the first '=' splits
        ],
    )
    assert cfg.optimizer.lr == 1e-3 and cfg.model.options == {"hidden": [4, 4]}
    assert cfg.train.progress is False and cfg.train.epochs is None and cfg.train.max_steps == 7
    assert cfg.estimator.options == {"checkpoint": "sqrt"} and cfg.run.name == "a=b"


def test_bad_types_and_syntax(tmp_path):
    with pytest.raises(C.ConfigError, match="train.epochs must be an integer"):
        C.load(write_toml(tmp_path, "[train]\nepochs = 'x'\n"))
    with pytest.raises(C.ConfigError, match="invalid TOML"):
        C.load(write_toml(tmp_path, "[train\n"))
    with pytest.raises(C.ConfigError, match="KEY=VALUE"):
        C.parse_override("optimizer.lr")
    with pytest.raises(C.ConfigError, match="is a table"):
        C.parse_override("train=1")
    with pytest.raises(C.ConfigError, match="does not exist"):
        C.load(tmp_path / "missing.toml")


def test_writer_handles_special_values():
    cfg = dataclasses.replace(
        C.from_dict({"train": {"epochs": 1}}),
        model=C.ModelConfig("mlp", {"hidden": [2], "odd key": "x\ty\"z", "nested": {"a": [1.5, True]}}),
    )
    raw = tomllib.loads(C.to_toml(cfg))
    assert raw["model"] == {"name": "mlp", "hidden": [2], "odd key": "x\ty\"z", "nested": {"a": [1.5, True]}}
    assert math.isinf(tomllib.loads("v = " + C._toml_value(float("inf")))["v"])
