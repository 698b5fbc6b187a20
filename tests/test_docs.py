"""The worked example in docs/estimators.md runs and passes the oracle checks."""

from __future__ import annotations

import pathlib
import re
import sys
import types

import torch
import torch.nn.functional as F

from bpfree import estimators
from bpfree.estimators import registry, theory
from conftest import exact_gradient, flat_grad, make_problem, param_bits

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "estimators.md"


def test_worked_example_registers_and_is_unbiased():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    example = next(b for b in blocks if '@register("antithetic")' in b)
    try:
        module = types.ModuleType("docs_example")  # dataclasses look their module up in sys.modules
        sys.modules[module.__name__] = module
        exec(compile(example, str(DOC), "exec"), module.__dict__)  # noqa: S102
        assert "antithetic" in estimators.available()
        prob = make_problem("mlp")
        est = estimators.make("antithetic", eps=1e-5)
        before = param_bits(prob.model)
        g = torch.Generator().manual_seed(0)
        exact = exact_gradient(prob.model, prob.closure)
        total = torch.zeros_like(exact)
        samples = 800
        for _ in range(samples):
            est.estimate(prob.model, prob.closure, generator=g)
            total += flat_grad(prob.model)
        assert all(torch.equal(a, b) for a, b in zip(before, param_bits(prob.model)))
        rel = float(((total / samples - exact).norm() / exact.norm()) ** 2)
        expected = theory.weight_perturbation_error(prob.num_params, 1) / samples
        assert 0.5 * expected < rel < 1.6 * expected
        assert float(F.cosine_similarity(total, exact, dim=0)) > 0.7
    finally:
        registry._REGISTRY.pop("antithetic", None)
        sys.modules.pop("docs_example", None)


def _exec_block(marker: str, name: str) -> types.ModuleType:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    example = next(b for b in blocks if marker in b)
    module = types.ModuleType(name)
    sys.modules[name] = module
    exec(compile(example, str(DOC), "exec"), module.__dict__)  # noqa: S102
    return module


def test_one_file_estimator_and_scheme_examples_work_and_compose():
    """docs/estimators.md's 'Adding an estimator' and 'Adding a variance-reduction scheme': each
    registers from its one block, they compose with each other and with the built-in schemes,
    and the scheme does what its formula says (d_k → factor·d_k)."""
    from bpfree.estimators import variance

    try:
        _exec_block('@register("one_sided_fg")', "docs_estimator")
        _exec_block('@register_scheme("shrink")', "docs_scheme")
        prob = make_problem("mlp")
        before = param_bits(prob.model)
        plain = estimators.make("one_sided_fg", num_directions=4)
        out = plain.estimate(prob.model, prob.closure, generator=torch.Generator().manual_seed(0))
        assert (out.details["directional_derivatives"] >= 0).all()
        g_plain = flat_grad(prob.model)
        shrunk = estimators.make("one_sided_fg", num_directions=4, shrink_factor=0.5, svrg_every=5, svrg_directions=2)
        assert [s.name for s in shrunk.schemes] == ["svrg", "shrink"]
        estimators.make("forward_gradient", shrink_factor=0.5).estimate(
            prob.model, prob.closure, generator=torch.Generator().manual_seed(0))
        g_half = flat_grad(prob.model)
        estimators.make("forward_gradient").estimate(prob.model, prob.closure, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(g_half, 0.5 * flat_grad(prob.model), rtol=1e-12, atol=0)
        shrunk.estimate(prob.model, prob.closure, generator=torch.Generator().manual_seed(0))
        assert all(torch.equal(a, b) for a, b in zip(before, param_bits(prob.model)))
        assert not torch.equal(g_plain, flat_grad(prob.model))
    finally:
        registry._REGISTRY.pop("one_sided_fg", None)
        variance._SCHEMES.pop("shrink", None)
        sys.modules.pop("docs_estimator", None)
        sys.modules.pop("docs_scheme", None)
