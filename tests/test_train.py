"""The training loop: every estimator x optimizer, budgets, clipping, schedule, divergence,
interruption, failure, and identical data order across estimators."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F

from bpfree import config as C
from bpfree import data, estimators, models, runs, train


def tiny(name: str = "backprop", **sections) -> C.Config:
    """A config that trains in milliseconds: 200 Gaussian-blob examples, a 10-8-4 MLP."""
    raw = {
        "data": {"name": "synthetic", "num_train": 200, "num_test": 100, "batch_size": 32},
        "model": {"name": "mlp", "hidden": [8]},
        "estimator": {"name": name},
        "train": {"max_steps": 4, "warmup": False, "measure": False},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return C.from_dict(raw)


def read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_summary(run_dir) -> dict:
    return json.loads((run_dir / "summary.json").read_text())  # strict JSON: no NaN


@pytest.mark.parametrize("optimizer", C.OPTIMIZERS)
@pytest.mark.parametrize("estimator", estimators.available())
def test_every_estimator_and_optimizer_runs(tmp_path, estimator, optimizer):
    summary = train.run(tiny(estimator, optimizer={"name": optimizer}, train={"eval_every_steps": 2}), tmp_path)
    assert summary["status"] == "completed" and summary["stopped_by"] == "max_steps"
    assert summary["steps"] == 4
    assert summary == read_summary(tmp_path)
    metrics = read_csv(tmp_path / "metrics.csv")
    assert [int(r["step"]) for r in metrics] == [1, 2, 3, 4]
    assert all(math.isfinite(float(r["loss"])) and float(r["grad_norm"]) > 0 for r in metrics)
    fp = [float(r["forward_passes"]) for r in metrics]
    assert float(metrics[-1]["forward_passes_total"]) == pytest.approx(sum(fp))
    assert summary["forward_passes_per_step"] == pytest.approx(sum(fp) / 4)
    evals = read_csv(tmp_path / "eval.csv")
    assert [(int(r["step"]), r["split"]) for r in evals] == [
        (0, "val"), (2, "val"), (4, "val"), (4, "train"), (4, "test")
    ]
    for split in ("train", "val", "test"):
        assert 0 <= summary[f"final_{split}_accuracy"] <= 1
    assert summary["estimator"]["name"] == estimator and "synthetic" in summary["data_source"]
    assert summary["torch_version"] == torch.__version__
    # the written config is the fully resolved one and reproduces the run's settings
    resolved = C.resolve(tiny(estimator, optimizer={"name": optimizer}, train={"eval_every_steps": 2}))
    assert C.load(tmp_path / "config.toml") == resolved


def test_same_seed_same_batches_across_estimators(tmp_path, monkeypatch):
    seen: dict[str, list[torch.Tensor]] = {}
    original = train._Loop.train_step

    def recording(self, x, y):
        seen.setdefault(self.cfg.estimator.name + str(self.cfg.train.seed), []).append(y.clone())
        return original(self, x, y)

    monkeypatch.setattr(train._Loop, "train_step", recording)
    for name in ("backprop", "spsa", "forward_gradient"):
        train.run(tiny(name, train={"max_steps": 10}), tmp_path / name)
    train.run(tiny("backprop", train={"max_steps": 10, "seed": 1}), tmp_path / "seed1")
    reference = seen["backprop0"]
    assert len(reference) == 10  # crosses an epoch boundary (6 batches per epoch)
    for name in ("spsa0", "forward_gradient0"):
        assert all(torch.equal(a, b) for a, b in zip(reference, seen[name], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(reference, seen["backprop1"]))


def test_runs_are_reproducible(tmp_path):
    a = train.run(tiny("forward_gradient"), tmp_path / "a")
    b = train.run(tiny("forward_gradient"), tmp_path / "b")
    losses = [[r["loss"] for r in read_csv(tmp_path / d / "metrics.csv")] for d in ("a", "b")]
    assert losses[0] == losses[1] and a["final_val_loss"] == b["final_val_loss"]


def test_epoch_budget_evaluates_every_epoch(tmp_path):
    summary = train.run(tiny(train={"max_steps": None, "epochs": 2}), tmp_path)
    assert summary["stopped_by"] == "epochs" and summary["steps"] == 2 * summary["steps_per_epoch"] == 12
    val_steps = [int(r["step"]) for r in read_csv(tmp_path / "eval.csv") if r["split"] == "val"]
    assert val_steps == [0, 6, 12]
    assert {int(r["epoch"]) for r in read_csv(tmp_path / "metrics.csv")} == {1, 2}


def test_seconds_budget(tmp_path):
    summary = train.run(tiny(train={"max_steps": None, "max_seconds": 1e-9}), tmp_path)
    assert summary["stopped_by"] == "max_seconds" and summary["steps"] == 1


def test_clipping_records_the_pre_clip_norm(tmp_path, monkeypatch):
    cfg = C.resolve(tiny(train={"max_steps": 1, "clip_grad_norm": 1e-3}))
    # the exact gradient of the first batch, from the same initial weights and batch order
    splits = data.load("synthetic", num_train=200, num_test=100)
    model = models.make("mlp", input_shape=splits.input_shape, num_classes=4, seed=0, hidden=[8])
    x, y = next(iter(data.batches(splits.train, 32, generator=torch.Generator().manual_seed(0))))
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    exact_norm = float(torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads])))

    clipped = []
    original = torch.optim.Adam.step

    def spy(self, *a, **k):
        grads = [p.grad.reshape(-1) for p in self.param_groups[0]["params"]]
        clipped.append(float(torch.linalg.vector_norm(torch.cat(grads))))
        return original(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    train.run(cfg, tmp_path)
    recorded = float(read_csv(tmp_path / "metrics.csv")[0]["grad_norm"])
    assert recorded == pytest.approx(exact_norm, rel=1e-5) and recorded > 1e-2
    assert clipped[-1] == pytest.approx(1e-3, rel=1e-3)  # the run's one step (the cost measurement steps a copy first)


def test_exponential_decay_per_step(tmp_path):
    train.run(tiny(optimizer={"name": "sgd", "lr": 0.1}, schedule={"decay": 0.05}), tmp_path)
    lrs = [float(r["lr"]) for r in read_csv(tmp_path / "metrics.csv")]
    assert lrs == pytest.approx([0.1 * math.exp(-0.05 * t) for t in range(4)], rel=1e-12)


def test_divergence_stops_with_status_step_and_intact_metrics(tmp_path):
    summary = train.run(tiny(optimizer={"name": "sgd", "lr": 1e12}, train={"max_steps": 50}), tmp_path)
    assert summary["status"] == "diverged" == read_summary(tmp_path)["status"]
    step = summary["diverged_at_step"]
    assert 1 < step < 50 and summary["steps"] == step and f"step {step}" in summary["reason"]
    metrics = read_csv(tmp_path / "metrics.csv")
    assert [int(r["step"]) for r in metrics] == list(range(1, step + 1))
    last = metrics[-1]
    bound = summary["divergence_bound"]
    assert bound == pytest.approx(100 * float(metrics[0]["loss"]))  # train.divergence_factor x the first loss
    assert not math.isfinite(float(last["loss"])) or float(last["loss"]) > bound
    assert "divergence bound" in summary["reason"] and "the update was not applied" in summary["reason"]
    assert all(math.isfinite(float(r["loss"])) and float(r["loss"]) <= bound for r in metrics[:-1])
    # a diverged model is no result: no final loss or accuracy, no train/test evaluation
    assert all(summary[f"final_{s}_{m}"] is None for s in ("train", "val", "test") for m in ("loss", "accuracy"))
    assert {r["split"] for r in read_csv(tmp_path / "eval.csv")} == {"val"}


def test_divergence_bound_from_config_and_validation_loss(tmp_path):
    # an absolute bound below the step-0 validation loss stops the run at once, as diverged at step 0
    summary = train.run(tiny(train={"divergence_bound": 1e-3}), tmp_path / "a")
    assert summary["status"] == "diverged" and summary["diverged_at_step"] == 0 and summary["steps"] == 0
    assert summary["reason"].startswith("validation loss") and "train.divergence_bound" in summary["reason"]
    # a bound the run never reaches leaves it completed
    summary = train.run(tiny(train={"divergence_bound": 1e6}), tmp_path / "b")
    assert summary["status"] == "completed" and summary["divergence_bound"] == 1e6


def test_divergence_from_a_nan_closure(tmp_path, monkeypatch):
    original = F.cross_entropy
    calls = {"n": 0}

    def nan_on_third_step(*a, **k):
        calls["n"] += 1
        out = original(*a, **k)
        return out * math.nan if calls["n"] == 3 else out

    monkeypatch.setattr(train.F, "cross_entropy", nan_on_third_step)
    summary = train.run(tiny(train={"eval_every_steps": 100}), tmp_path)  # call 1 is the step-0 eval
    assert summary["status"] == "diverged" and summary["diverged_at_step"] == 2
    assert summary["reason"].startswith("loss is nan")


def test_keyboard_interrupt_leaves_a_valid_summary(tmp_path, monkeypatch):
    original = train._Loop.train_step

    def interrupt_at_step_3(self, x, y):
        if self.step == 2:
            raise KeyboardInterrupt
        return original(self, x, y)

    monkeypatch.setattr(train._Loop, "train_step", interrupt_at_step_3)
    summary = train.run(tiny(train={"max_steps": 10}), tmp_path)
    assert summary["status"] == "interrupted" == read_summary(tmp_path)["status"]
    assert summary["steps"] == 2 and len(read_csv(tmp_path / "metrics.csv")) == 2
    assert summary["final_val_accuracy"] is not None  # the step-0 evaluation
    assert summary["final_test_accuracy"] is None  # no evaluation after Ctrl-C


def test_failure_is_recorded_and_raised(tmp_path, monkeypatch):
    def boom(self, *a, **k):
        raise RuntimeError("estimator exploded")

    monkeypatch.setattr(estimators.forward_gradient.ForwardGradient, "_estimate", boom)
    with pytest.raises(RuntimeError, match="exploded"):
        train.run(tiny("forward_gradient"), tmp_path)
    summary = read_summary(tmp_path)
    assert summary["status"] == "failed" and "exploded" in summary["reason"]
    assert "RuntimeError" in (tmp_path / "error.txt").read_text()


def test_status_running_while_training(tmp_path, monkeypatch):
    statuses = []
    original = train._Loop.train_step

    def peek(self, x, y):
        statuses.append(read_summary(tmp_path)["status"])
        return original(self, x, y)

    monkeypatch.setattr(train._Loop, "train_step", peek)
    train.run(tiny(), tmp_path)
    assert statuses == ["running"] * 4 and read_summary(tmp_path)["status"] == "completed"


def test_existing_run_is_not_overwritten(tmp_path):
    train.run(tiny(), tmp_path)
    with pytest.raises(runs.RunExistsError):
        train.run(tiny(), tmp_path)
    assert train.run(tiny(), tmp_path, overwrite=True)["status"] == "completed"


def test_mezo_update_mode_skips_the_optimizer(tmp_path):
    summary = train.run(tiny("mezo", estimator={"lr": 1e-2}), tmp_path)
    metrics = read_csv(tmp_path / "metrics.csv")
    assert summary["status"] == "completed" and all(r["grad_norm"] == "" for r in metrics)


def test_warmup_does_not_change_the_run(tmp_path):
    cold = train.run(tiny("spsa", train={"warmup": False}), tmp_path / "cold")
    warm = train.run(tiny("spsa", train={"warmup": True}), tmp_path / "warm")
    losses = [[r["loss"] for r in read_csv(tmp_path / d / "metrics.csv")] for d in ("cold", "warm")]
    assert losses[0] == losses[1] and cold["final_test_loss"] == warm["final_test_loss"]


def test_bad_model_for_data_is_a_config_error(tmp_path):
    with pytest.raises(C.ConfigError):
        train.run(tiny(model={"name": "cnn_mnist", "hidden": 8}), tmp_path)
    assert not tmp_path.joinpath("summary.json").exists()


def test_summary_records_step_flops_and_memory_by_category(tmp_path):
    summary = train.run(tiny("forward_gradient", estimator={"rank": "full"}, train={"measure": True}), tmp_path)
    # 10-8-4 MLP, batch 32: forward 2·32·(10·8 + 8·4) FLOPs; a jvp costs 3 forwards
    assert summary["flops_forward"] == 2 * 32 * (10 * 8 + 8 * 4)
    assert summary["flops_forward_equivalents"] == pytest.approx(3.0)
    cats = summary["memory_by_category_mb"]
    params_mb = (10 * 8 + 8 + 8 * 4 + 4) * 4 / 2**20
    assert cats["parameters"] == pytest.approx(params_mb)
    assert cats["optimizer_state"] >= 2 * params_mb  # Adam moments
    assert summary["peak_memory_mb"] >= sum(cats.values()) - 1e-9
    assert summary["peak_over_inference"] > 1
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["flops_per_step"] == summary["flops_per_step"] > 0


def test_save_model_writes_the_final_parameters(tmp_path):
    import torch

    from bpfree import models

    summary = train.run(tiny(train={"max_steps": 3, "save_model": True}), tmp_path / "r")
    state = torch.load(tmp_path / "r" / "model.pt")
    model = models.make("mlp", input_shape=(8,), num_classes=3, hidden=[16], seed=0)
    assert set(state) == set(model.state_dict()) and summary["steps"] == 3
    assert not (tmp_path / "r" / "model.pt.part").exists()
    train.run(tiny(train={"max_steps": 3}), tmp_path / "r", overwrite=True)  # without it, no stale model.pt
    assert not (tmp_path / "r" / "model.pt").exists()


def test_eval_train_examples_evaluates_a_fixed_sample_and_records_its_size(tmp_path):
    full = train.run(tiny(), tmp_path / "full")
    assert full["train_eval_examples"] == len(data.load("synthetic", num_train=200, num_test=100).train)
    sampled = train.run(tiny(train={"eval_train_examples": 37}), tmp_path / "sampled")
    assert sampled["train_eval_examples"] == 37
    # the sample changes only the train evaluation: same training, same validation and test numbers
    losses = [[r["loss"] for r in read_csv(tmp_path / d / "metrics.csv")] for d in ("full", "sampled")]
    assert losses[0] == losses[1]
    assert [full[k] for k in ("final_val_loss", "final_test_loss")] == \
        [sampled[k] for k in ("final_val_loss", "final_test_loss")]
    assert sampled["final_train_loss"] != full["final_train_loss"]
    again = train.run(tiny(train={"eval_train_examples": 37}), tmp_path / "again")
    assert again["final_train_loss"] == sampled["final_train_loss"]  # the sample is fixed by train.seed
    with pytest.raises(C.ConfigError, match="eval_train_examples"):
        C.resolve(tiny(train={"eval_train_examples": 0}))
