"""Embedding directions only on the rows a batch looks up (``bpfree.estimators._embedding_rows``).

The gradient of an ``nn.Embedding`` weight is exactly zero off the looked-up rows (and on the
padding row), so restricting v there keeps every estimator unbiased. Checked against exact
backprop: per-coordinate z-scores with the tolerance from the known variance (Rademacher,
K = 1: Var g_j = ‖∇f‖² − ∇f_j², the same formula with and without the restriction, since ∇f is
zero off the rows), the estimate exactly zero off the rows, ‖g‖² = d²·n with n the perturbed
dimension, the fallbacks with their reasons, and the estimator contract.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bpfree import estimators
from bpfree.estimators import UnsupportedModelError
from conftest import param_bits

VOCAB, DIM, LENGTH, PAD = 30, 4, 5, 1


class TinyText(nn.Module):
    """Word + position embeddings, tanh, mean over positions, a linear head; optionally a tied
    output layer (``out.weight is emb.weight``) whose logits join the loss."""

    def __init__(self, tied: bool = False, padding_idx: int | None = PAD, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.emb = nn.Embedding(VOCAB, DIM, padding_idx=padding_idx)
            self.pos = nn.Embedding(LENGTH, DIM)
            self.head = nn.Linear(DIM, 3)
            if tied:
                self.out = nn.Linear(DIM, VOCAB, bias=False)
                self.out.weight = self.emb.weight
        self.tied = tied

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.emb(ids) + self.pos(torch.arange(ids.shape[1])))
        logits = self.head(h.mean(1))
        if self.tied:  # a language-model term through the tied output layer
            logits = logits + self.out(h.mean(1)).logsumexp(1, keepdim=True)
        return logits


def problem(tied: bool = False, padding_idx: int | None = PAD, dtype=torch.float64):
    model = TinyText(tied, padding_idx).to(dtype)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 12, (6, LENGTH), generator=g)  # rows 12.. are never looked up
    ids[0, :2] = PAD
    ids[1, 3] = PAD
    y = torch.randint(0, 3, (6,), generator=g)
    return model, ids, (lambda: F.cross_entropy(model(ids), y))


def exact(model, closure) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    return [g.detach() for g in torch.autograd.grad(closure(), params)]


def touched(ids: torch.Tensor) -> list[int]:
    return sorted(set(ids.unique().tolist()) - {PAD})


def estimates(est, model, closure, n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        est.estimate(model, closure, generator=gen)
        out.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    return torch.stack(out)


ESTIMATORS = [("forward_gradient", {}), ("spsa", {"eps": 1e-5}), ("mezo", {"eps": 1e-5})]
IDS = [n for n, _ in ESTIMATORS]


@pytest.mark.parametrize("name, options", ESTIMATORS[:2], ids=IDS[:2])
def test_unbiased_against_backprop_with_the_known_variance(name, options):
    """Mean of n estimates → ∇f: z_j = (mean_j − ∇f_j) / √((‖∇f‖² − ∇f_j²)/n), the exact per-coordinate
    variance for Rademacher directions (dense and rank-1), K = 1."""
    model, _, closure = problem()
    grad = torch.cat([g.reshape(-1) for g in exact(model, closure)])
    n = 3000
    samples = estimates(estimators.make(name, **options), model, closure, n)
    var = grad.square().sum() - grad.square()
    on = grad != 0  # the looked-up rows (exactly zero elsewhere: next test)
    z = (samples.mean(0) - grad)[on] / (var[on] / n).sqrt()
    assert z.abs().max() < 5 and 0.75 < float(z.square().mean()) < 1.25, (z.abs().max(), z.square().mean())


@pytest.mark.parametrize("name, options", [*ESTIMATORS, ("mezo", {"eps": 1e-5, "lr": 1e-2}),
                                           ("forward_gradient", {"num_directions": 3, "rank": "full"}),
                                           ("spsa", {"num_directions": 2, "svrg_every": 2, "svrg_directions": 2}),
                                           ("forward_gradient", {"adaptive_candidates": 3})],
                         ids=[*IDS, "mezo-update", "fg-K3-dense", "spsa-svrg", "fg-adaptive"])
def test_exactly_zero_off_the_touched_rows_and_on_the_padding_row(name, options):
    model, ids, closure = problem()
    before = model.emb.weight.detach().clone()
    est = estimators.make(name, **options)
    gen = torch.Generator().manual_seed(3)
    rows = touched(ids)
    off = [r for r in range(VOCAB) if r not in rows]  # includes PAD
    for _ in range(4):
        out = est.estimate(model, closure, generator=gen)
        assert out.details["embedding_rows"] == {"rows": {"emb.weight": len(rows), "pos.weight": LENGTH}, "dense": {}}
        if "lr" in options:  # update mode: only the touched rows move
            assert model.emb.weight.grad is None
            assert torch.equal(model.emb.weight.detach()[off], before[off])
            assert not torch.equal(model.emb.weight.detach()[rows], before[rows])
        else:
            g = model.emb.weight.grad
            assert torch.equal(g[off], torch.zeros_like(g[off]))
            assert (g[rows] != 0).all()


def test_the_second_moment_counts_only_the_perturbed_dimensions():
    """Rademacher, K = 1: ‖g‖² = d²‖v‖² = d²·n exactly, n = |T|·D + the other parameters; without the
    restriction n = N (every row of the table)."""
    model, ids, closure = problem()
    n_other = sum(p.numel() for n, p in model.named_parameters() if n != "emb.weight")
    for rows_on, dim in ((True, len(touched(ids)) * DIM + n_other), (False, VOCAB * DIM + n_other)):
        est = estimators.make("forward_gradient", embedding_rows=rows_on)
        out = est.estimate(model, closure, generator=torch.Generator().manual_seed(0))
        d = float(out.details["directional_derivatives"][0])
        norm2 = sum(float(p.grad.square().sum()) for p in model.parameters())
        assert norm2 == pytest.approx(d * d * dim, rel=1e-6)  # d is reported in float32


def test_cosine_to_the_gradient_improves():
    """Mean single-estimate cosine ≈ √(1/n): higher with the rows restriction (n smaller)."""
    model, ids, closure = problem()
    grad = torch.cat([g.reshape(-1) for g in exact(model, closure)])

    def mean_cos(**opts):
        s = estimates(estimators.make("forward_gradient", **opts), model, closure, 400)
        return float(F.cosine_similarity(s, grad.unsqueeze(0)).abs().mean())

    assert mean_cos() > 1.3 * mean_cos(embedding_rows=False)


def test_turned_off_gives_dense_directions_on_every_row():
    model, ids, closure = problem()
    out = estimators.make("spsa", embedding_rows=False).estimate(model, closure, generator=torch.Generator().manual_seed(0))
    assert out.details["embedding_rows"]["dense"] == {"emb.weight": "embedding_rows=false", "pos.weight": "embedding_rows=false"}
    never = [r for r in range(VOCAB) if r not in touched(ids) and r != PAD]
    assert (model.emb.weight.grad[never] != 0).all()


def test_spec_string_turns_it_off():
    from bpfree.studies import compare

    spec = compare.parse_spec("mezo:embedding_rows=false")
    est = estimators.make(spec.name, **spec.options)
    assert est.embedding_rows is False and est.options()["embedding_rows"] is False
    assert estimators.make("mezo").options()["embedding_rows"] is True


def test_run_record_names_the_rows_and_config_turns_it_off(tmp_path):
    """A real ``bpfree train`` (MiniLM cut to one layer, full fine-tuning, 2 steps): the run record's
    estimator block lists the row-restricted weights; ``estimator.embedding_rows = false`` lists them
    as dense with the reason."""
    pytest.importorskip("transformers")
    import csv as csv_mod
    import json

    from bpfree import cli

    path = tmp_path / "r.csv"
    with open(path, "w", newline="") as f:
        w = csv_mod.writer(f)
        w.writerow(["text", "label"])
        w.writerows([[f"{['good', 'bad'][i % 2]} film {i}", ["pos", "neg"][i % 2]] for i in range(24)])
    common = ["--set", f"data.path={json.dumps(str(path))}", "--set", f"data.cache_dir={json.dumps(str(tmp_path))}",
              "--set", "data.max_length=16", "--set", "train.measure=false", "--set", "train.warmup=false",
              "--set", "data.batch_size=8", "--set", "model.layers=1", "--set", 'model.finetune="full"']
    rc = cli.main(["compare", "--task", "csv/minilm", *common, "--estimators", "mezo,mezo:embedding_rows=false",
                   "--budget", "steps=2", "--out", str(tmp_path / "cmp")])
    assert rc == 0
    on, off = (json.loads(p.read_text())["estimator"] for p in sorted((tmp_path / "cmp").glob("*/summary.json")))
    if "dense" in on["embedding_rows"] and on["embedding_rows"]["dense"]:
        on, off = off, on
    assert {n.rsplit(".", 2)[-2] for n in on["embedding_rows"]["rows"]} == {
        "word_embeddings", "position_embeddings", "token_type_embeddings"}
    assert on["embedding_rows"]["dense"] == {}
    assert set(off["embedding_rows"]["dense"].values()) == {"embedding_rows=false"} and not off["embedding_rows"]["rows"]


@pytest.mark.parametrize("name", ["forward_gradient", "spsa", "mezo"])
def test_tied_output_layer_falls_back_to_dense_with_the_reason(name):
    """lm_head.weight is emb.weight: the gradient is dense (the output layer reads every row), so the
    weight gets a dense direction and the estimate stays unbiased for it (its mean → ∇f)."""
    model, ids, closure = problem(tied=True)
    est = estimators.make(name, eps=1e-5) if name != "forward_gradient" else estimators.make(name)
    desc = est.describe(model)
    reason = desc["embedding_rows"]["dense"]["emb.weight"]
    assert "out.weight" in reason and "tied" in reason
    assert desc["embedding_rows"]["rows"] == ["pos.weight"]
    out = est.estimate(model, closure, generator=torch.Generator().manual_seed(0))
    assert out.details["embedding_rows"]["dense"] == {"emb.weight": reason}
    never = [r for r in range(VOCAB) if r not in touched(ids) and r != PAD]
    grad = exact(model, closure)[0]
    assert (grad[never] != 0).all()  # the tied weight's true gradient is dense ...
    assert (model.emb.weight.grad[never] != 0).all()  # ... and so is its estimate


def test_tied_fallback_stays_unbiased():
    model, _, closure = problem(tied=True)
    grad = torch.cat([g.reshape(-1) for g in exact(model, closure)])
    n = 3000
    samples = estimates(estimators.make("forward_gradient"), model, closure, n)
    z = (samples.mean(0) - grad) / ((grad.square().sum() - grad.square()) / n).sqrt()
    assert z.abs().max() < 5 and 0.75 < float(z.square().mean()) < 1.25


def test_max_norm_and_subclasses_fall_back_with_their_reasons():
    class MyEmbedding(nn.Embedding):
        pass

    model = nn.Sequential()
    model.add_module("a", nn.Embedding(5, 2, max_norm=1.0))
    model.add_module("b", MyEmbedding(5, 2))
    dense = estimators.make("forward_gradient").describe(model)["embedding_rows"]["dense"]
    assert "max_norm" in dense["a.weight"] and "subclass" in dense["b.weight"]
    wrapped = TinyText()
    wrapped.emb.forward = lambda ids: nn.Embedding.forward(wrapped.emb, ids)
    assert "instance-level forward" in estimators.make("spsa").describe(wrapped)["embedding_rows"]["dense"]["emb.weight"]
    sparse = estimators.make("mezo", sparse_fraction=0.5).describe(TinyText())["embedding_rows"]["dense"]
    assert "sparse" in sparse["emb.weight"]
    ortho = estimators.make("forward_gradient", rank="full", orthogonal=True, num_directions=2)
    assert "orthogonal" in ortho.describe(TinyText())["embedding_rows"]["dense"]["emb.weight"]
    assert estimators.make("forward_gradient").describe(nn.Linear(2, 2)) == {}


def test_padding_idx_none_perturbs_every_touched_row():
    model, ids, closure = problem(padding_idx=None)
    estimators.make("forward_gradient").estimate(model, closure, generator=torch.Generator().manual_seed(0))
    rows = sorted(set(ids.unique().tolist()))
    assert PAD in rows and (model.emb.weight.grad[rows] != 0).all()


@pytest.mark.parametrize("name, options", [*ESTIMATORS, ("forward_gradient", {"num_directions": 2})],
                         ids=[*IDS, "fg-K2"])
def test_contract_parameters_bit_identical_same_generator_same_estimate_global_rng_untouched(name, options):
    model, _, closure = problem(dtype=torch.float32)
    bits = param_bits(model)
    rng = torch.get_rng_state()
    grads = []
    for _ in range(2):
        est = estimators.make(name, **options)
        est.estimate(model, closure, generator=torch.Generator().manual_seed(7))
        grads.append([p.grad.clone() for p in model.parameters()])
        assert all(torch.equal(a, b) for a, b in zip(param_bits(model), bits))
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    assert torch.equal(torch.get_rng_state(), rng)


def test_a_module_looked_up_twice_draws_each_row_once():
    """Two id tensors through one embedding: a row seen in both lookups gets one value, and the
    estimate is still unbiased (∇f by z-score on the rows)."""

    class TwoLookups(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 3, dtype=torch.float64)
            self.head = nn.Linear(6, 2, dtype=torch.float64)

        def forward(self, a, b):
            return self.head(torch.cat([self.emb(a), torch.sin(self.emb(b))], dim=-1))

    torch.manual_seed(0)
    model = TwoLookups()
    a, b = torch.tensor([1, 2, 3]), torch.tensor([3, 4, 4])
    y = torch.tensor([0, 1, 1])
    closure = lambda: F.cross_entropy(model(a, b), y)  # noqa: E731
    out = estimators.make("forward_gradient").estimate(model, closure, generator=torch.Generator().manual_seed(0))
    assert out.details["embedding_rows"]["rows"] == {"emb.weight": 4}
    grad = torch.cat([g.reshape(-1) for g in exact(model, closure)])
    n = 3000
    samples = estimates(estimators.make("spsa", eps=1e-5), model, closure, n)
    on = grad != 0
    z = (samples.mean(0) - grad)[on] / ((grad.square().sum() - grad.square())[on] / n).sqrt()
    assert z.abs().max() < 5 and 0.6 < float(z.square().mean()) < 1.4


def test_a_weight_read_outside_its_module_is_an_error_naming_the_fix():
    class Direct(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(6, 2)

        def forward(self, ids):
            return F.embedding(ids, self.emb.weight)  # the module's forward never runs

    model = Direct()
    ids = torch.tensor([[0, 1]])
    with pytest.raises(UnsupportedModelError, match="embedding_rows=false"):
        estimators.make("forward_gradient").estimate(model, lambda: model(ids).sum(), generator=torch.Generator())
    estimators.make("forward_gradient", embedding_rows=False).estimate(model, lambda: model(ids).sum(),
                                                                       generator=torch.Generator())
    assert (model.emb.weight.grad[2:] != 0).all()


def test_bad_option_value_is_explained():
    with pytest.raises(ValueError, match="embedding_rows must be true or false"):
        estimators.make("mezo", embedding_rows="no")


def test_hf_bert_word_position_and_token_type_embeddings_get_rows():
    """A tiny BERT (no download): all three embedding tables get rows, the word table's padding
    row (pad_token_id 0) and unused token types get none, and the estimate matches backprop in mean."""
    transformers = pytest.importorskip("transformers")
    from bpfree.models.hf import HFModel, apply_finetune

    config = transformers.BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=16, max_position_embeddings=16, num_labels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        hf = transformers.BertForSequenceClassification(config)
        apply_finetune(hf, "full")
        model = HFModel(hf, head="classifier", attention="eager").double().eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 20, (4, 6), generator=g)
    ids[0, 4:] = 0
    mask = (ids != 0).long()
    x, y = torch.stack([ids, mask], dim=1), torch.randint(0, 3, (4,), generator=g)
    closure = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    est = estimators.make("forward_gradient")
    out = est.estimate(model, closure, generator=torch.Generator().manual_seed(0))
    rows = out.details["embedding_rows"]["rows"]
    word = [n for n in rows if n.endswith("word_embeddings.weight")][0]
    pos = [n for n in rows if n.endswith("position_embeddings.weight")][0]
    typ = [n for n in rows if n.endswith("token_type_embeddings.weight")][0]
    assert rows[word] == len(set(ids.unique().tolist()) - {0}) and rows[pos] == 6 and rows[typ] == 1
    params = dict(model.named_parameters())
    w = params[word].grad
    assert torch.equal(w[0], torch.zeros_like(w[0])) and torch.equal(w[20:], torch.zeros_like(w[20:]))
    assert torch.equal(params[pos].grad[6:], torch.zeros_like(params[pos].grad[6:]))


def test_hf_masked_lm_tied_decoder_falls_back_with_the_reason():
    """Hugging Face ties a masked-LM decoder to the word embeddings: that table falls back to dense,
    the position and token-type tables keep their rows."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=16, max_position_embeddings=16)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = transformers.BertForMaskedLM(config)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    desc = estimators.make("mezo").describe(model)["embedding_rows"]
    assert "cls.predictions.decoder.weight" in desc["dense"]["bert.embeddings.word_embeddings.weight"]
    assert sorted(desc["rows"]) == ["bert.embeddings.position_embeddings.weight",
                                    "bert.embeddings.token_type_embeddings.weight"]
