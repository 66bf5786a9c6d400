"""`moe-dist study loss-scale`: the gradient norms of each loss term on the gate, checked against
an independent computation, the weights, and the checkpoint it reads."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import REPO, tiny_mnist
from moe_dist.cli import main
from moe_dist.config import load_config
from moe_dist.experiments.loss_scale import run_gradient_scale
from moe_dist.rundir import RunDir

WEIGHTS = ["loss.importance_weight=0.5", "loss.ls_beta=1e-5", "loss.ls_gamma=1e-4", "loss.ls_variant=reference"]


def _run(tmp_path, data_root, *extra: str) -> RunDir:
    cfg = load_config(REPO / "configs" / "mnist" / "vanilla.yaml",
                      [*tiny_mnist(tmp_path / "run", data_root, "train.epochs=1"), *WEIGHTS, *extra])
    run = RunDir(cfg.run_dir)
    run.prepare()
    run.write_config(cfg)
    return run


def _first_batch_and_model(run: RunDir):
    from moe_dist.parallel import ParallelContext
    from moe_dist.train.build import build_network, build_run_data, load_data

    cfg = run.read_config()
    data = build_run_data(cfg, load_data(cfg), ParallelContext.local(), torch.device("cpu"))
    model = build_network(cfg, data.dataset, ParallelContext.local()).train()
    return model, next(data.train_batches.batches(0))[:2]


def test_ls_gradient_on_the_gate_probabilities_equals_the_closed_form(tmp_path, data_root):
    """d(beta S)/dP = beta (2/E) D P for the reference variant, D the max-normalised cdist
    distances; the tool reports its norm along the simplex (each row minus its mean)."""
    run = _run(tmp_path, data_root)
    result = run_gradient_scale(run, "init", 1, {})
    model, (x, _) = _first_batch_and_model(run)
    probs_BE = model(x).gate_probs.detach()
    dist_BB = torch.cdist(x.flatten(1).double(), x.flatten(1).double())
    dist_BB /= dist_BB.max()
    grad_BE = 2.0 / probs_BE.shape[1] * dist_BB @ probs_BE.double()
    along = grad_BE - grad_BE.mean(1, keepdim=True)
    assert result["unit"]["ls_same"]["probs"] == pytest.approx(float(along.norm()), rel=1e-5)
    assert result["weighted"]["ls_same"]["probs"] == pytest.approx(1e-5 * float(along.norm()), rel=1e-5)


def test_weights_scale_the_terms_and_overrides_replace_the_runs_own(tmp_path, data_root):
    run = _run(tmp_path, data_root)
    own = run_gradient_scale(run, "init", 2, {})
    doubled = run_gradient_scale(run, "init", 2, {"ls_beta": "2e-5", "importance": "0"})
    for where in ("probs", "gate"):
        assert own["unit"]["ls_same"][where] > 0 and own["unit"]["importance"][where] > 0
        assert doubled["unit"]["ls_same"][where] == pytest.approx(own["unit"]["ls_same"][where], rel=1e-6)
        assert doubled["weighted"]["ls_same"][where] == pytest.approx(2 * own["weighted"]["ls_same"][where], rel=1e-6)
        assert doubled["weighted"]["importance"][where] == 0.0
        assert own["weighted"]["importance"][where] == pytest.approx(0.5 * own["unit"]["importance"][where])
        assert own["ratio_to_nll"]["ls_different"][where] == pytest.approx(
            own["weighted"]["ls_different"][where] / own["weighted"]["nll"][where])
    assert doubled["weights"] == {"importance": 0.0, "ls_beta": 2e-5, "ls_gamma": 1e-4, "ls_variant": "reference"}


def test_latest_reads_the_trained_checkpoint_and_the_cli_writes_table_and_json(tmp_path, data_root, capsys):
    run = _run(tmp_path, data_root)
    with pytest.raises(Exception, match="checkpoint"):
        run_gradient_scale(run, "latest", 1, {})
    assert main(["train", "--config", str(run.config_path)]) == 0
    init, latest = (run_gradient_scale(run, at, 2, {}) for at in ("init", "latest"))
    assert latest["unit"]["nll"]["gate"] != pytest.approx(init["unit"]["nll"]["gate"], rel=1e-3)
    out = tmp_path / "scale"
    assert main(["study", "loss-scale", str(run.path), "--at", "latest", "--batches", "2", "--out", str(out)]) == 0
    assert str(run.path) in capsys.readouterr().out
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved[0]["unit"]["nll"]["gate"] == pytest.approx(latest["unit"]["nll"]["gate"], rel=1e-6)
    assert "L_s same / NLL" in out.with_suffix(".md").read_text()
    assert main(["study", "loss-scale", str(run.path), "--weights", "beta=1"]) != 0
    assert "--weights 'beta=1': expected key=value with key one of importance, ls_beta" in capsys.readouterr().err
    assert main(["study", "loss-scale", str(run.path), "--weights", "ls_beta=big"]) != 0
    assert "--weights ls_beta='big': not a number" in capsys.readouterr().err
