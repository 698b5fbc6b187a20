"""bpfree.models: shapes, exact parameter counts (computed analytically), structure, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bpfree import estimators, models


def linear(i: int, o: int) -> int:
    return i * o + o


def conv3x3(i: int, o: int) -> int:
    return i * o * 9 + o


# (name, input_shape, options, expected parameter count)
CASES = [
    ("logreg", (1, 28, 28), {}, linear(784, 10)),
    ("mlp", (1, 28, 28), {}, linear(784, 1024) + linear(1024, 1024) + linear(1024, 10)),
    ("mlp", (40,), {"hidden": (16,)}, linear(40, 16) + linear(16, 10)),
    (
        "cnn_mnist",
        (1, 28, 28),
        {},
        conv3x3(1, 64) + 3 * conv3x3(64, 64) + linear(64 * 7 * 7, 1024) + linear(1024, 10),
    ),
    (
        "vgg_cifar",
        (3, 32, 32),
        {},
        conv3x3(3, 64) + conv3x3(64, 64) + conv3x3(64, 128) + conv3x3(128, 128) + conv3x3(128, 256)
        + conv3x3(256, 256) + linear(256 * 4 * 4, 4096) + linear(4096, 10),
    ),
    ("mlp_mnist1d", (40,), {}, linear(40, 128) + 2 * linear(128, 128) + linear(128, 10)),
    ("mlp_mnist1d", (40,), {"width": 512}, linear(40, 512) + 2 * linear(512, 512) + linear(512, 10)),
]


def test_available():
    assert models.available() == ["cnn_mnist", "hf", "logreg", "minilm", "mlp", "mlp_mnist1d", "vgg_cifar", "vqa_fusion"]


@pytest.mark.parametrize("name,input_shape,options,expected", CASES, ids=[c[0] + "".join(f"-{k}={v}" for k, v in c[2].items()) for c in CASES])
def test_output_shape_and_exact_parameter_count(name, input_shape, options, expected):
    model = models.make(name, input_shape=input_shape, num_classes=10, seed=0, **options)
    assert models.count_parameters(model) == expected
    assert isinstance(model, nn.Sequential)
    assert not any(isinstance(m, (nn.Sequential, nn.Softmax, nn.LogSoftmax)) for m in model[:])  # flat, logits out
    with torch.no_grad():
        out = model(torch.randn(3, *input_shape, generator=torch.Generator().manual_seed(0)))
    assert out.shape == (3, 10) and out.dtype == torch.float32


def test_paper_parameter_counts():
    """The totals quoted in the docstrings."""
    counts = {
        "mlp": models.count_parameters(models.make("mlp", input_shape=(1, 28, 28), num_classes=10)),
        "cnn_mnist": models.count_parameters(models.make("cnn_mnist", input_shape=(1, 28, 28), num_classes=10)),
    }
    assert counts == {"mlp": 1_863_690, "cnn_mnist": 3_333_962}


def test_seed_002_cnn_layout():
    model = models.make("cnn_mnist", input_shape=(1, 28, 28), num_classes=10)
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["Conv2d", "ReLU", "Conv2d", "ReLU", "MaxPool2d", "Conv2d", "ReLU", "Conv2d", "ReLU", "MaxPool2d",
                     "Flatten", "Linear", "ReLU", "Linear"]  # fmt: skip
    for conv in (m for m in model if isinstance(m, nn.Conv2d)):
        assert conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.out_channels == 64
    vgg = models.make("vgg_cifar", input_shape=(3, 32, 32), num_classes=10)
    assert [m.out_channels for m in vgg if isinstance(m, nn.Conv2d)] == [64, 64, 128, 128, 256, 256]
    assert sum(isinstance(m, nn.MaxPool2d) for m in vgg) == 3 and vgg[-3].in_features == 4096


def test_mnist1d_mlp_is_only_linear_and_relu():
    model = models.make("mlp_mnist1d", input_shape=(40,), num_classes=10, width=64)
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU] * 3 + [nn.Linear]
    assert [m.out_features for m in model if isinstance(m, nn.Linear)] == [64, 64, 64, 10]


def test_seed_makes_weights_reproducible_without_touching_the_global_rng():
    state = torch.get_rng_state()
    a = models.make("mlp", input_shape=(8,), num_classes=3, hidden=(5,), seed=1)
    b = models.make("mlp", input_shape=(8,), num_classes=3, hidden=(5,), seed=1)
    c = models.make("mlp", input_shape=(8,), num_classes=3, hidden=(5,), seed=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a[0].weight, c[0].weight)


def test_default_init_is_pytorch_uniform():
    model = models.make("mlp", input_shape=(100,), num_classes=3, hidden=(50,), seed=0)
    bound = 1 / 100**0.5
    assert model[0].weight.abs().max() <= bound and model[0].bias.abs().max() <= bound


def test_errors_name_the_valid_choices():
    with pytest.raises(ValueError, match="did you mean 'mlp'.*available: cnn_mnist, hf, logreg"):
        models.make("mpl", input_shape=(4,), num_classes=2)
    with pytest.raises(ValueError, match="'hiden' \\(did you mean 'hidden'\\?\\); valid options: hidden"):
        models.make("mlp", input_shape=(4,), num_classes=2, hiden=(3,))
    with pytest.raises(ValueError, match="vector input_shape"):
        models.make("mlp_mnist1d", input_shape=(1, 28, 28), num_classes=10)
    with pytest.raises(ValueError, match="input_shape"):
        models.make("cnn_mnist", input_shape=(784,), num_classes=10)
    with pytest.raises(ValueError, match="positive"):
        models.make("mlp", input_shape=(4,), num_classes=2, hidden=(0,))
    assert models.option_names("vgg_cifar") == ["channels", "hidden"]


def test_count_parameters_trainable_only():
    model = models.make("logreg", input_shape=(5,), num_classes=2)
    model[0].bias.requires_grad_(False)
    assert models.count_parameters(model) == 10
    assert models.count_parameters(model, trainable_only=False) == 12


@pytest.mark.parametrize("name,input_shape", [("cnn_mnist", (1, 28, 28)), ("mlp_mnist1d", (40,))])
def test_forward_gradient_estimator_runs_on_the_paper_models(name, input_shape):
    """Forward gradients need jvp through every layer (seed 002 used functorch)."""
    model = models.make(name, input_shape=input_shape, num_classes=10, seed=0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, *input_shape, generator=g), torch.tensor([3, 7])
    out = estimators.make("forward_gradient").estimate(model, lambda: F.cross_entropy(model(x), y), generator=g)
    assert out.loss > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_kaiming_init_keeps_the_signal_through_a_deep_relu_mlp():
    """PyTorch's default init shrinks the input-dependent part of the activations by about 1/6
    per ReLU layer (Var W = 1/(3·fan_in)); He's init (Var W = 2/fan_in) keeps it. The demo's
    8-layer MLP needs it (models.architectures.mlp): measured as the logits' variance across
    a batch of unit-variance inputs."""
    x = torch.randn(2048, 256, generator=torch.Generator().manual_seed(0))

    def logit_variance(init):
        net = models.make("mlp", input_shape=(256,), num_classes=10, seed=0, hidden=[256] * 8, init=init)
        with torch.no_grad():
            return net(x).var(0).mean().item()

    assert logit_variance("kaiming") > 0.05   # 0.20 measured
    assert logit_variance("torch") < 1e-5     # 8e-8 measured: the logits barely depend on the input
    with pytest.raises(ValueError, match="init must be one of torch, kaiming"):
        models.make("mlp", input_shape=(256,), num_classes=10, seed=0, init="xavier")
