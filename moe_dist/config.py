"""Typed configuration: one dataclass per concern, loaded from YAML with dotted overrides.

OmegaConf does the merging (file onto defaults, then ``key=value`` overrides); this module
adds what OmegaConf does not: one-line errors that name the key and the allowed values, and
cross-field checks (``top_k`` <= experts, positive sizes, known dataset names).
"""

from __future__ import annotations

import dataclasses
import difflib
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from moe_dist.errors import ConfigError

#: The config files shipped in the checkout (``pip install -e .`` keeps them beside the package).
CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# Allowed values of the string-valued keys; ``validate`` checks every one of them.
CHOICES: dict[str, tuple[str, ...]] = {
    "data.name": ("mnist", "fashion_mnist", "mnist10k", "cifar100", "fmnist_mnist", "synthetic"),
    "data.normalization": ("paper", "half", "none"),
    "data.setting": ("s1", "s2", "s3", "s4"),
    "data.format": ("memory", "webdataset"),
    "model.arch": ("mnist", "fmnist", "fmnist_mnist", "cifar100", "patch_cnn"),
    "model.kind": ("moe", "single"),
    "model.expert_activation": ("cubic", "linear"),
    "moe.routing": ("dense", "topk", "attentive", "hierarchical"),
    "moe.gate_weights": ("softmax", "raw", "probs"),
    "moe.noise": ("none", "gaussian", "uniform"),
    "loss.ls_variant": ("normalized", "reference"),
    "loss.kind": ("auto", "mixture_nll", "cross_entropy", "double_softmax"),
    "train.optimizer": ("adam", "rmsprop", "sgd", "normalized_gd"),
    "train.normalized_gd_scope": ("expert", "tensor"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.mixed_precision": ("no", "bf16", "fp16"),
    "engine": ("moe_dist", "deepspeed"),
}

#: The command that lists every key with its type, default and meaning (moe_dist/config_cli.py).
KEYS_COMMAND = "moe-dist config keys"

# Values renamed since runs were written: a saved config.yaml still says the old one.
# ``engine: accelerate`` was the name of what is now ``moe_dist`` (accelerate did the
# single-process mixed precision, never the multi-process gradient sums).
RENAMED_VALUES: dict[str, dict[str, str]] = {"engine": {"accelerate": "moe_dist"}}

# Keys that may differ between a run and its resumption: extending a run is allowed,
# checkpoints are independent of the expert layout (parallel.ep_size) and of the engine that
# wrote them (engine, parallel.zero_stage: every engine saves the native optimizer layout), and
# how long ranks wait for each other (parallel.timeout_s) does not change what they compute.
RESUMABLE_CHANGES = frozenset({"train.epochs", "train.progress", "train.num_threads", "train.eval_every",
                               "parallel.ep_size", "parallel.timeout_s", "engine", "parallel.zero_stage"})


@dataclass
class DataConfig:
    name: str = "synthetic"
    """Dataset: mnist | fashion_mnist | mnist10k | cifar100 | fmnist_mnist | synthetic."""
    root: str = ""
    """Folder holding the dataset files; empty means $MOE_DIST_DATA, else ./data."""
    normalization: str = "paper"
    """paper (each dataset's published mean/std) | half ((x-0.5)/0.5, paper Section 4) | none."""
    setting: str = "s1"
    """Chen et al. synthetic setting s1..s4 (docs/papers.md B.1); synthetic data only."""
    data_seed: int = -1
    """Seed of the synthetic data; -1 uses the setting's published seed (s1: 12, else 11)."""
    train_size: int = 0
    """Use only the first N training samples (paper Section 4: 10,000); 0 = all."""
    test_size: int = 0
    """Use only the first N test samples (paper Section 4: 2,000); 0 = all."""
    classes: list[int] = field(default_factory=list)
    """Train and test on these classes only, labels unchanged (docs/papers.md A.6 pretrained
    experts); empty = all classes."""
    format: str = "memory"
    """memory (load the dataset's files into tensors) | webdataset (data.root is a folder of tar
    shards written by `moe-dist data shards`: training streams resampled shards, the test
    split is read into memory)."""
    num_workers: int = 0
    """data.format=webdataset: DataLoader worker processes reading shards; 0 reads in the
    training process."""


@dataclass
class ModelConfig:
    arch: str = "patch_cnn"
    """Architecture family of experts and gate (docs/papers.md A.1 / B.2)."""
    kind: str = "moe"
    """moe | single (one expert-shaped network, the paper's baseline)."""
    expert_activation: str = "cubic"
    """patch_cnn only: cubic (Chen's nonlinear expert) | linear."""
    width: int = 0
    """patch_cnn only: filters per class m; 0 = paper default (8 in a MoE, 40 single)."""
    expert_init_scale: float = 1.0
    """Multiplies expert initial weights (Chen et al. use 0.001 for MoE experts)."""


@dataclass
class MoEConfig:
    num_experts: int = 5
    """Number of experts E."""
    routing: str = "dense"
    """dense (output mixture) | topk (only k experts run) | attentive (paper section 5) |
    hierarchical (a group gate picks moe.top_groups of moe.num_groups groups, an expert gate
    picks moe.top_k experts inside each; only those run; docs/design.md, choice 2)."""
    top_k: int = 1
    """Experts per sample in topk routing; hierarchical: experts chosen inside each chosen
    group (at most E / moe.num_groups), so a sample runs top_groups x top_k experts."""
    num_groups: int = 1
    """hierarchical only: groups G of E / G consecutive experts (G must divide
    moe.num_experts); a group lives on one expert-parallel rank, so parallel.ep_size <= G."""
    top_groups: int = 1
    """hierarchical only: groups chosen per sample by the group gate (1..moe.num_groups)."""
    gate_weights: str = "softmax"
    """How the chosen experts' outputs are weighted. softmax: the gate probabilities
    renormalised over the chosen (topk: over the k; hierarchical: over the chosen groups and,
    inside each, over its chosen experts, so a sample's weights sum to 1) | raw (topk only:
    Chen's unnormalised router value) | probs (not renormalised: topk p(e), hierarchical
    p(g) p(e|g), as Switch Transformer weights its top-1 expert, so a top-1 gate still
    learns from the task loss)."""
    noise: str = "none"
    """Routing noise: none | gaussian (noisy top-k) | uniform (Chen's U[0,1) per expert)."""
    noise_std: float = 1.0
    """Standard deviation of the gaussian routing noise."""
    eval_noise: bool = False
    """Also add routing noise at evaluation: Chen's code never calls eval() (docs/papers.md B.2)."""
    temperature: float = 1.0
    """Gate softmax temperature T (the paper uses 1)."""
    capacity_factor: float = 0.0
    """topk and hierarchical: each rank sends at most ceil(capacity_factor * B_rank * K / E) samples
    to each expert (top-1 choices first), dropping the rest; 0 = dropless (the default).
    The drop rate and padding ratio are then logged (moe/drop_rate, moe/padding_ratio)."""


@dataclass
class LossConfig:
    kind: str = "auto"
    """auto (mixture NLL for probability experts, CE for logit experts) or an explicit loss."""
    importance_weight: float = 0.0
    """w_importance of L_cv (docs/papers.md A.2.1); 0 disables it."""
    ls_beta: float = 0.0
    """beta: weight of the same-expert term of L_s (A.2.2)."""
    ls_gamma: float = 0.0
    """gamma: weight of the different-expert term of L_s (A.2.2)."""
    ls_variant: str = "normalized"
    """normalized (both terms over B^2 pairs) | reference (published code: only gamma / B^2)."""
    ls_squared: bool = False
    """Use squared distances (paper text) instead of the code's plain Euclidean distance."""


@dataclass
class TrainConfig:
    epochs: int = 20
    """Passes over the training set (full-batch runs: gradient steps)."""
    batch_size: int = 512
    """Global training batch size; 0 = full batch."""
    eval_batch_size: int = 2048
    """Evaluation batch size (metrics are exact over the whole set whatever its value)."""
    optimizer: str = "adam"
    """adam | rmsprop | sgd | normalized_gd (Chen et al.: experts normalised, gate plain SGD)."""
    lr: float = 1e-3
    """Learning rate (normalized_gd: the experts' rate)."""
    gate_lr: float = 0.0
    """Separate gate/router learning rate; 0 = same as lr (Chen et al.: 0.1)."""
    momentum: float = 0.0
    """Momentum for rmsprop / sgd / normalized_gd."""
    weight_decay: float = 0.0
    """L2 weight decay (Adam's coupled form, as torch.optim.Adam)."""
    normalized_gd_scope: str = "expert"
    """expert (norm summed per expert, Chen's demos) | tensor (each tensor by its own norm)."""
    lr_decay_every: int = 0
    """Divide the lr by lr_decay_factor after every N epochs (paper: 20); 0 = never."""
    lr_decay_factor: float = 3.0
    """Divisor of the step schedule."""
    early_stop_rise: float = 0.0
    """Stop when the training loss exceeds its minimum by this much (Chen: 0.02); 0 = off."""
    early_stop_loss: float = 0.0
    """Stop once the training loss is at or below this (Chen: 0.314); 0 = off."""
    early_stop_after: int = 0
    """Only apply early stopping from this epoch on (Chen's single models: 500)."""
    freeze: list[str] = field(default_factory=list)
    """Parameter groups kept fixed: any of experts, gate."""
    init_from: str = ""
    """Run folder whose final weights initialise this model (distillation, pretrained gate)."""
    init_parts: list[str] = field(default_factory=lambda: ["experts", "gate"])
    """Which parts init_from copies: experts and/or gate (names matched; absent ones stay fresh)."""
    eval_every: int = 1
    """Evaluate on the test set every N epochs (and always after the last)."""
    checkpoint_every: int = 1
    """Write a checkpoint every N epochs (and always after the last)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (oldest removed first); the latest is never removed."""
    device: str = "auto"
    """auto (CUDA when present) | cpu | cuda."""
    mixed_precision: str = "no"
    """no | bf16 | fp16 autocast; the gate and its losses stay in float32."""
    deterministic: bool = False
    """CUDA: deterministic kernels only (torch.use_deterministic_algorithms), so a run and its
    resumption are bit-identical on a GPU as they are on the CPU; slower."""
    progress: bool = True
    """Show a progress bar on the main process."""
    num_threads: int = 0
    """torch intra-op threads; 0 leaves torch's default."""


@dataclass
class ParallelConfig:
    ep_size: int = 1
    """Ranks that share the experts of one MoE (expert parallelism); 1 = none."""
    zero_stage: int = 0
    """engine=deepspeed only: ZeRO stage 0, 1 or 2 (optimizer state / gradient sharding;
    expert parameters are sharded over their expert-data-parallel group)."""
    timeout_s: float = 600.0
    """Seconds a rank waits in a collective for the others before the run stops with an error
    naming it (a rank that died or hangs); long enough for a checkpoint write or an uneven
    evaluation. Applies to the process group the run joins."""


@dataclass
class Config:
    name: str = ""
    """Experiment name, a row of the papers' tables (e.g. mnist/vanilla_lcv); reports group by it."""
    run_dir: str = "runs/default"
    """Run folder: config.yaml, metrics.json, TensorBoard events, checkpoints/."""
    seed: int = 0
    """Seed of initialisation, shuffling, augmentation and routing noise."""
    engine: str = "moe_dist"
    """How a loss becomes an update. moe_dist: one process uses accelerate's mixed precision
    (autocast, fp16 loss scaling); several processes sum gradients with moe_dist's own
    reduction over the expert-parallel layout (no DDP, no accelerate). deepspeed: DeepSpeed's
    engine (ZeRO 0-2) reduces and steps. Old run folders' ``accelerate`` reads as moe_dist."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


POSITIVE_INTS = ("moe.num_experts", "moe.num_groups", "moe.top_groups", "train.epochs", "train.eval_every",
                 "train.checkpoint_every", "train.keep_checkpoints", "parallel.ep_size")
NON_NEGATIVE = ("data.train_size", "data.test_size", "model.width", "train.batch_size",
                "train.lr_decay_every", "train.gate_lr", "train.weight_decay", "train.momentum",
                "loss.importance_weight", "loss.ls_beta", "loss.ls_gamma", "train.early_stop_rise",
                "train.early_stop_loss", "train.early_stop_after", "train.num_threads",
                "moe.capacity_factor", "parallel.zero_stage", "data.num_workers")
POSITIVE_FLOATS = ("train.lr", "moe.temperature", "model.expert_init_scale", "train.lr_decay_factor",
                   "parallel.timeout_s")
FREEZABLE = ("experts", "gate")


def _get(cfg: Config, dotted: str) -> Any:
    return operator.attrgetter(dotted)(cfg)


# The rules a model built without a config (tests, library use) must obey too: its modules
# call these, so each rule is written once.

def check_choice(key: str, value: Any) -> None:
    """``value`` is one of ``CHOICES[key]``."""
    if value not in CHOICES[key]:
        raise ConfigError(f"{key}={value!r} is not one of: {', '.join(CHOICES[key])}")


def check_top_k(top_k: int, num_experts: int) -> None:
    """1 <= moe.top_k <= moe.num_experts."""
    if top_k < 1:
        raise ConfigError(f"moe.top_k={top_k} must be a positive integer")
    if top_k > num_experts:
        raise ConfigError(f"moe.top_k={top_k} exceeds moe.num_experts={num_experts}")


def check_ep_size(ep_size: int, num_experts: int | None, num_groups: int | None = None) -> None:
    """parallel.ep_size <= moe.num_experts (None: no experts): every expert-parallel rank
    holds at least one expert. It need not divide it: the blocks may differ by one
    (moe_dist.parallel.groups.expert_blocks). Hierarchical routing (``num_groups``) places
    whole groups: ep_size <= moe.num_groups."""
    if num_experts is not None and ep_size > num_experts:
        raise ConfigError(f"parallel.ep_size={ep_size} exceeds moe.num_experts={num_experts}: "
                          "every expert-parallel rank must hold at least one expert")
    if num_groups is not None and ep_size > num_groups:
        raise ConfigError(f"parallel.ep_size={ep_size} exceeds moe.num_groups={num_groups}: "
                          "a group of experts lives on one rank")


def routing_groups(cfg: Config) -> int | None:
    """moe.num_groups under hierarchical routing (groups are routed to and placed whole), else None."""
    if cfg.model.kind == "moe" and cfg.moe.routing == "hierarchical":
        return cfg.moe.num_groups
    return None


def check_hierarchy(routing: str, num_experts: int, num_groups: int, top_groups: int, top_k: int) -> None:
    """The group keys: hierarchical routing needs G | E, 1 <= top_groups <= G and
    1 <= top_k <= E / G; other routings leave moe.num_groups and moe.top_groups at 1."""
    if routing != "hierarchical":
        for key, value in (("moe.num_groups", num_groups), ("moe.top_groups", top_groups)):
            if value != 1:
                raise ConfigError(f"{key}={value} applies to moe.routing='hierarchical' only "
                                  f"(moe.routing={routing!r}): leave it at 1")
        return
    if num_groups < 1 or num_experts % num_groups:
        raise ConfigError(f"moe.num_groups={num_groups} must divide moe.num_experts={num_experts} "
                          "(groups of equal size)")
    if not 1 <= top_groups <= num_groups:
        raise ConfigError(f"moe.top_groups={top_groups} must be in 1..moe.num_groups={num_groups}")
    per_group = num_experts // num_groups
    if not 1 <= top_k <= per_group:
        raise ConfigError(f"moe.top_k={top_k} must be in 1..{per_group} under moe.routing='hierarchical' "
                          f"(experts per group: moe.num_experts={num_experts} / moe.num_groups={num_groups})")


def check_gate_weights(gate_weights: str, routing: str) -> None:
    """raw is Chen's router value (topk); probs and softmax weigh the chosen experts of topk
    and hierarchical routing; dense and attentive weigh every expert by its probability."""
    allowed = {"topk": ("softmax", "raw", "probs"), "hierarchical": ("softmax", "probs")}.get(routing, ("softmax",))
    if gate_weights not in allowed:
        raise ConfigError(f"moe.gate_weights={gate_weights!r} is not defined for moe.routing={routing!r} "
                          f"(allowed: {', '.join(allowed)})")


def check_routing_fits_arch(routing: str, arch: str) -> None:
    """Attentive routing reads the experts' hidden states, which the patch_cnn experts lack."""
    if routing == "attentive" and arch == "patch_cnn":
        raise ConfigError("moe.routing='attentive' needs an image architecture, not model.arch='patch_cnn'")


def validate(cfg: Config) -> Config:
    """Check every value and the relations between them; raise ConfigError on the first fault."""
    # YAML reads a bare `no` (accelerate's name for full precision) as false, which a str
    # field stores as "False": `train.mixed_precision=no` must mean "no".
    if cfg.train.mixed_precision in ("False", "false"):
        cfg.train.mixed_precision = "no"
    cfg.engine = RENAMED_VALUES["engine"].get(cfg.engine, cfg.engine)
    for key in CHOICES:
        check_choice(key, _get(cfg, key))
    for key in POSITIVE_INTS:
        if _get(cfg, key) <= 0:
            raise ConfigError(f"{key}={_get(cfg, key)} must be a positive integer")
    for key in NON_NEGATIVE:
        if _get(cfg, key) < 0:
            raise ConfigError(f"{key}={_get(cfg, key)} must be >= 0")
    for key in POSITIVE_FLOATS:
        if not _get(cfg, key) > 0:
            raise ConfigError(f"{key}={_get(cfg, key)} must be > 0")
    check_top_k(cfg.moe.top_k, cfg.moe.num_experts)
    check_hierarchy(cfg.moe.routing, cfg.moe.num_experts, cfg.moe.num_groups, cfg.moe.top_groups, cfg.moe.top_k)
    for key in ("train.freeze", "train.init_parts"):
        for name in _get(cfg, key):
            if name not in FREEZABLE:
                raise ConfigError(f"{key} entry {name!r} is not one of: {', '.join(FREEZABLE)}")
    if cfg.model.kind == "moe":  # a single model has no experts: any ep_size
        check_ep_size(cfg.parallel.ep_size, cfg.moe.num_experts, routing_groups(cfg))
    patch = cfg.model.arch == "patch_cnn"
    if (cfg.data.name == "synthetic") != patch:
        raise ConfigError(f"model.arch={cfg.model.arch!r} does not fit data.name={cfg.data.name!r} "
                          "(patch_cnn goes with synthetic, the CNN architectures with images)")
    if cfg.model.kind == "moe":
        check_routing_fits_arch(cfg.moe.routing, cfg.model.arch)
    check_gate_weights(cfg.moe.gate_weights, cfg.moe.routing)
    if (cfg.engine == "deepspeed" and routing_groups(cfg) is not None
            and cfg.moe.num_groups % cfg.parallel.ep_size):
        # DeepSpeed places E / ep_size experts per rank: whole groups only when ep_size divides G
        raise ConfigError(f"engine=deepspeed with moe.routing='hierarchical' needs parallel.ep_size="
                          f"{cfg.parallel.ep_size} to divide moe.num_groups={cfg.moe.num_groups}; "
                          "engine=moe_dist places uneven group blocks")
    if cfg.data.format == "webdataset":
        if not cfg.data.root:
            raise ConfigError("data.format='webdataset' needs data.root=DIR, a shard folder "
                              "(make one with `moe-dist data shards NAME --out DIR --shard-size N`)")
        for key in ("data.train_size", "data.test_size", "data.classes"):
            if _get(cfg, key):
                raise ConfigError(f"{key}={_get(cfg, key)} does not apply to data.format='webdataset': "
                                  "choose subsets when writing shards (`moe-dist data shards NAME "
                                  "--train-size N --test-size N`)")
    return cfg


def config_keys() -> list[str]:
    """Every dotted key of ``Config``, in declaration order (``name``, ..., ``parallel.zero_stage``)."""
    return list(flatten(to_dict(Config())))


def suggest_keys(key: str, limit: int = 3) -> list[str]:
    """The keys or sections nearest to a misspelt ``key``: those of its own section with a near
    last part (``train.epoch`` -> ``train.epochs``), near sections (``trian`` -> ``train``),
    keys of other sections with a very near last part (``epochs``, ``data.epochs`` ->
    ``train.epochs``), and for an unknown section the nearest whole keys."""
    keys = config_keys()
    section, _, last = key.rpartition(".")
    sections = list(dict.fromkeys(k.split(".")[0] for k in keys if "." in k))
    own = {k.rpartition(".")[2]: k for k in keys if k.rpartition(".")[0] == section}
    by_last: dict[str, list[str]] = {}
    for k in keys:
        by_last.setdefault(k.rpartition(".")[2], []).append(k)
    close = [own[name] for name in difflib.get_close_matches(last, list(own), n=limit)]
    if not section:
        close += difflib.get_close_matches(key, sections, n=limit)
    close += [k for name in difflib.get_close_matches(last, list(by_last), n=limit, cutoff=0.8) for k in by_last[name]]
    if section and section not in sections:
        close += difflib.get_close_matches(key, keys, n=limit)
    return list(dict.fromkeys(close))[:limit]


def unknown_key_hint(key: str) -> str:
    """What follows "unknown key 'KEY'": the nearest valid keys, and where every key is listed."""
    close = suggest_keys(key)
    if close:
        return f"; did you mean {' or '.join(close)}? ({KEYS_COMMAND} lists every key)"
    return f" ({KEYS_COMMAND} lists every key)"


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def _parse_overrides(overrides: list[str]) -> Any:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"bad override: {_one_line(exc)}") from None


def _merge(base: Any, update: Any, origin: str) -> Any:
    try:
        return OmegaConf.merge(base, update)
    except ConfigKeyError as exc:
        raise ConfigError(f"{origin}: unknown key {exc.full_key!r}{unknown_key_hint(exc.full_key)}") from None
    except OmegaConfBaseException as exc:
        message = _one_line(exc).split(" full_key")[0]
        key = getattr(exc, "full_key", None)
        raise ConfigError(f"{origin}: bad value for {key!r}: {message}" if key else f"{origin}: {message}") from None


def merged_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Defaults, then the YAML file (if any), then ``dotted.key=value`` overrides, as an OmegaConf
    node: unknown keys and values of the wrong type are refused here, the value rules by
    ``validate``. Cheap (no torch), so a sweep checks every job's overrides before running any."""
    merged = OmegaConf.structured(Config)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {_one_line(exc)}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        merged = _merge(merged, OmegaConf.create(loaded), str(path))
    if overrides:
        merged = _merge(merged, _parse_overrides(list(overrides)), "override")
    return merged


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file (if any), then ``dotted.key=value`` overrides; validated."""
    cfg = OmegaConf.to_object(merged_config(path, overrides))
    assert isinstance(cfg, Config)
    return validate(cfg)


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1, "freeze": ["gate"]}}`` -> ``{"train.lr": 1, "train.freeze": ("gate",)}``:
    lists become tuples, so values can group runs (report) and compare (resumption)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
    return out


def upgrade_saved(data: dict[str, Any]) -> dict[str, Any]:
    """A saved config dict with renamed values (``RENAMED_VALUES``) given their current names."""
    data = dict(data)
    for key, renames in RENAMED_VALUES.items():
        if data.get(key) in renames:
            data[key] = renames[data[key]]
    return data


def config_differences(a: Config, b: Config) -> list[str]:
    """The dotted keys whose values differ between two configs."""
    fa, fb = flatten(to_dict(a)), flatten(to_dict(b))
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))


def check_resumable(saved: Config, cfg: Config, where: str, finished: bool = False) -> None:
    """Refuse to continue ``saved``'s run with ``cfg`` when they differ beyond RESUMABLE_CHANGES."""
    diff = [k for k in config_differences(saved, cfg) if k not in RESUMABLE_CHANGES]
    if diff:
        what = "a finished run" if finished else "a run"
        raise ConfigError(f"{where} holds {what} with a different config ({', '.join(diff)}); "
                          "use a new run_dir or the same settings to resume")


def from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from a resolved dict (config.yaml, a checkpoint); unknown keys are errors."""
    merged = _merge(OmegaConf.structured(Config), OmegaConf.create(upgrade_saved(data)), "saved config")
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, Config)
    return validate(cfg)


_ABSENT = object()  # what OmegaConf.select returns for a key the schema does not have


def set_values(cfg: Config, values: dict[str, Any]) -> Config:
    """A copy of ``cfg`` with dotted keys set to typed values (``{"train.freeze": ["gate"]}``:
    no quoting, as ``key=value`` overrides would need), type-checked by the schema; not validated."""
    node = OmegaConf.structured(cfg)
    for dotted, value in values.items():
        if OmegaConf.select(node, dotted, default=_ABSENT) is _ABSENT:
            raise ConfigError(f"unknown config key {dotted!r}{unknown_key_hint(dotted)}")
        try:
            OmegaConf.update(node, dotted, value, merge=False)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"bad value for {dotted!r}: {_one_line(exc).split(' full_key')[0]}") from None
    updated = OmegaConf.to_object(node)
    assert isinstance(updated, Config)
    return updated


def with_values(cfg: Config, values: dict[str, Any]) -> Config:
    """A validated copy of ``cfg`` with dotted keys set (``{"train.freeze": ["gate"]}``);
    typed values, so paths need no quoting as ``key=value`` overrides would."""
    return validate(set_values(cfg, values))


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
