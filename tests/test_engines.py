"""The parts: a DirectionSet regenerates from its description, every engine computes the same
numbers on the same directions, and one recogniser refuses hooked models for every engine."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bpfree import estimators
from bpfree.estimators import _chain, _lowrank, _models, engines, guessed
from bpfree.estimators.direction_set import CHUNK, DirectionSet
from bpfree.estimators.directional import Step
from conftest import exact_gradient, make_problem


def _draw(prob, k, rank=1, masks=None, materialise=True, seed=0, distribution="rademacher"):
    params = estimators.trainable_parameters(prob.model)
    return DirectionSet.draw(prob.model, params, num_directions=k, distribution=distribution, rank=rank,
                             orthogonal=False, generator=torch.Generator().manual_seed(seed), masks=masks,
                             materialise=materialise)


@pytest.mark.parametrize("rank", [1, "full"])
def test_directions_regenerate_bit_for_bit_from_their_description(rank):
    prob = make_problem("mlp")
    dirs = _draw(prob, 3, rank)
    again = DirectionSet.regenerate(dirs.spec, dirs.params, dirs.modules)
    assert dirs.describe() == again.describe() and dirs.describe()["seed"] == dirs.spec.seed
    assert all(torch.equal(dirs.dense[i], again.dense[i]) for i in dirs.dense)
    assert all(torch.equal(a, a2) and torch.equal(b, b2)
               for (a, b), (a2, b2) in zip(dirs.factors.values(), again.factors.values()))
    assert bool(dirs.factors) == (rank == 1)


def test_pieces_regenerate_the_stored_directions_and_masks_apply():
    lin = nn.Linear(300, 500)  # weight of 150k values: three pieces of CHUNK
    prob = make_problem("mlp")
    prob.model = nn.Sequential(lin)
    params = estimators.trainable_parameters(prob.model)
    mask = {0: (torch.rand(500, 300, generator=torch.Generator().manual_seed(1)) < 0.3).float()}
    stored = DirectionSet.draw(prob.model, params, num_directions=1, distribution="gaussian", rank="full",
                               orthogonal=False, generator=torch.Generator().manual_seed(0), masks=mask)
    lazy = DirectionSet.draw(prob.model, params, num_directions=1, distribution="gaussian", rank="full",
                             orthogonal=False, generator=torch.Generator().manual_seed(0), masks=mask,
                             materialise=False)
    assert lin.weight.numel() > 2 * CHUNK
    for i in (0, 1):
        assert torch.equal(stored.dense[i], lazy.dense_direction(i))
    assert torch.equal(stored.dense[0][0] * (1 - mask[0]), torch.zeros_like(lin.weight))


def test_select_and_restricted():
    prob = make_problem("mlp")
    dirs = _draw(prob, 4)
    two = dirs.select([3, 1])
    assert two.num_directions == 2 and two.describe()["picked"] == [3, 1]
    i = next(iter(dirs.factors))
    assert torch.equal(two.factors[i][0][0], dirs.factors[i][0][3])
    mask = torch.zeros(prob.model[0].weight.shape)
    mask[0] = 1
    narrowed = dirs.restricted({i: mask})
    assert i not in narrowed.factors and (narrowed.dense[i][:, 1:] == 0).all()
    a, b = dirs.factors[i]
    torch.testing.assert_close(narrowed.dense[i][2, 0], (a[2] @ b[2].T)[0])


def _step(prob):
    est = estimators.make("forward_gradient")
    return Step(est, prob.model, estimators.trainable_parameters(prob.model), prob.closure, torch.Generator(), 0)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_every_forward_engine_gives_the_same_derivatives(kind):
    prob = make_problem(kind)
    exact = exact_gradient(prob.model, prob.closure)
    low = _draw(prob, 3)
    chain = engines.directional_derivatives(prob.model, low, prob.closure, engines=("batched_chain",))
    single = engines.directional_derivatives(prob.model, low, prob.closure, engines=("per_direction",))
    assert chain.engine == "batched_chain" and single.engine == "per_direction"
    torch.testing.assert_close(chain.d, single.d, rtol=1e-10, atol=1e-12)
    dense = _draw(prob, 3, "full")
    vm = engines.directional_derivatives(prob.model, dense, prob.closure, engines=("vmapped_jvp",))
    one = engines.directional_derivatives(prob.model, dense, prob.closure, engines=("per_direction",))
    torch.testing.assert_close(vm.d, one.d, rtol=1e-10, atol=1e-12)
    flat = torch.cat([dense.dense[i].reshape(3, -1) for i in range(len(dense.params))], dim=1)
    torch.testing.assert_close(one.d, flat @ exact, rtol=1e-10, atol=1e-12)  # the oracle


def test_every_zeroth_order_engine_gives_the_same_losses():
    prob = make_problem("mlp")
    eps = 1e-3
    for rank in (1, "full"):
        dirs = _draw(prob, 1, rank)
        names = ("one_pass", "per_branch", "in_place") if rank == 1 else ("per_branch", "in_place")
        got = {}
        for name in names:
            before = [p.detach().clone() for p in prob.model.parameters()]
            out = engines.perturbed_losses(prob.model, dirs, prob.closure, [eps, -eps], [0, 0], engines=(name,))
            assert out.engine == name
            got[name] = out.losses
            if name == "in_place":  # left at θ − εz with records: undo them
                tensors = [p.detach() for p in prob.model.parameters()]
                with torch.no_grad():
                    for (_, part, z), rec in zip(engines.in_place_parts(dirs, tensors), out.records):
                        engines.unshift_exactly(part, z, -eps, rec)
            assert all(torch.equal(a, p) for a, p in zip(before, prob.model.parameters()))
        for name in names[1:]:
            torch.testing.assert_close(got[name], got[names[0]], rtol=1e-12, atol=1e-14)


def test_evaluating_at_other_parameters_never_writes_the_live_ones():
    prob = make_problem("mlp")
    dirs = _draw(prob, 2)
    other = [p.detach() + 0.01 for p in prob.model.parameters()]
    here = engines.directional_derivatives(prob.model, dirs, prob.closure)
    there = engines.directional_derivatives(prob.model, dirs, prob.closure, at=other)
    live = [p.detach().clone() for p in prob.model.parameters()]
    with torch.no_grad():
        for p, o in zip(prob.model.parameters(), other):
            p.copy_(o)
    moved = engines.directional_derivatives(prob.model, dirs, prob.closure)
    torch.testing.assert_close(there.d, moved.d, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(here.d, there.d)
    with torch.no_grad():
        for p, o in zip(prob.model.parameters(), live):
            p.copy_(o)


def test_one_recogniser_refuses_hooks_for_every_engine():
    prob = make_problem("mlp")
    model = prob.model
    assert _lowrank.tangent_chain(model) and _chain.sequential_chain(model)
    assert guessed.relu_mlp_layers(model, "wt_guess")
    handle = model[2].register_forward_hook(lambda m, i, o: o * 2)  # a hook that changes the output
    try:
        assert _lowrank.tangent_chain(model) is None and _chain.sequential_chain(model) is None
        with pytest.raises(estimators.UnsupportedModelError, match="has hooks"):
            guessed.relu_mlp_layers(model, "wt_guess")
        dirs = _draw(prob, 3)
        with pytest.raises(_models.DoesNotApply):
            engines.directional_derivatives(model, dirs, prob.closure, engines=("batched_chain",))
        with pytest.raises(_models.DoesNotApply):
            engines.perturbed_losses(model, dirs, prob.closure, [1e-3, -1e-3], [0, 0], engines=("one_pass",))
        # the dispatcher falls back to an engine that calls the modules, so the hook runs: exact
        exact = exact_gradient(model, prob.closure)
        out = engines.directional_derivatives(model, dirs, prob.closure)
        assert out.engine == "per_direction"
        flat = torch.cat([(dirs.dense[i] if i in dirs.dense else
                           torch.bmm(*[dirs.factors[i][0], dirs.factors[i][1].transpose(1, 2)]))
                          .reshape(3, -1) for i in range(len(dirs.params))], dim=1)
        torch.testing.assert_close(out.d, flat @ exact, rtol=1e-10, atol=1e-12)
    finally:
        handle.remove()
