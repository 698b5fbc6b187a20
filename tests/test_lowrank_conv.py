"""Rank-r directions for nn.Conv2d weights and the batched K-tangent pass through conv/pool chains,
checked against oracles: convolution with the materialised V = A Bᵀ, ``torch.func.jvp`` of the plain
model with the same (materialised) directions, exact backprop, and ``FlopCounterMode``'s count
against the analytic one (``_lowrank.chain_flops``)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bpfree import estimators
from bpfree.estimators import _lowrank, theory
from bpfree.estimators._functional import functional_loss, substituted
from bpfree.estimators.forward_gradient import _load_forward_ad_decompositions
from conftest import exact_gradient, flat_grad, make_problem

GEOMETRIES = [  # (kernel, stride, padding, dilation)
    (3, 1, 1, 1),
    ((3, 2), (2, 1), (1, 2), (1, 2)),
    (2, 2, 0, 1),
    (3, 1, "same", 2),
]


def _conv(geometry, cin=3, cout=5, bias=True):
    kernel, stride, padding, dilation = geometry
    torch.manual_seed(0)
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, bias=bias).double()


def _stacked(weight, k, rank, distribution, seed=0):
    gen = torch.Generator().manual_seed(seed)
    factors = [_lowrank.draw_factors(weight, rank, distribution, gen) for _ in range(k)]
    a, b = torch.stack([f[0] for f in factors]), torch.stack([f[1] for f in factors])
    return factors, a, b


def _materialised(weight, factors):
    return [(a @ b.T).view_as(weight) for a, b in factors]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
@pytest.mark.parametrize("rank", [1, 3])
def test_weight_terms_equal_conv_with_the_materialised_direction(geometry, rank):
    conv = _conv(geometry)
    x = torch.randn(4, 3, 9, 8, dtype=torch.double, generator=torch.Generator().manual_seed(1))
    factors, a, b = _stacked(conv.weight, 3, rank, "gaussian")
    vs = _materialised(conv.weight, factors)
    kw = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation)
    with torch.no_grad():
        expect = torch.stack([F.conv2d(x, v, **kw) for v in vs])
        torch.testing.assert_close(_lowrank.weight_terms(conv, x, a, b), expect, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(_lowrank.weight_term(conv, x, *factors[1]), expect[1], rtol=1e-12, atol=1e-12)
        # an unbatched input (C, H, W), as nn.Conv2d accepts
        torch.testing.assert_close(_lowrank.weight_term(conv, x[2], *factors[0]), expect[0, 2], rtol=1e-12, atol=1e-12)
        # one input per direction (K, batch, C, H, W): a grouped convolution
        xs = torch.randn(3, 4, 3, 9, 8, dtype=torch.double, generator=torch.Generator().manual_seed(2))
        expect = torch.stack([F.conv2d(xk, v, **kw) for xk, v in zip(xs, vs)])
        torch.testing.assert_close(_lowrank.weight_terms(conv, xs, a, b), expect, rtol=1e-12, atol=1e-12)
        # W t for K tangents folded into the batch
        expect = torch.stack([F.conv2d(xk, conv.weight, **kw) for xk in xs])
        torch.testing.assert_close(_lowrank.weight_apply(conv, xs), expect, rtol=1e-12, atol=1e-12)
        # added in place into a tangent buffer, contiguous or channels-last per sample (the result keeps it)
        vx = torch.stack([F.conv2d(x, v, **kw) for v in vs])
        for fmt in (torch.contiguous_format, torch.channels_last):
            xf = x.contiguous(memory_format=fmt)
            acc = torch.stack([F.conv2d(xf, conv.weight, **kw) for _ in range(3)])
            if fmt == torch.channels_last:
                acc = acc.movedim(-3, -1).contiguous().movedim(-1, -3)
            expect = acc + vx
            out = _lowrank.weight_terms(conv, xf, a, b, add_to=acc)
            assert out is acc
            torch.testing.assert_close(acc, expect, rtol=1e-12, atol=1e-12)
            fresh = _lowrank.weight_terms(conv, xf, a, b)
            torch.testing.assert_close(fresh, vx, rtol=1e-12, atol=1e-12)
            assert fresh.movedim(-3, -1).is_contiguous() == (fmt == torch.channels_last or fresh.shape[2] == 1)
        with pytest.raises(ValueError, match="add_to must be"):
            _lowrank.weight_terms(conv, x, a, b, add_to=acc.transpose(0, 1))


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_perturbed_and_tangent_convs_equal_the_materialised_direction(geometry):
    """``perturbed`` (spsa/mezo) computes conv(x, W + sV) + b, ``with_tangents`` (forward_gradient
    K = 1) the jvp with weight tangent V, for batched and unbatched inputs; W is never written."""
    from torch.autograd import forward_ad as fwAD

    conv = _conv(geometry)
    model = nn.Sequential(conv)
    (a, b), = _stacked(conv.weight, 1, 2, "gaussian")[0]
    v = (a @ b.T).view_as(conv.weight)
    kw = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation)
    version = conv.weight._version
    for x in (torch.randn(4, 3, 9, 8, dtype=torch.double), torch.randn(3, 9, 8, dtype=torch.double)):
        with torch.no_grad():
            with _lowrank.perturbed({conv: (a, b, -0.3)}, model):
                out = model(x)
            torch.testing.assert_close(out, F.conv2d(x, conv.weight - 0.3 * v, conv.bias, **kw), rtol=1e-12, atol=1e-12)
            xt, bt = torch.randn_like(x), torch.randn(5, dtype=torch.double)
            _load_forward_ad_decompositions()
            with fwAD.dual_level():
                dual_bias = fwAD.make_dual(conv.bias.detach(), bt)  # a dense bias tangent, as the estimator does
                with _lowrank.with_tangents({conv: (a, b)}, model), substituted(model, ["0.bias"], [dual_bias]):
                    primal, tangent = fwAD.unpack_dual(model(fwAD.make_dual(x, xt)))
        _, expect = torch.func.jvp(lambda xx, w, bb: F.conv2d(xx, w, bb, **kw),
                                   (x, conv.weight.detach(), conv.bias.detach()), (xt, v, bt))
        torch.testing.assert_close(primal, conv(x).detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(tangent, expect, rtol=1e-12, atol=1e-12)
    assert conv.weight._version == version


@pytest.mark.parametrize("distribution, rank", [("rademacher", 1), ("gaussian", 2)])
def test_conv_directions_are_standardised(distribution, rank):
    """E[vec V vec Vᵀ] = I for V = A Bᵀ over a (2, 3, 2, 2) conv weight read as 2 × 12; rank-1
    Rademacher has ‖V‖² = m·n exactly (the variance of dense Rademacher directions)."""
    weight = torch.empty(2, 3, 2, 2, dtype=torch.double)
    gen = torch.Generator().manual_seed(0)
    draws = 20_000
    vs = torch.stack([(a @ b.T).reshape(-1) for a, b in
                      (_lowrank.draw_factors(weight, rank, distribution, gen) for _ in range(draws))])
    second = vs.T @ vs / draws
    # each entry of the Monte Carlo mean has standard deviation about 1/√draws (Rademacher r=1:
    # off-diagonal products are ±1; Gaussian rank 2: E[V_ij² V_kl²] ≤ 9/r)
    torch.testing.assert_close(second, torch.eye(24, dtype=torch.double), rtol=0, atol=6 * 3 / math.sqrt(draws))
    assert abs(float(vs.mean())) < 5 / math.sqrt(draws * 24)
    if distribution == "rademacher" and rank == 1:
        torch.testing.assert_close(vs.square().sum(1), torch.full((draws,), 24.0, dtype=torch.double))


def test_lowrank_covers_plain_convs_only():
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3),                            # plain: low-rank
        nn.Conv2d(4, 4, 3, groups=2),                  # grouped: dense
        nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),  # pads itself: dense
        nn.Conv1d(4, 4, 1),                            # not Conv2d: dense
        nn.Conv2d(4, 4, 3, stride=2, dilation=2, bias=False),  # any geometry: low-rank
    )
    names = [n for n, _ in model.named_parameters()]
    assert [names[i] for i in sorted(_lowrank.lowrank_modules(model, names))] == ["0.weight", "4.weight"]
    assert _lowrank.tangent_chain(model) is None  # a grouped / reflect-padded conv is not carried


# ------------------------------------------------------------------------------ the chain pass


def tie_cnn():
    """A CNN whose first conv has integer weights on integer inputs: 2x2 windows hold exactly equal
    values computed from different pixels (ties whose tangents differ), and channel 1 is all zero
    after the ReLU (ties whose tangents are zero)."""
    model = nn.Sequential(
        nn.Conv2d(1, 2, 2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(2, 3, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
        nn.Flatten(),
        nn.Linear(3 * 2 * 2, 4),
    ).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[[[1.0, 1.0], [1.0, 1.0]]], [[[-1.0, -1.0], [-1.0, -1.0]]]]))
        model[0].bias.copy_(torch.tensor([0.0, -0.5]))
    x = torch.randint(0, 3, (6, 1, 9, 9), generator=torch.Generator().manual_seed(3)).double()
    return model, x


def models_and_inputs():
    """(label, model, input): a CNN starting with Conv2d, one starting with MaxPool2d (its input has
    no tangent), seed 002's CNN shape at a small size, the tie CNN, and an MLP starting with Flatten."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    out = [("small_cnn", make_problem("cnn").model, torch.randn(5, 1, 8, 8, generator=g, dtype=torch.double))]
    torch.manual_seed(1)
    pool_first = nn.Sequential(
        nn.MaxPool2d(2), nn.Conv2d(2, 4, (3, 2), stride=(1, 2), dilation=(2, 1), padding=(2, 0)), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding="same", bias=False), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(-3), nn.Linear(8, 3),
    ).double()
    out.append(("pool_first", pool_first, torch.randn(5, 2, 8, 8, generator=g, dtype=torch.double)))
    torch.manual_seed(2)
    from bpfree import models

    seed002 = models.make("cnn_mnist", input_shape=(1, 12, 12), num_classes=10, channels=4, hidden=8).double()
    out.append(("cnn_mnist_small", seed002, torch.randn(5, 1, 12, 12, generator=g, dtype=torch.double)))
    out.append(("ties", *tie_cnn()))
    torch.manual_seed(3)
    flat_first = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    out.append(("flatten_first", flat_first, torch.randn(5, 3, 4, generator=g, dtype=torch.double)))
    return out


MODELS = models_and_inputs()


def _directions(model, k, rank, seed=0):
    """Low-rank factors for every Linear/Conv2d weight and dense bias tangents, (K, …) each."""
    gen = torch.Generator().manual_seed(seed)
    layers = [m for m in model if type(m) in (nn.Linear, nn.Conv2d)]
    factors = {m: [_lowrank.draw_factors(m.weight, rank, "gaussian", gen) for _ in range(k)] for m in layers}
    biases = {m: torch.randn(k, m.weight.shape[0], generator=gen, dtype=m.weight.dtype)
              for m in layers if m.bias is not None}
    return factors, biases


def _jvp_oracle(model, closure, factors, biases, k):
    """d_k = ∇f·v_k by torch.func.jvp of the plain model, with the directions materialised."""
    names, primals, mods = [], [], dict(model.named_modules())
    owner = {}
    for name, p in model.named_parameters():
        prefix, _, leaf = name.rpartition(".")
        names.append(name)
        primals.append(p.detach())
        owner[name] = (mods[prefix], leaf)
    f = functional_loss(model, names, closure)
    _load_forward_ad_decompositions()  # once, without torch's internal deprecation warning
    out = []
    for j in range(k):
        tangents = []
        for name in names:
            mod, leaf = owner[name]
            a, b = factors[mod][j] if leaf == "weight" else (None, None)
            tangents.append((a @ b.T).view_as(mod.weight) if leaf == "weight" else biases[mod][j])
        _, d = torch.func.jvp(f, tuple(primals), tuple(tangents))
        out.append(d)
    return torch.stack(out)


def _chain(model, closure, factors, biases, **options):
    stacked = {m: (torch.stack([a for a, _ in f]), torch.stack([b for _, b in f])) for m, f in factors.items()}
    chain = _lowrank.tangent_chain(model)
    assert chain is not None
    return _lowrank.chain_directional_derivatives(model, chain, closure, stacked, biases, **options)


@pytest.mark.parametrize("label, model, x", MODELS, ids=[m[0] for m in MODELS])
@pytest.mark.parametrize("rank, memory_format, chunk_bytes", [
    (1, torch.contiguous_format, _lowrank.CHUNK_BYTES),
    (2, torch.contiguous_format, 1),  # one direction per chunk
    (1, torch.channels_last, 20_000),  # 1 to all 4 directions per chunk, by model
], ids=["r1", "r2-chunks-of-1", "r1-channels_last-chunks"])
def test_chain_pass_equals_torch_jvp_with_the_materialised_directions(label, model, x, rank, memory_format,
                                                                      chunk_bytes):
    if memory_format == torch.channels_last:  # channels-last activations and tangents
        model = copy.deepcopy(model).to(memory_format=memory_format)
        x = x.contiguous(memory_format=memory_format) if x.dim() == 4 else x
    y = torch.arange(x.shape[0]) % 3
    closure = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    k = 4
    factors, biases = _directions(model, k, rank)
    loss, d_chain = _chain(model, closure, factors, biases, chunk_bytes=chunk_bytes)
    d_jvp = _jvp_oracle(model, closure, factors, biases, k)
    torch.testing.assert_close(d_chain, d_jvp, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        assert loss.item() == pytest.approx(closure().item(), rel=1e-12)
    assert "forward" not in model.__dict__


def test_the_tie_model_has_ties_with_different_tangents():
    """The tie test above is only meaningful if some max-pool windows hold exactly equal maxima
    whose tangents differ (then which element wins decides the derivative)."""
    model, x = tie_cnn()
    factors, _ = _directions(model, 1, 1)
    with torch.no_grad():
        s = F.relu(model[0](x))
        t = _lowrank.weight_term(model[0], x, *factors[model[0]][0]) * (s > 0)
        windows = s[:, 0].unfold(1, 2, 2).unfold(2, 2, 2).reshape(-1, 4)  # channel 0, 2x2 windows
        tangents = t[:, 0].unfold(1, 2, 2).unfold(2, 2, 2).reshape(-1, 4)
        top = windows == windows.max(1, keepdim=True).values
        tied = top.sum(1) > 1
        differ = torch.tensor([len(set(tangents[i][top[i]].tolist())) > 1 for i in range(len(top))])
    assert int((tied & differ).sum()) >= 10
    assert bool((s[:, 1] == 0).all())  # the ReLU-zeroed channel


@pytest.mark.parametrize("layer", [0, 3], ids=["first", "second"])
def test_chain_pass_with_a_frozen_conv_weight_carries_no_weight_tangent(layer):
    """A frozen weight (no factors) has no tangent; a frozen first conv leaves only its bias's."""
    model, x = MODELS[0][1], MODELS[0][2]
    y = torch.arange(x.shape[0]) % 3
    closure = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    factors, biases = _directions(model, 3, 1)
    frozen = model[layer]
    factors.pop(frozen)
    loss, d_chain = _chain(model, closure, factors, biases)
    zero = {m: [(torch.zeros_like(a), b) for a, b in f] for m, f in _directions(model, 3, 1)[0].items()}
    factors[frozen] = zero[frozen]
    torch.testing.assert_close(d_chain, _jvp_oracle(model, closure, factors, biases, 3), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rank", [1, 2])
def test_chain_pass_flops_are_the_analytic_count(rank):
    """FlopCounterMode sees every matmul/convolution of the pass: exactly F + K·T."""
    from bpfree import models

    torch.manual_seed(0)
    model = models.make("cnn_mnist", input_shape=(1, 12, 12), num_classes=10, channels=8, hidden=16)
    x, y = torch.randn(4, 1, 12, 12), torch.arange(4) % 10
    closure = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    primal, tangent = _lowrank.chain_flops(list(model), tuple(x.shape), rank)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        closure()
    assert counter.get_total_flops() == primal
    for k, chunk_bytes in ((1, _lowrank.CHUNK_BYTES), (5, _lowrank.CHUNK_BYTES), (5, 1), (5, 40_000)):
        factors, biases = _directions(model, k, rank)
        with FlopCounterMode(display=False) as counter:
            _chain(model, closure, factors, biases, chunk_bytes=chunk_bytes)
        assert counter.get_total_flops() == primal + k * tangent


# ------------------------------------------------------------------------------ through the estimators


def test_forward_gradient_uses_one_pass_on_cnns_and_falls_back_otherwise():
    prob = make_problem("cnn")
    est = estimators.make("forward_gradient", num_directions=4)
    out = est.estimate(prob.model, prob.closure, generator=torch.Generator().manual_seed(0))
    assert out.details.get("batched_tangents") and out.forward_passes == 5

    def fell_back(model, closure):
        out = est.estimate(model, closure, generator=torch.Generator().manual_seed(0))
        assert "forward" not in model.__dict__
        return not out.details.get("batched_tangents") and out.forward_passes == 8

    # a penalty on a conv weight inside the closure is not a function of the output
    assert fell_back(prob.model, lambda: prob.closure() + 1e-3 * prob.model[0].weight.square().sum())
    # a closure that runs the model twice
    assert fell_back(prob.model, lambda: prob.closure() + F.cross_entropy(prob.model(prob.x.flip(0)), prob.y))
    # a module the chain does not know (AvgPool2d), and a grouped conv
    torch.manual_seed(0)
    x = torch.randn(4, 1, 6, 6, dtype=torch.double)
    for odd, features in ((nn.AvgPool2d(2), 18), (nn.Conv2d(2, 2, 1, groups=2), 72)):
        model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), odd, nn.Flatten(), nn.Linear(features, 3))
        model = model.double()
        assert _lowrank.tangent_chain(model) is None
        assert fell_back(model, lambda model=model, x=x: F.cross_entropy(model(x), torch.arange(4) % 3))


@pytest.mark.parametrize("name, options", [
    ("spsa", {"eps": 1e-4, "rank": 3}),
    ("mezo", {"eps": 1e-4, "rank": 3}),
    ("forward_gradient", {"rank": 3, "num_directions": 4}),
])
def test_higher_rank_conv_directions_are_unbiased(name, options):
    """Rank 3 on the CNN (no closed-form variance): the mean of estimates converges to ∇f."""
    prob = make_problem("cnn")
    exact = exact_gradient(prob.model, prob.closure)
    est = estimators.make(name, **options)
    g = torch.Generator().manual_seed(0)
    samples = 1600 // options.get("num_directions", 1)
    total = torch.zeros_like(exact)
    for _ in range(samples):
        est.estimate(prob.model, prob.closure, generator=g)
        total += flat_grad(prob.model)
    mean = total / samples
    rel = float((mean - exact).norm() ** 2 / exact.norm() ** 2)
    assert rel < 3 * theory.weight_perturbation_error(prob.num_params, options.get("num_directions", 1)) / samples
    assert float(F.cosine_similarity(mean, exact, dim=0)) > 0.8


@pytest.mark.parametrize("name, options", [
    ("forward_gradient", {}), ("forward_gradient", {"num_directions": 3}), ("spsa", {"num_directions": 2}),
    ("mezo", {}),
])
def test_lowrank_conv_weights_are_never_written(name, options):
    prob = make_problem("cnn", dtype=torch.float32)
    names = [n for n, _ in prob.model.named_parameters()]
    lowrank = [names[i] for i in sorted(_lowrank.lowrank_modules(prob.model, names))]
    assert lowrank == ["0.weight", "3.weight", "6.weight"]
    versions = [prob.model[i].weight._version for i in (0, 3)]
    estimators.make(name, **options).estimate(prob.model, prob.closure, generator=torch.Generator().manual_seed(0))
    assert [prob.model[i].weight._version for i in (0, 3)] == versions
    assert all(p.grad is not None and p.grad.shape == p.shape for p in prob.model.parameters())


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_mezo_update_mode_applies_the_rank_r_step_to_conv_weights(memory_format):
    lr, wd = 1e-2, 0.1
    models = []
    for update in (True, False):
        prob = make_problem("cnn", dtype=torch.float32)
        prob.model.to(memory_format=memory_format)
        est = estimators.make("mezo", eps=1e-3, rank=2, **({"lr": lr, "weight_decay": wd} if update else {}))
        est.estimate(prob.model, prob.closure, generator=torch.Generator().manual_seed(9))
        models.append(prob.model)
    updated, ref = models
    for p, r in zip(updated.parameters(), ref.parameters()):
        assert p.grad is None
        torch.testing.assert_close(p.detach(), r.detach() * (1 - lr * wd) - lr * r.grad, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name, options", [
    ("forward_gradient", {}), ("forward_gradient", {"num_directions": 3}), ("spsa", {}), ("mezo", {}),
])
def test_estimators_on_a_channels_last_cnn_match_the_contiguous_one(name, options):
    """Same generator state, same estimate, whichever memory format the model and input use."""
    grads = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        prob = make_problem("cnn")
        prob.model.to(memory_format=fmt)
        prob.x = prob.x.contiguous(memory_format=fmt)
        before = [p.detach().clone() for p in prob.model.parameters()]
        out = estimators.make(name, **options).estimate(prob.model, prob.closure,
                                                        generator=torch.Generator().manual_seed(0))
        assert all(torch.equal(a, p) for a, p in zip(before, prob.model.parameters()))
        assert out.details.get("batched_tangents", False) == (options.get("num_directions", 1) > 1)
        grads.append(flat_grad(prob.model))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


def test_forward_gradient_batched_pass_leaves_a_frozen_weight_alone():
    prob = make_problem("cnn")
    prob.model[0].weight.requires_grad_(False)  # (the chain pass used to look its factors up regardless)
    out = estimators.make("forward_gradient", num_directions=3).estimate(
        prob.model, prob.closure, generator=torch.Generator().manual_seed(0))
    assert out.details.get("batched_tangents") and prob.model[0].weight.grad is None
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in prob.model.parameters() if p.requires_grad)
