"""Allowed values live in moe_dist.config.CHOICES and each rule in one function, which the
config and the modules built without a config (MoE, PatchExpert, NormalizedGD) share;
dotted keys are set through OmegaConf (config.set_values, config.with_values)."""

from __future__ import annotations

import pytest
import torch

from moe_dist import losses
from moe_dist.config import CHOICES, Config, load_config, set_values
from moe_dist.data import registry, synthetic
from moe_dist.errors import ConfigError
from moe_dist.models.build import ARCH_CLASSES
from moe_dist.models.experts import PatchExpert
from moe_dist.models.ffn import FFNExpertBank
from moe_dist.models.moe import MoE
from moe_dist.train.optim import NormalizedGD


def test_modules_take_their_allowed_values_from_config_choices():
    assert registry.DATASETS is CHOICES["data.name"]
    assert registry.NORMALIZATIONS is CHOICES["data.normalization"]
    assert losses.SIMILARITY_VARIANTS is CHOICES["loss.ls_variant"]
    # Tables keyed by an allowed value must cover exactly those values.
    assert tuple(ARCH_CLASSES) == CHOICES["model.arch"]
    assert tuple(synthetic.SETTINGS) == CHOICES["data.setting"]


def _moe(**kwargs) -> MoE:
    bank = FFNExpertBank.create(2, hidden_size=4, ffn_size=8)
    return MoE(bank, torch.nn.Linear(4, 2, bias=False), output_kind="logits", **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"routing": "topk", "top_k": 3}, "moe.top_k=3 exceeds moe.num_experts=2"),
    ({"routing": "topk", "top_k": 0}, "moe.top_k=0 must be a positive integer"),
    ({"routing": "sparse"}, "moe.routing='sparse' is not one of: dense, topk, attentive"),
    ({"noise": "pink"}, "moe.noise='pink' is not one of: none, gaussian, uniform"),
])
def test_a_moe_built_without_a_config_checks_the_config_rules(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        _moe(**kwargs)
    with pytest.raises(ValueError, match=message):  # what these modules raised before
        _moe(**kwargs)
    assert _moe(routing="topk", top_k=2).top_k == 2


def test_config_and_modules_report_a_rule_with_one_message():
    with pytest.raises(ConfigError, match="^moe.top_k=3 exceeds moe.num_experts=2$"):
        load_config(None, ["moe.num_experts=2", "moe.top_k=3"])
    with pytest.raises(ConfigError, match="^moe.top_k=0 must be a positive integer$"):
        load_config(None, ["moe.top_k=0"])
    with pytest.raises(ConfigError, match="model.expert_activation='square' is not one of: cubic, linear"):
        PatchExpert(activation="square")
    with pytest.raises(ConfigError, match="train.normalized_gd_scope='layer' is not one of: expert, tensor"):
        NormalizedGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1, scope="layer")
    with pytest.raises(ValueError, match="normalized.*reference"):
        losses.sample_similarity_loss(torch.zeros(2, 3), torch.full((2, 2), 0.5), 1.0, 1.0, variant="other")
    with pytest.raises(ConfigError, match="data.num_workers=-1 must be >= 0"):
        load_config(None, ["data.num_workers=-1"])


def test_set_values_sets_typed_dotted_keys_on_a_copy():
    cfg = Config()
    new = set_values(cfg, {"train.freeze": ["gate"], "moe.top_k": 2, "run_dir": "runs/a b", "train.lr": 1})
    assert (new.train.freeze, new.moe.top_k, new.run_dir, new.train.lr) == (["gate"], 2, "runs/a b", 1.0)
    assert isinstance(new, Config) and cfg == Config()  # the original is untouched
    with pytest.raises(ConfigError, match=r"^unknown config key 'moe\.nope'; did you mean moe\.noise\? "):
        set_values(cfg, {"moe.nope": 1})
    with pytest.raises(ConfigError, match=r"^unknown config key 'moe\.routing\.x'; did you mean moe\.routing\? "):
        set_values(cfg, {"moe.routing.x": 1})
    with pytest.raises(ConfigError, match=r"^bad value for 'seed': Value 'abc' of type 'str' could not be"):
        set_values(cfg, {"seed": "abc"})


def test_with_values_validates_the_copy():
    from moe_dist.config import with_values

    cfg = load_config(None, ["moe.num_experts=4"])
    assert with_values(cfg, {"moe.routing": "topk", "moe.top_k": 4}).moe.top_k == 4
    with pytest.raises(ConfigError, match="moe.top_k=5 exceeds moe.num_experts=4"):
        with_values(cfg, {"moe.routing": "topk", "moe.top_k": 5})
    with pytest.raises(ConfigError, match="unknown config key 'train.frozen'"):
        with_values(cfg, {"train.frozen": ["gate"]})
