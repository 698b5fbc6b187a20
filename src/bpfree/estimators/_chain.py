"""Several perturbations of a plain ``nn.Sequential`` evaluated in one pass.

Zeroth-order estimators need the loss at J perturbed parameter vectors,
f(θ + s_j v_{k(j)}): central SPSA has s = ±ε for each of K directions (J = 2K),
the forward scheme adds the unperturbed branch s = 0 (J = K + 1), MeZO is
K = 1. When every perturbed parameter of the model is the weight of a layer
with a low-rank direction V_k = A_k B_kᵀ (``_lowrank``) or a bias with a dense
direction δb_k, a layer of branch j computes

    (W + s_j V_k) x_j + b + s_j δb_k = (W x_j + b) + s_j (V_k x_j + δb_k),

so the J branches differ only by a term that costs O(batch·r·(m + n)), and:

* **the prefix is shared.** Every branch has the same input x, so the modules
  before the first perturbed layer, and that layer's W x + b, run once for all
  J branches; only s_j (V_k x + δb_k) is added per branch. On seed 002's MLP
  the first layer is 43% of the forward's FLOPs, so two SPSA losses cost
  1.57 forwards instead of 2;
* **the rest runs once on all branches.** Later layers see the J inputs folded
  into the batch (J·batch rows): one GEMM instead of J small ones, and one
  Python dispatch per module instead of J.

With ``share_prefix="never"`` every branch starts from the input and terms are
added in place, so a group of one branch holds no more than inference does
(MeZO's update mode: its peak is 1.00x inference on seed 002's MLP);
``"if_small"`` shares the prefix and folds branches only where the held
activations are no larger than the first layer's weight (MeZO's grad mode).

The losses equal the sequential evaluation's up to floating-point rounding
(the same arithmetic, associated differently). The model's output for branch j
is handed to the closure's j-th call: the closure is called J times as usual,
the model's forward is replaced for the block, and the first call computes
the outputs of a group of branches at once (at most ``MAX_BRANCHES`` rows of
``batch`` each, so activation memory stays bounded). :class:`NotAChain` is
raised when the pass cannot stand in for the closure: the model is called
with a different input or more than once per call, or the loss also uses the
parameters directly (a penalty, which must see the perturbation); the caller
then evaluates the branches one at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from bpfree.estimators import _models
from bpfree.estimators._lowrank import _factor_features, _mix, weight_terms

# Layers whose weight and bias may carry a perturbation, and parameter-free
# modules that act on each example separately (so branches can share a batch).
# Not Conv2d: zeroth order perturbs a convolution through a temporary weight
# W + s·A Bᵀ (``_lowrank.perturbed``: cheaper than the activation-sized term),
# one per branch, so its branches cannot share one folded convolution.
LAYERS = (nn.Linear,)
PER_EXAMPLE = (nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Identity, nn.Flatten,
               nn.MaxPool2d, nn.AvgPool2d)

# The rank of a layer's per-example input (batch, ...) that ``weight_terms`` is written for.
INPUT_DIMS = {nn.Linear: 2}

# At most this many branches share one folded batch (activation memory ≤ MAX_BRANCHES × inference's).
MAX_BRANCHES = 8


NotAChain = _models.DoesNotApply  # the one "does not apply" signal of every engine


def sequential_chain(model: nn.Module) -> list[nn.Module] | None:
    """The modules of ``model`` if it is a plain, hook-free ``nn.Sequential``
    (``_models.sequential_modules``) of exactly the types in ``LAYERS`` and ``PER_EXAMPLE`` (the
    pass calls the layers' arithmetic directly, so hooks would not run), else None."""
    return _models.sequential_modules(model, _per_example_or_layer)


def _per_example_or_layer(mod: nn.Module) -> bool:
    if type(mod) not in LAYERS + PER_EXAMPLE:
        return False
    return not (type(mod) is nn.Flatten and mod.start_dim == 0)


@dataclass
class Branches:
    """The J perturbations: branch j is θ + ``scales[j]`` · v_{``direction[j]``}.

    ``weight_factors[layer] = (A, B)`` with A (K, m, r), B (K, n, r): the layer's weight
    direction V_k = A_k B_kᵀ; ``bias_directions[layer]`` (K, m): its bias direction. A
    layer in neither dict is not perturbed.
    """

    weight_factors: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]
    bias_directions: dict[nn.Module, torch.Tensor]
    scales: list[float]
    direction: list[int]

    def perturbs(self, mod: nn.Module) -> bool:
        return mod in self.weight_factors or mod in self.bias_directions


def _add_layer_terms_(out: torch.Tensor, mod: nn.Module, x: torch.Tensor, branches: Branches,
                      dirs: torch.Tensor, scales: torch.Tensor) -> None:
    """out_j += s_j (V_{k_j} x_j + δb_{k_j}) in place, for per-branch inputs x (J, batch, ...)."""
    if mod in branches.weight_factors:
        _check_input(mod, x, per_direction=True)
        a, b = branches.weight_factors[mod]
        a = _pick(a, dirs) * scales.view(-1, 1, 1)  # s_j A_k: the scale rides on the small factor
        _mix(mod, _factor_features(mod, x, _pick(b, dirs)), a, add_to=out)
    _add_bias_terms_(out, mod, branches, dirs, scales)


def _add_bias_terms_(out: torch.Tensor, mod: nn.Module, branches: Branches, dirs: torch.Tensor,
                     scales: torch.Tensor) -> None:
    if mod in branches.bias_directions:
        db = _pick(branches.bias_directions[mod], dirs)  # (J, m) → (J, 1, m, 1, ...) over batch and space
        db = db.view(db.shape[0], 1, db.shape[1], *[1] * (out.dim() - 3))
        out.addcmul_(scales.view(-1, *[1] * (out.dim() - 1)), db)


def _pick(t: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """``t[dirs]`` along the direction axis; a free broadcast view when there is one direction."""
    return t.expand(len(dirs), *t.shape[1:]) if t.shape[0] == 1 else t.index_select(0, dirs)


def _check_input(mod: nn.Module, x: torch.Tensor, per_direction: bool) -> None:
    if x.dim() != INPUT_DIMS[type(mod)] + per_direction:  # e.g. a Linear on (batch, time, n)
        raise NotAChain


SHARING = ("always", "if_small", "never")


class _BranchedForward:
    """Runs the chain for groups of branches, from a prefix shared by all of them or from the input."""

    def __init__(self, chain: list[nn.Module], branches: Branches, share_prefix: str) -> None:
        if share_prefix not in SHARING:
            raise ValueError(f"share_prefix must be one of {', '.join(SHARING)}, got {share_prefix!r}")
        self.chain, self.branches, self.share_prefix = chain, branches, share_prefix
        self.first = next((i for i, m in enumerate(chain) if branches.perturbs(m)), None)

    def share(self, x: torch.Tensor) -> None:
        """Run the unperturbed prefix and the first perturbed layer's W x + b and its K terms
        V_k x + δb_k once.

        ``if_small`` shares only when the held tensors (that layer's output and one term per
        direction) are no larger than its weight (for a Linear: (K + 1)·batch ≤ fan-in), so
        they cost at most what the layer's own parameters do."""
        self.input, self.shared = x, None
        if self.first is None or self.share_prefix == "never":
            return
        for mod in self.chain[: self.first]:
            x = mod(x)
        layer = self.chain[self.first]
        k = len(set(self.branches.direction))
        if self.share_prefix == "if_small" and (k + 1) * x.shape[0] * layer.out_features > layer.weight.numel():
            return
        self.shared = type(layer).forward(layer, x)
        terms = None
        if layer in self.branches.weight_factors:
            _check_input(layer, x, per_direction=False)
            terms = weight_terms(layer, x, *self.branches.weight_factors[layer])
        if layer in self.branches.bias_directions:
            db = self.branches.bias_directions[layer].unsqueeze(1)  # (K, 1, m)
            terms = db if terms is None else terms.add_(db)
        self.terms = terms

    def outputs(self, js: list[int]) -> torch.Tensor:
        """The model's outputs for branches ``js``, stacked (len(js), batch, ...)."""
        like = self.input
        dirs = torch.tensor([self.branches.direction[j] for j in js], device=like.device)
        scales = torch.tensor([self.branches.scales[j] for j in js], dtype=like.dtype, device=like.device)
        if self.shared is not None:  # one new (J', batch, m) tensor: W x + b + s_j (V_k x + δb_k)
            h = torch.addcmul(self.shared.unsqueeze(0), scales.view(-1, 1, 1), _pick(self.terms, dirs))
            rest = self.chain[self.first + 1:]
        else:  # every branch from the input; terms added in place: memory as inference's
            h, rest = self.input.unsqueeze(0).expand(len(js), *self.input.shape), self.chain
        for mod in rest:
            j, batch = h.shape[:2]
            out = type(mod).forward(mod, h.flatten(0, 1))
            out = out.view(j, batch, *out.shape[1:])
            if self.branches.perturbs(mod):
                _add_layer_terms_(out, mod, h, self.branches, dirs, scales)
            h = out
        return h


def chain_losses(model: nn.Sequential, chain: list[nn.Module], closure: Callable[[], torch.Tensor],
                 branches: Branches, max_branches: int = MAX_BRANCHES, share_prefix: str = "always") -> torch.Tensor:
    """The closure's loss at every branch, (J,) in float64, from one pass per group of branches.

    The closure runs once per branch, with grad enabled so that a loss that uses
    the parameters directly shows up (``loss.requires_grad``; the outputs handed
    to it carry no graph) and raises :class:`NotAChain`.
    """
    if "forward" in model.__dict__:
        raise NotAChain
    runner = _BranchedForward(chain, branches, share_prefix)
    total = len(branches.scales)
    state: dict[str, object] = {"branch": 0, "calls": 0}
    cache: dict[int, torch.Tensor] = {}

    def forward(x: torch.Tensor) -> torch.Tensor:
        state["calls"] = int(state["calls"]) + 1  # type: ignore[arg-type]
        if state["calls"] > 1:  # the model runs more than once per loss
            raise NotAChain
        with torch.no_grad():
            if "input" not in state:
                state["input"], state["version"] = x, x._version
                runner.share(x)
            elif x is not state["input"] or x._version != state["version"]:
                raise NotAChain  # another batch, or the same one changed in place
            j = int(state["branch"])  # type: ignore[arg-type]
            if j not in cache:
                # "if_small" folds branches only where it shares the prefix: activations are small
                fold = max_branches if runner.shared is not None or share_prefix != "if_small" else 1
                group = list(range(j, min(j + fold, total)))
                cache.update(zip(group, runner.outputs(group)))
        return cache.pop(j)

    losses = []
    model.forward = forward
    try:
        with torch.enable_grad():
            for j in range(total):
                state["branch"], state["calls"] = j, 0
                loss = closure()
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or loss.requires_grad \
                        or state["calls"] != 1:
                    raise NotAChain
                losses.append(loss.detach().reshape(()))
    finally:
        del model.forward
    return torch.stack(losses).double()
