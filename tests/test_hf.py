"""Hugging Face models (bpfree.models.hf / .vqa): every estimator against the exact gradient on a tiny
randomly initialised BERT (no download), LoRA / head / full modes, attention kernels, checkpointing,
loading by local path and its errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from bpfree import estimators, models  # noqa: E402
from bpfree.estimators.backprop import checkpointed  # noqa: E402
from bpfree.models.hf import HFModel, apply_finetune  # noqa: E402

VOCAB = 40


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny transformers: one intra-op thread (two threads spin against each other on a busy 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_bert(finetune: str = "full", attention: str = "auto", seed: int = 0) -> HFModel:
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
        max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        hf = transformers.BertForSequenceClassification(config)
        apply_finetune(hf, finetune)
        model = HFModel(hf, head="classifier", attention=attention)
    return model.double().eval()


def batch(seed: int = 0, b: int = 6, t: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, 4:] = 0  # one padded row: the mask must matter
    ids[0, 4:] = 0
    return torch.stack([ids, mask], dim=1), torch.randint(0, 3, (b,), generator=g)


def flat_grads(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])


def exact(model, closure) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(closure(), params)])


@pytest.mark.parametrize("finetune", ["full", "lora"])
@pytest.mark.parametrize(
    "name, options, draws",
    [
        ("forward_gradient", {"num_directions": 4}, 16),
        ("spsa", {"num_directions": 4, "eps": 1e-5}, 16),
        ("mezo", {"eps": 1e-5}, 64),
    ],
)
def test_estimator_mean_matches_exact_gradient(finetune, name, options, draws):
    """E[ĝ·g] = |g|² for every unbiased estimator (v with E[v vᵀ] = I): the mean of ĝ·g/|g|² over
    independent draws is 1 within 5 standard errors, and the mean estimate points along g."""
    model = tiny_bert(finetune)
    x, y = batch()
    closure = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    g = exact(model, closure)
    est = estimators.make(name, **options)
    gen = torch.Generator().manual_seed(1)
    ratios, total = [], torch.zeros_like(g)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(draws):
        est.estimate(model, closure, generator=gen)
        ghat = flat_grads(model)
        ratios.append(float(ghat @ g / (g @ g)))
        total += ghat
    r = torch.tensor(ratios)
    se = float(r.std()) / math.sqrt(draws)
    assert abs(float(r.mean()) - 1.0) < 5 * se + 0.02, (float(r.mean()), se)
    # cos(mean, g) ≈ √(M/(M + N)) ≈ 0.19 here; a random direction's is ~ ±1/√N ≈ ±0.024
    assert F.cosine_similarity(total, g, dim=0) > 0.08
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # parameters restored exactly


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_checkpointed_gradients_equal_plain(finetune):
    model = tiny_bert(finetune)
    x, y = batch()
    closure = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    estimators.make("backprop").estimate(model, closure)
    plain = flat_grads(model).clone()
    out = estimators.make("backprop", checkpoint=1).estimate(model, closure)  # one checkpoint per layer
    assert torch.equal(flat_grads(model), plain)
    assert out.details["recomputed_fraction"] > 0
    assert torch.allclose(plain, exact(model, closure))


def test_checkpointing_per_layer_keeps_fewer_activations():
    """Saved tensors of autograd during the forward: per-layer checkpoints keep only layer inputs."""
    model = tiny_bert("full")
    x, y = batch(b=4, t=12)

    def saved_bytes(spec) -> int:
        sizes = []

        def pack(t):
            sizes.append(t.numel() * t.element_size())
            return t

        with checkpointed(model, spec), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            F.cross_entropy(model(x), y)
        return sum(sizes)

    assert saved_bytes(1) < 0.75 * saved_bytes("none")


def test_forward_mode_switches_auto_attention_to_eager_and_sdpa_error_names_the_fix():
    model = tiny_bert("full", attention="auto")
    x, y = batch()
    assert model.attention_kernel == "sdpa"
    estimators.make("forward_gradient").estimate(model, lambda: F.cross_entropy(model(x), y),
                                                 generator=torch.Generator().manual_seed(0))
    assert model.attention_kernel == "eager"
    forced = tiny_bert("full", attention="sdpa")
    with pytest.raises(ValueError, match="model.attention = 'eager'"):
        estimators.make("forward_gradient").estimate(forced, lambda: F.cross_entropy(forced(x), y),
                                                     generator=torch.Generator().manual_seed(0))
    # the same model runs every other estimator with SDPA
    estimators.make("spsa").estimate(forced, lambda: F.cross_entropy(forced(x), y),
                                     generator=torch.Generator().manual_seed(0))
    assert forced.attention_kernel == "sdpa"


def test_eager_and_sdpa_give_the_same_logits():
    a, b = tiny_bert("full", attention="eager"), tiny_bert("full", attention="sdpa")
    x, _ = batch()
    torch.testing.assert_close(a(x), b(x))


@pytest.mark.parametrize("name", ["activity_perturbation", "wt_guess", "w_perp", "w_perp_ns", "w_p"])
def test_guessed_gradients_refuse_transformers(name):
    model = tiny_bert("full")
    x, y = batch()
    with pytest.raises(estimators.UnsupportedModelError, match="MLP"):
        estimators.make(name).estimate(model, lambda: F.cross_entropy(model(x), y),
                                       generator=torch.Generator().manual_seed(0))


def test_mezo_update_mode_on_lora_moves_only_trainable_parameters():
    model = tiny_bert("lora")
    x, y = batch()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    out = estimators.make("mezo", lr=1e-2).estimate(model, lambda: F.cross_entropy(model(x), y),
                                                    generator=torch.Generator().manual_seed(0))
    assert out.details["updated_in_place"]
    now = dict(model.named_parameters())
    assert all(torch.equal(now[n], v) for n, v in frozen.items())
    assert any(not torch.equal(now[n], v) for n, v in trained.items())


def test_finetune_modes_count_trainable_parameters():
    full, lora = tiny_bert("full"), tiny_bert("lora")
    head = tiny_bert("head")
    n_head = 8 * 3 + 3  # classifier Linear(8, 3)
    n_lora = 2 * 2 * (8 + 8)  # 2 layers x (query, value) x r=1 (A: 1x8, B: 8x1)
    assert models.count_parameters(head) == n_head
    assert models.count_parameters(lora) == n_head + n_lora
    assert models.count_parameters(full) == models.count_parameters(full, trainable_only=False)
    trained = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert all("lora_A" in n or "lora_B" in n or n.startswith("model.classifier.") for n in trained)
    assert sum("lora_A" in n for n in trained) == sum("lora_B" in n for n in trained) == 4
    # LoRA's B starts at zero: the adapted model computes what the base model computes
    x, _ = batch()
    torch.testing.assert_close(lora(x), full(x))


def test_lora_without_targets_names_the_linear_layers():
    hf = transformers.BertForSequenceClassification(
        transformers.BertConfig(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=16, num_labels=3))
    with pytest.raises(ValueError, match="Linear names in this model: .*query"):
        apply_finetune(hf, "lora", target_modules=["qq"])


def test_dropout_masks_repeat_within_a_batch_and_leave_the_global_rng():
    model = tiny_bert("full")
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.5
    model.train()
    x, _ = batch()
    state = torch.random.get_rng_state()
    a, b = model(x), model(x)
    assert torch.equal(a, b)  # SPSA's two forwards of one step see the same masks
    assert torch.equal(state, torch.random.get_rng_state())
    x2 = x.clone()
    x2[1, 0, 1] = (x2[1, 0, 1] % (VOCAB - 1)) + 1
    assert not torch.equal(model(x2)[0], a[0])  # another batch: other masks
    model.eval()
    assert not torch.equal(model(x), a)


# ------------------------------------------------------------------ loading by local path


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """A tiny BERT classifier and a tiny GPT-2 saved with save_pretrained, with MiniLM's tokenizer."""
    root = tmp_path_factory.mktemp("hf")
    tok = models.hf.load_tokenizer()
    bert = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=tok.vocab_size, hidden_size=8, num_hidden_layers=3, num_attention_heads=2, intermediate_size=16,
        max_position_embeddings=64, num_labels=2))
    bert.save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    gpt = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=tok.vocab_size, n_embd=8, n_layer=2, n_head=2, n_positions=64))
    gpt.save_pretrained(root / "gpt2")
    tok.save_pretrained(root / "gpt2")
    return root


def test_local_directory_layers_and_dtype(saved_models):
    m = models.make("hf", input_shape=(2, 16), num_classes=3, seed=0, path=str(saved_models / "bert"),
                    finetune="full", layers=2, dtype="bfloat16")
    assert len(m.model.bert.encoder.layer) == 2
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    x, y = batch()
    x[:, 0] = x[:, 0] + 100  # real vocabulary ids
    out = estimators.make("mezo").estimate(m, lambda: F.cross_entropy(m(x).float(), y),
                                           generator=torch.Generator().manual_seed(0))
    assert math.isfinite(out.loss)
    again = models.make("hf", input_shape=(2, 16), num_classes=3, seed=0, path=str(saved_models / "bert"),
                        finetune="full", layers=2, dtype="bfloat16")
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), again.parameters()))  # seeded head


def test_causal_lm_label_tokens_and_lm_loss(saved_models):
    path = str(saved_models / "gpt2")
    x, y = batch(b=3, t=6)
    x[:, 0] = x[:, 0] + 1000
    clf = models.make("hf", input_shape=(2, 16), num_classes=3, seed=0, path=path, head="label_tokens",
                      label_tokens=["negative", "neutral", "positive"], finetune="lora",
                      target_modules=["c_attn"])
    assert clf(x).shape == (3, 3)
    assert models.count_parameters(clf) > 0
    lm = models.make("hf", input_shape=(2, 16), num_classes=30522, seed=0, path=path, head="lm", finetune="full")
    ids, mask = x[:, 0], x[:, 1]
    targets = torch.where(mask[:, 1:].bool(), ids[:, 1:], -100)
    ours = F.cross_entropy(lm(x), targets)
    labels = torch.where(mask.bool(), ids, -100)
    theirs = lm.model(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(ours, theirs)
    head = models.make("hf", input_shape=(2, 16), num_classes=2, seed=0, path=path, head="classifier",
                       finetune="head")
    assert models.count_parameters(head) == 8 * 2  # GPT-2's score head has no bias
    with pytest.raises(ValueError, match="single-token"):
        models.make("hf", input_shape=(2, 16), num_classes=2, seed=0, path=path, head="label_tokens",
                    label_tokens=["negative", "supercalifragilistic"])
    with pytest.raises(ValueError, match="one word per class"):
        models.make("hf", input_shape=(2, 16), num_classes=3, seed=0, path=path, head="label_tokens",
                    label_tokens=["negative"])


def test_bad_paths_and_options_are_named(tmp_path, saved_models):
    with pytest.raises(ValueError, match="does not exist.*local Hugging Face model directory"):
        models.make("hf", input_shape=(2, 8), num_classes=2, path=str(tmp_path / "nope"))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="not a Hugging Face model directory: no config.json.*weights.bin"):
        models.make("hf", input_shape=(2, 8), num_classes=2, path=str(tmp_path))
    with pytest.raises(ValueError, match="model.finetune must be one of"):
        models.make("hf", input_shape=(2, 8), num_classes=2, path=str(saved_models / "bert"), finetune="qlora")
    with pytest.raises(ValueError, match="has only 3 layers"):
        models.make("hf", input_shape=(2, 8), num_classes=2, path=str(saved_models / "bert"), layers=9)
    m = models.make("hf", input_shape=(2, 8), num_classes=2, path=str(saved_models / "bert"))
    with pytest.raises(ValueError, match=r"shape \(batch, 2, length\)"):
        m(torch.zeros(2, 8, dtype=torch.long))


def test_minilm_default_counts():
    m = models.make("minilm", input_shape=(2, 64), num_classes=3, seed=0)
    assert models.count_parameters(m, trainable_only=False) == 22_713_216 + 9216 + 1155
    assert models.count_parameters(m) == 9216 + 1155  # seed 000's LoRA r=1 on q/v of 6 layers + head
    assert m.attention == "auto"


# ------------------------------------------------------------------ the command line, end to end


def test_cli_train_and_compare_on_a_text_file(tmp_path):
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
              "--set", "data.batch_size=8", "--set", "model.layers=1"]
    rc = cli.main(["compare", "--task", "csv/minilm", *common, "--estimators", "forward_gradient,mezo",
                   "--budget", "steps=2", "--out", str(tmp_path / "cmp")])
    assert rc == 0
    fg = json.loads((tmp_path / "cmp" / "forward_gradient" / "summary.json").read_text())
    mz = json.loads((tmp_path / "cmp" / "mezo" / "summary.json").read_text())
    assert fg["status"] == mz["status"] == "completed"
    assert fg["model"]["options"]["attention"] == "eager" and mz["model"]["options"]["attention"] == "sdpa"
    assert fg["model"]["num_parameters"] == 2 * (384 + 384) + 384 * 2 + 2  # LoRA r=1 on q/v of 1 layer + head
    assert fg["model"]["num_parameters_total"] > 10_000_000
    assert 'tokenizer = "minilm"' in (tmp_path / "cmp" / "forward_gradient" / "config.toml").read_text()
    assert "trainable of" in (tmp_path / "cmp" / "report.md").read_text()


# ------------------------------------------------------------------ the small VLM and the shipped configs


def test_vqa_fusion_runs_every_estimator():
    from bpfree.data.vqa import ImageText

    model = models.make("vqa_fusion", input_shape=(3, 64, 64), num_classes=13, seed=0, layers=1, channels=[4, 8],
                        dim=16).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (4, 6), generator=g)
    x = ImageText(torch.randn(4, 3, 64, 64, generator=g), torch.stack([ids, torch.ones_like(ids)], dim=1))
    y = torch.randint(0, 13, (4,), generator=g)
    assert model(x).shape == (4, 13)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(n.startswith("image.") for n in trained) and any("lora_A" in n for n in trained)
    assert not any(n.startswith("text.") and "lora_" not in n for n in trained)  # the text tower is LoRA only
    closure = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    estimators.make("backprop").estimate(model, closure)
    plain = flat_grads(model).clone()
    estimators.make("backprop", checkpoint=["text.encoder.layer.0"]).estimate(model, closure)
    assert torch.equal(flat_grads(model), plain)
    for name in ("forward_gradient", "spsa", "mezo"):
        out = estimators.make(name).estimate(model, closure, generator=torch.Generator().manual_seed(0))
        assert math.isfinite(out.loss)
    assert model._kernel == "eager"  # forward mode switched the text tower's attention
    with pytest.raises(ValueError, match="ImageText"):
        model(ids)


@pytest.mark.parametrize("name", ["tweets-minilm-lora", "tweets-minilm-full", "tweets-minilm-head", "easyvqa-fusion"])
def test_shipped_configs_resolve_for_every_estimator(name):
    import pathlib

    from bpfree import config as C

    path = pathlib.Path(__file__).resolve().parents[1] / "configs" / f"{name}.toml"
    for est, kernel in (("backprop", "sdpa"), ("forward_gradient", "eager"), ("spsa", "sdpa"), ("mezo", "sdpa")):
        cfg = C.resolve(C.load(path, [f"estimator.name={est}"]))
        assert cfg.model.options["attention"] == kernel
        assert cfg.data.options["tokenizer"] == "minilm"
        assert C.resolve(C.load(path, [f"estimator.name={est}"])) == cfg


@pytest.mark.parametrize("finetune", ["lora", "head"])
def test_frozen_layers_carry_tangents_at_two_matmuls_and_the_same_estimate(finetune, monkeypatch):
    """LoRA's frozen Linear layers pass the tangent as W ẋ (``_lowrank.frozen_layer_tangents``):
    the estimate equals torch's own jvp rule's, at about 2 forward passes' FLOPs (2.07F)
    (torch's rule spends a third matmul per frozen layer on the weight's absent tangent: 2.70F)."""
    import contextlib

    from torch.utils.flop_counter import FlopCounterMode

    from bpfree.estimators import _lowrank

    model = tiny_bert(finetune, attention="eager")
    x, y = batch()

    def closure():
        return F.cross_entropy(model(x), y)

    def estimate_and_flops() -> tuple[torch.Tensor, int]:
        for p in model.parameters():
            p.grad = None
        with FlopCounterMode(display=False) as count:
            estimators.make("forward_gradient").estimate(model, closure, generator=torch.Generator().manual_seed(3))
        return flat_grads(model), count.get_total_flops()

    with FlopCounterMode(display=False) as fwd:
        with torch.no_grad():
            closure()
    g, flops = estimate_and_flops()
    monkeypatch.setattr(_lowrank, "frozen_layer_tangents", lambda model, skip=(): contextlib.nullcontext())
    g_torch, flops_torch = estimate_and_flops()
    assert torch.allclose(g, g_torch, rtol=1e-10, atol=1e-14) and g.abs().sum() > 0
    f = fwd.get_total_flops()
    if finetune == "lora":  # the tangent crosses every frozen layer after the first LoRA adapter
        assert flops < 2.1 * f and flops_torch > 2.6 * f
    else:  # head only: the tangent starts at the head, so no frozen layer sees one
        assert flops == flops_torch < 1.1 * f
