from pathlib import Path

import pytest

from moe_dist.cli import main
from moe_dist.config import load_config
from moe_dist.errors import ConfigError

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"
CONFIGS = sorted(p for p in CONFIG_ROOT.rglob("*.yaml") if p.parent.name != "sweeps")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_every_shipped_config_loads_and_documents_itself(path):
    cfg = load_config(path)
    text = path.read_text()
    assert text.startswith("# moe-dist "), "configs start with the command that runs them"
    assert cfg.name and cfg.name.split("/")[-1] == path.stem


def test_overrides_apply_in_order():
    cfg = load_config(None, ["moe.num_experts=8", "moe.top_k=2", "train.epochs=3", "seed=7"])
    assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.train.epochs, cfg.seed) == (8, 2, 3, 7)


def test_mixed_precision_no_survives_yaml_booleans(tmp_path):
    # `no` is a YAML boolean; the override and a config file must both mean full precision.
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  mixed_precision: no\n")
    assert load_config(path).train.mixed_precision == "no"
    assert load_config(None, ["train.mixed_precision=bf16"]).train.mixed_precision == "bf16"


@pytest.mark.parametrize("overrides, message", [
    (["moe.experts=3"], "unknown key 'moe.experts'"),
    (["bogus=1"], "unknown key 'bogus'"),
    (["moe.routing=sparse"], "moe.routing='sparse' is not one of: dense, topk, attentive"),
    (["data.name=imagenet", "model.arch=mnist"], "data.name='imagenet' is not one of"),
    (["moe.top_k=6"], "moe.top_k=6 exceeds moe.num_experts=5"),
    (["moe.num_experts=0"], "moe.num_experts=0 must be a positive integer"),
    (["train.epochs=-2"], "train.epochs=-2 must be a positive integer"),
    (["train.lr=0"], "train.lr=0.0 must be > 0"),
    (["train.epochs=many"], "bad value for 'train.epochs'"),
    (["model.arch=mnist"], "does not fit data.name='synthetic'"),
    (["train.freeze=[router]"], "train.freeze entry 'router'"),
    (["parallel.ep_size=6"], "parallel.ep_size=6 exceeds moe.num_experts=5"),
    (["epochs"], "not of the form dotted.key=value"),
])
def test_bad_config_names_key_and_allowed_values(overrides, message):
    with pytest.raises(ConfigError, match=None) as info:
        load_config(None, overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("moe:\n  num_expert: 4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'moe.num_expert'"):
        load_config(path)


def test_cli_prints_one_line_error_and_exits_2(capsys, tmp_path):
    assert main(["train", f"run_dir={tmp_path}", "moe.routing=bogus"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moe-dist: error: moe.routing='bogus'") and "\n" not in err
    assert not (tmp_path / "config.yaml").exists()


def test_single_model_takes_any_ep_size():
    # no experts to divide: a sweep with --nproc 2 parallel.ep_size=2 may hold single models
    cfg = load_config(CONFIG_ROOT / "synthetic" / "s1_single_linear.yaml", ["parallel.ep_size=6"])
    assert cfg.parallel.ep_size == 6 and cfg.model.kind == "single"
    with pytest.raises(ConfigError, match="parallel.ep_size=6 exceeds moe.num_experts=5"):
        load_config(CONFIG_ROOT / "synthetic" / "s1_single_linear.yaml", ["parallel.ep_size=6", "model.kind=moe"])
