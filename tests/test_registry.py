"""One registry shape for estimators, data sets and models; one budget parser; one spec type."""

import pytest

from bpfree import data, estimators, models
from bpfree._names import Registry
from bpfree.config import ConfigError
from bpfree.data.sets import REGISTRY as DATA
from bpfree.estimators.registry import REGISTRY as ESTIMATORS
from bpfree.measure.profile import EstimatorSpec
from bpfree.models.architectures import REGISTRY as MODELS
from bpfree.studies import budget, compare


@pytest.mark.parametrize("registry, face, name, typo", [
    (ESTIMATORS, estimators, "forward_gradient", "forward_gradiant"),
    (DATA, data, "mnist1d", "mnist1e"),
    (MODELS, models, "mlp", "mpl"),
])
def test_the_three_registries_have_one_shape(registry, face, name, typo):
    assert isinstance(registry, Registry)
    assert face.available() == registry.available() and name in registry
    assert face.option_names(name) == registry.option_names(name)
    with pytest.raises(ValueError, match=f"unknown {registry.kind} '{typo}' \\(did you mean '{name}'\\?\\); available: "):
        registry.get(typo)
    with pytest.raises(ValueError, match=f"unknown option\\(s\\) for {registry.kind} '{name}'"):
        registry.check_options(name, ["no_such_option"])


def test_option_defaults_and_types_come_from_the_builder():
    assert models.option_defaults("mlp")["hidden"] == (1024, 1024)
    assert "num_samples" in data.option_defaults("mnist1d")
    assert "hidden" in models.option_types("mlp")
    assert "num_directions" in estimators.option_types("forward_gradient")


def test_a_name_registers_once():
    r = Registry("widget")
    r.register("a", lambda x=1: x)
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        r.register("a", lambda: 0)

    @r.register("b")
    def b(size: int = 3):
        return size

    assert r.get("b") is b and r.option_defaults("b") == {"size": 3} and r.option_types("b") == {"size": int}


def test_one_budget_parser_for_the_command_line_and_study_files():
    assert budget.parse_text("steps=10,seconds=1.5", "--budget") == {"steps": 10, "seconds": 1.5}
    assert budget.parse_table({"epochs": 8}, "study") == {"epochs": 8}
    assert budget.train_overrides({"epochs": 8}) == {"train.max_steps": None, "train.epochs": 8, "train.max_seconds": None}
    assert budget.train_overrides({"flops": 1e6}, lambda: 3e5)["train.max_steps"] == 3
    for bad, match in (("steps=1.5", "whole number"), ("steps=0", "positive"), ("minutes=3", "expects"), ("", "empty")):
        with pytest.raises(ConfigError, match=match):
            budget.parse_text(bad, "--budget")
    for bad, match in (({"steps": 1, "epochs": 1}, "give one budget"), ("steps=2", "give one budget"),
                       ({"hours": 1}, "unknown budget 'hours'"), ({"steps": -1}, "positive")):
        with pytest.raises(ConfigError, match=match):
            budget.parse_table(bad, "study")


def test_one_spec_type():
    spec = compare.parse_spec("forward_gradient:num_directions=4:lr=1e-3")
    assert isinstance(spec, EstimatorSpec) and spec.label == spec.text == "forward_gradient:num_directions=4:lr=1e-3"
    assert spec.make().num_directions == 4 and spec.lr == 1e-3
