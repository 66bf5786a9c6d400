"""The papers' published numbers (docs/papers.md A.6, A.9, B.5), for side-by-side comparison.

Keys are experiment names (``Config.name``). Errors are fractions; accuracies percentages.
"""

from __future__ import annotations

from moe_dist.config import CONFIGS, Config, flatten, load_config, to_dict
from moe_dist.fields import names, summary_fields

# docs/papers.md A.9, the order of the tuples below: (train error, test error, family-wide std,
# I(E;Y), H_s, H_u). "std" is the paper's std of the test error over all runs of a row's
# name, no metrics.json field; the others are.
_TABLE_COLUMNS = (*names("train_error", "test_error"), "std",
                  *names("mutual_information", "sample_entropy", "usage_entropy"))
_TABLES = {
    "mnist": {
        "single": (0.097, 0.096, 0.071, None, None, None),
        "vanilla": (0.021, 0.038, 0.009, 2.022, 0.092, 2.172),
        "vanilla_lcv": (0.015, 0.032, 0.008, 2.262, 0.061, 2.320),
        "vanilla_ls": (0.015, 0.029, 0.009, 2.244, 0.051, 2.246),
        "attentive": (0.019, 0.033, 0.006, 1.797, 0.071, 2.055),
        "attentive_lcv": (0.013, 0.035, 0.005, 2.260, 0.055, 2.266),
        "attentive_ls": (0.013, 0.032, 0.006, 2.275, 0.039, 2.321),
        "distilled_lcv": (0.009, 0.030, 0.007, 2.301, 0.036, 2.320),
        "distilled_ls": (0.009, 0.028, 0.007, 2.191, 0.056, 2.319),
    },
    "fmnist": {
        "single": (0.115, 0.132, 0.011, None, None, None),
        "vanilla": (0.041, 0.104, 0.006, 2.034, 0.081, 2.048),
        "vanilla_lcv": (0.031, 0.103, 0.006, 2.301, 0.172, 2.321),
        "vanilla_ls": (0.018, 0.095, 0.007, 2.198, 0.110, 2.225),
        "attentive": (0.041, 0.098, 0.013, 2.071, 0.114, 2.249),
        "attentive_lcv": (0.014, 0.098, 0.006, 2.233, 0.101, 2.319),
        "attentive_ls": (0.014, 0.096, 0.008, 2.296, 0.109, 2.321),
        "distilled_lcv": (0.004, 0.087, 0.007, 2.227, 0.101, 2.318),
        "distilled_ls": (0.005, 0.089, 0.008, 2.304, 0.076, 2.321),
    },
    "cifar100": {
        "single": (0.565, 0.575, 0.006, None, None, None),
        "vanilla": (0.398, 0.460, 0.010, 0.967, 0.306, 1.023),
        "vanilla_lcv": (0.408, 0.483, 0.007, 4.177, 1.315, 3.981),
        "vanilla_ls": (0.393, 0.457, 0.012, 1.424, 0.381, 1.279),
        "attentive": (0.254, 0.450, 0.006, 1.792, 0.463, 2.178),
        "attentive_lcv": (0.254, 0.447, 0.005, 3.684, 1.036, 4.141),
        "attentive_ls": (0.238, 0.451, 0.016, 3.117, 0.770, 3.357),
        "distilled_lcv": (0.399, 0.531, 0.131, 3.179, 1.750, 3.843),
        "distilled_ls": (0.150, 0.482, 0.065, 1.605, 0.718, 2.541),
    },
}

# docs/papers.md B.5: single models are one run (test accuracy %); MoE rows mean over 10 runs.
_SYNTHETIC = {
    "s1": {"single_linear": 68.31, "single_cubic": 79.57, "moe_linear": (93.00, 1.300), "moe_nonlinear": (99.46, 0.098)},
    "s2": {"single_linear": 68.22, "single_cubic": 77.38, "moe_linear": (89.49, 1.262), "moe_nonlinear": (98.10, 0.183)},
    "s3": {"single_linear": 74.30, "single_cubic": 73.72, "moe_linear": (95.93, 1.160), "moe_nonlinear": (99.99, 0.008)},
    "s4": {"single_linear": 74.28, "single_cubic": 70.26, "moe_linear": (93.30, 1.160), "moe_nonlinear": (98.92, 0.089)},
}


#: results/*_final_pretrained_results.csv (docs/papers.md A.6): means of test error, final train loss,
#: I(E;Y), H_s and H_u (the column order of moe_dist.fields.section4_fields()).
PRETRAINED_GATE: dict[str, dict[str, tuple[float, ...]]] = {
    "mnist10k": {
        "scratch": (0.09, 0.13, 1.51, 0.24, 1.91),
        "scratch_same_wts": (0.09, 0.13, 1.54, 0.24, 1.91),
        "scratch_rand_wts": (0.12, 0.19, 1.56, 0.24, 1.91),
        "pretrained_gate": (0.08, 0.05, 2.32, 0.11, 2.32),
        "prechosen_same_wts": (0.08, 0.04, 2.32, 0.11, 2.32),
        "prechosen_rand_wts": (0.08, 0.05, 2.32, 0.11, 2.32),
    },
    "fmnist_mnist": {
        "scratch": (0.10, 0.18, 1.75, 0.13, 1.73),
        "scratch_same_wts": (0.11, 0.18, 1.77, 0.13, 1.81),
        "scratch_rand_wts": (0.14, 0.28, 1.77, 0.13, 1.82),
        "pretrained_gate": (0.10, 0.14, 2.58, 0.21, 2.38),
        "prechosen_same_wts": (0.10, 0.13, 2.58, 0.21, 2.37),
        "prechosen_rand_wts": (0.10, 0.13, 2.58, 0.21, 2.50),
    },
}


#: Every key ``published`` can return, in the order of report.csv's ``paper_*`` columns.
PUBLISHED_KEYS = (*_TABLE_COLUMNS, *names("dispatch_entropy"))


def published(name: str) -> dict[str, float]:
    """The paper's numbers for an experiment name such as ``fmnist/vanilla_ls`` or
    ``synthetic/s1_moe_nonlinear``; empty when the paper has none."""
    family, _, method = name.partition("/")
    if family in _TABLES and method in _TABLES[family]:
        return {k: v for k, v in zip(_TABLE_COLUMNS, _TABLES[family][method]) if v is not None}
    if family == "synthetic":
        setting, _, model = method.partition("_")
        value = _SYNTHETIC.get(setting, {}).get(model)
        if isinstance(value, tuple):
            return {"test_error": 1 - value[0] / 100, "dispatch_entropy": value[1]}
        if value is not None:
            return {"test_error": 1 - value / 100}
    return {}


#: The keys that make a run the paper's experiment of its name: a run that differs from the
#: shipped config of that name (configs/<name>.yaml) in one of them is compared with nothing.
SETTING_KEYS = ("data.name", "data.setting", "data.train_size", "data.test_size", "data.classes",
                "model.arch", "model.kind", "moe.routing", "moe.num_experts", "moe.top_k",
                "loss.importance_weight", "loss.ls_beta", "loss.ls_gamma", "train.epochs", "train.batch_size")


def setting_differences(cfg: Config) -> list[str]:
    """How ``cfg`` differs from the paper's setting of its name (``key=value (paper: value)``);
    empty when it matches, or when no shipped config bears its name."""
    reference_file = CONFIGS / f"{cfg.name}.yaml"
    if not cfg.name or not reference_file.is_file():
        return []
    ours, paper = flatten(to_dict(cfg)), flatten(to_dict(load_config(reference_file)))
    return [f"{k}={ours[k]!r} (paper: {paper[k]!r})" for k in SETTING_KEYS if ours[k] != paper[k]]


def format_summary(cfg: Config, metrics: dict, split: str = "test") -> str:
    """A table of the final metrics with the paper's value beside them, where the run is the
    paper's experiment (else a line says why the paper column is left out). ``split``: which
    set ``metrics`` were computed on; its error is labelled so."""
    differences = setting_differences(cfg)
    paper = published(cfg.name) if split == "test" and not differences else {}
    shown = dict(metrics)
    if split != "test" and "test_error" in shown:
        shown[f"{split}_error"] = shown.pop("test_error")
    keys = [f"{split}_error" if k == "test_error" else k for k in summary_fields()]
    rows = [(k, shown[k], paper.get(k)) for k in keys if isinstance(shown.get(k), (int, float))]
    w = max([20] + [len(key) for key, _, _ in rows])  # group_mutual_information is 24 wide
    lines = [f"{'metric':<{w}} {'this run':>10} {'paper':>10}", "-" * (w + 22)]
    for key, ours, ref in rows:
        lines.append(f"{key:<{w}} {ours:>10.4f} {'' if ref is None else f'{ref:>10.4f}':>10}")
    error = shown.get(f"{split}_error")
    if isinstance(error, (int, float)):
        ref = f"{100 * (1 - paper['test_error']):>10.2f}" if "test_error" in paper else ""
        lines.append(f"{f'{split} accuracy %':<{w}} {100 * (1 - error):>10.2f} {ref:>10}")
    if published(cfg.name) and not paper:
        why = ("the paper reports test-set values" if split != "test" else
               "this run is not the paper's setting: " + ", ".join(differences))
        lines.append(f"paper column left out: {why}")
    return "\n".join(lines)
