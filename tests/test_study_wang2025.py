"""The seed-001 study machinery, end to end on its seconds-long smoke preset."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from bpfree import cli, models
from bpfree.studies import wang2025


def test_presets_parse_and_every_spec_plans(tmp_path):
    table = wang2025.presets()
    assert {"cpu", "paper", "smoke"} <= set(table)
    assert table["paper"].epochs == 300 and table["paper"].widths == (64, 128, 256, 512)
    for preset in table.values():
        planned = wang2025.planned_runs(preset, tmp_path)
        assert len({p[4] for p in planned}) == len(planned)  # shared runs (e.g. W^T in the k sweep) appear once
        for _, width, _, cfg, _ in planned:
            assert cfg.model.options["width"] == width and cfg.train.epochs == preset.epochs
            assert cfg.optimizer.name == "adamw" and cfg.optimizer.lr == 1e-4 and cfg.data.batch_size == 512


def test_the_true_gradient_lies_in_the_row_space_of_the_upstream_jacobian():
    model = models.make("mlp_mnist1d", input_shape=(40,), num_classes=10, width=24, depth=3, seed=0).double()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 40, generator=g, dtype=torch.float64), torch.randint(0, 10, (32,), generator=g)
    shares = wang2025.subspace_energy(model, x, y, ks=(1, 10, 24))
    assert set(shares) == {"layer0", "layer1", "layer2"}
    for layer in shares.values():
        assert layer[1] <= layer[10] <= layer[24]
        assert abs(layer[24] - 1.0) < 1e-9  # g_i = W̃ᵀ g_{i+1}: all of it is in the (full) row space
    assert abs(shares["layer2"][10] - 1.0) < 1e-9  # W̃ = W_out M has rank <= 10
    assert model[0].weight.grad is None  # the measurement leaves no gradients behind


def test_smoke_study_writes_report_and_resumes(tmp_path, capsys):
    out = tmp_path / "study"
    assert cli.main(["study", "run", "wang2025", "--preset", "smoke", "--out", str(out)]) == 0
    record = json.loads((out / "study.json").read_text())
    assert record["preset"]["name"] == "smoke"
    assert all(r["status"] == "completed" for r in record["training"])
    assert {r["method"] for r in record["training"]} == {"activity_perturbation", "wt_guess", "w_perp", "backprop"}
    assert set(record["quality"]) == {"16", "32"}
    assert record["quality"]["16"]["trained"] is not None
    for name in ("report.md", "report.html", "accuracy_vs_width.png", "cosine_vs_width_init.png", "energy_trained.png",
                 "training_loss.png"):
        assert (out / name).stat().st_size > 0, name
    md = (out / "report.md").read_text()
    assert "Train accuracy by width" in md and "k sweep" in md and "What reproduces" in md
    assert "## Memory" in md and "What dominates each peak" in md
    from report_checks import assert_self_contained

    assert_self_contained((out / "report.html").read_text())
    # a second run reuses every finished training run
    assert cli.main(["study", "run", "wang2025", "--preset", "smoke", "--out", str(out)]) == 0
    assert capsys.readouterr().err.count("reusing the finished run") == len(record["training"])
    # the report can be rebuilt from study.json alone
    (out / "report.md").unlink()
    assert cli.main(["study", "run", "wang2025", "--preset", "smoke", "--out", str(out), "--report-only"]) == 0
    assert "Train accuracy by width" in (out / "report.md").read_text()
    assert cli.main(["study", "run", "wang2025", "--out", str(tmp_path / "none"), "--report-only"]) == 2


def test_report_tables_put_the_papers_numbers_beside_ours():
    record = {
        "preset": {"name": "x", "k_sweep_width": 128, "k_sweep": ["wt_guess", "w_perp:k=1"], "epochs": 300},
        "training": [
            {"part": "width", "width": 128, "method": m, "spec": m, "status": "completed", "final_train_accuracy": a,
             "final_test_accuracy": a}
            for m, a in (("forward_gradient", 0.1), ("activity_perturbation", 0.3), ("wt_guess", 0.33),
                         ("w_perp", 0.35), ("backprop", 0.7))
        ] + [{"part": "k_sweep", "width": 128, "method": "w_perp", "spec": "w_perp:k=1", "status": "completed",
              "final_train_accuracy": 0.25, "final_test_accuracy": 0.2}],
    }
    header, body = wang2025.width_table(record)
    assert body == [["128", "0.100 / 0.124", "0.300 / 0.275", "0.330 / 0.312", "0.350 / 0.323", "0.700 / 0.709"]]
    _, k_body = wang2025.k_sweep_table(record)
    assert k_body[1][1:] == ["0.250", "0.200", "0.275"]
    verdict = wang2025.verdicts(record)
    assert "holds at widths [128]" in verdict[0]


def test_closure_of_the_fixed_batch_is_deterministic():
    preset = wang2025.get_preset("smoke")
    m1, x1, y1 = wang2025._fixed_batch(preset, 16)
    m2, x2, y2 = wang2025._fixed_batch(preset, 16)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert F.cross_entropy(m1(x1), y1).item() == F.cross_entropy(m2(x2), y2).item()


def test_study_cli_lists_studies_and_explains_bad_names(capsys):
    assert cli.main(["study", "list"]) == 0
    assert "wang2025" in capsys.readouterr().out
    assert cli.main(["study", "run", "wang2024"]) == 2
    assert "unknown study 'wang2024'; available: rike2024, wang2025" in capsys.readouterr().err
    assert cli.main(["study", "run", "wang2025", "--preset", "gpu"]) == 2
    assert "choose one of cpu, paper, smoke" in capsys.readouterr().err
