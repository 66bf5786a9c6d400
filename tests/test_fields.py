"""The registry of metrics.json fields (moe_dist/fields.py): README's table, committed runs,
the lists the trainer, CLI and reports take from it, and the Markdown table helper."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from moe_dist import fields
from moe_dist.rundir import RunDir
from moe_dist.fields import CONDITIONAL, HISTORY, METRICS, TOPK
from moe_dist.tables import markdown_table

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "docs" / "results"
UNITS = {"fraction", "bits", "nats", "s", "MB", "bytes", "count", "-"}
TOPK_KEY = re.compile(r"top\d+")


def _readme_table() -> dict[str, str]:
    """README's "metrics.json fields" table: field path -> unit."""
    text = (REPO / "README.md").read_text()
    match = re.search(r"^## metrics\.json fields\n(.*?)(?=^## )", text, re.MULTILINE | re.DOTALL)
    assert match, 'README.md has no "## metrics.json fields" section'
    rows = [line for line in match.group(1).splitlines() if line.startswith("| `")]
    table = {}
    for line in rows:
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        table[cells[0].strip("`")] = cells[1]
    assert table, "README's metrics.json section has no table rows"
    return table


def test_readme_table_lists_every_field_with_its_unit_and_nothing_else():
    readme = _readme_table()
    registry = {f.path: f.unit for f in fields.fields()}
    assert {p: readme.get(p) for p in registry} == registry, "README lacks fields or units differ"
    assert sorted(set(readme) - set(registry)) == [], "README lists fields the registry does not have"


def test_every_field_has_a_unit_a_one_line_meaning_and_a_unique_place():
    paths = [f.path for f in fields.fields()]
    assert len(paths) == len(set(paths))
    for f in fields.fields():
        assert f.record in fields.RECORDS and f.unit in UNITS, f
        assert f.meaning and "\n" not in f.meaning, f
    with pytest.raises(KeyError, match="'nope' is not a field of metrics records"):
        fields.field("nope")
    assert fields.names("test_error", "train_seconds") == ("test_error", "train_seconds")


def _record_keys(metrics: dict) -> dict[str, set[str]]:
    """The keys of a metrics.json file by record (the registry's record names)."""
    keys = {METRICS: set(metrics), HISTORY: set(), CONDITIONAL: set(), TOPK: set()}
    for record in metrics.get("history", []):
        keys[HISTORY] |= set(record)
    for key, value in (metrics.get("conditional") or {}).items():
        if TOPK_KEY.fullmatch(key):
            keys[TOPK] |= set(value)
        else:
            keys[CONDITIONAL].add(key)
    return keys


# A few committed files of each kind, with a key (in any record) that kind must have, so that
# a moved file fails here rather than leaving the kind unchecked.
KINDS = {
    "plain MoE": ("mnist10k/vanilla/seed*/metrics.json", "selection_table"),
    "single model": ("fmnist/single/seed*/metrics.json", "test_error"),
    "distilled": ("mnist10k/distilled_l*/seed*/metrics.json", "expert_flops_fraction"),
    "synthetic": ("synthetic/s1_moe_nonlinear/seed*/metrics.json", "dispatch_entropy"),
    "L_cv runs": ("study_experts/lcv_e*/seed*/metrics.json", "train_importance"),
    "L_s runs": ("study_experts/ls_e*/seed*/metrics.json", "train_sample_similarity"),
    "section 4.2": ("section4/mnist10k/*/*/metrics.json", "final_train_loss"),
    "GPU run": ("fmnist_gpu/vanilla_ls/seed*/metrics.json", "peak_memory_mb"),
}


@pytest.mark.parametrize("kind", KINDS)
def test_committed_metrics_files_hold_only_registry_fields(kind):
    pattern, required = KINDS[kind]
    files = sorted(RESULTS.glob(pattern))[:3]
    assert files, f"no committed {kind} run matches docs/results/{pattern}"
    for path in files:
        by_record = _record_keys(RunDir(path.parent).read_metrics())  # old formats read as the current one
        assert required in set().union(*by_record.values()), f"{path} is not a {kind} run (no {required})"
        for record, keys in by_record.items():
            known = {f.key for f in fields.fields(record)}
            assert sorted(keys - known) == [], f"{path}: {record} keys missing from moe_dist/fields.py"


def test_the_registry_gives_the_lists_the_code_used_to_keep():
    # The hand-kept lists the registry replaced, in their order: reports, event files and
    # metrics.json keep the same columns and keys (wall_seconds is named train_seconds since
    # metrics.json format 2, which also reports total_seconds).
    assert fields.summary_fields() == ("test_error", "train_error", "mutual_information", "sample_entropy",
                                       "usage_entropy", "experts_used", "group_mutual_information",
                                       "group_usage_entropy", "dispatch_entropy", "train_seconds", "total_seconds")
    group = ("group_mutual_information", "group_sample_entropy", "group_usage_entropy", "group_selection_table",
             "group_soft_selection_table", "samples_per_group", "groups_used")  # hierarchical routing's
    assert fields.final_eval_fields() == (
        "mutual_information", "mutual_information_predicted", "sample_entropy", "usage_entropy", "selection_table",
        "soft_selection_table", "per_expert_accuracy", "samples_per_expert", "experts_used", *group)
    assert fields.history_eval_fields() == ("sample_entropy", "usage_entropy", "mutual_information", "experts_used",
                                            "group_mutual_information", "group_usage_entropy")
    assert fields.hparam_fields() == ("test_error", "train_error", "mutual_information", "sample_entropy",
                                      "usage_entropy")
    assert fields.section4_fields() == ("test_error", "final_train_loss", "mutual_information", "sample_entropy",
                                        "usage_entropy")
    assert fields.eval_scalar_tags() == {
        "error": "eval/error", "loss": "eval/loss", "mutual_information": "moe/mutual_information",
        "mutual_information_predicted": "moe/mutual_information_predicted",
        "sample_entropy": "moe/sample_entropy", "usage_entropy": "moe/usage_entropy",
        "experts_used": "moe/experts_used", "group_mutual_information": "moe/group_mutual_information",
        "group_sample_entropy": "moe/group_sample_entropy", "group_usage_entropy": "moe/group_usage_entropy",
        "groups_used": "moe/groups_used", "dispatch_entropy": "moe/test_dispatch_entropy"}
    # The trainer's rule: train_<x> -> train/<x>, routing statistics under moe/, the rest under train/.
    for key, tag in fields.history_tags().items():
        name = key[len("train_"):] if key.startswith("train_") else key
        routing = ("dispatch_entropy", "drop_rate", "padding_ratio", "remote_rows_per_step", "min_remote_rows_per_step")
        assert tag == ("moe/" if name in routing else "train/") + name
    assert "epoch" not in fields.history_tags()
    assert [f"{k}_{a}" for k, a in fields.report_aggregates()] == [
        "mutual_information_mean", "mutual_information_predicted_mean", "sample_entropy_mean", "usage_entropy_mean",
        "group_mutual_information_mean", "group_sample_entropy_mean", "group_usage_entropy_mean",
        "dispatch_entropy_mean", "dispatch_entropy_std", "train_seconds_mean", "step_seconds_mean",
        "peak_memory_mb_max"]


def test_paper_flags_match_what_paper_py_publishes():
    from moe_dist import paper

    published = {k for k in paper.PUBLISHED_KEYS if k != "std"} | set(fields.section4_fields())
    assert published == set(fields.paper_fields())
    names = [f"{family}/{method}" for family, rows in paper._TABLES.items() for method in rows]
    names += [f"synthetic/{setting}_{model}" for setting, rows in paper._SYNTHETIC.items() for model in rows]
    returned = set().union(*(paper.published(name) for name in names))
    assert returned == set(paper.PUBLISHED_KEYS)
    assert all(len(row) == len(fields.section4_fields())
               for rows in paper.PRETRAINED_GATE.values() for row in rows.values())


def test_readme_table_is_the_generated_one():
    text = (REPO / "README.md").read_text()
    assert fields.markdown_field_table() in text, "regenerate README's table with markdown_field_table()"


def test_markdown_table_format_alignment_and_escaping():
    assert markdown_table(("a", "b"), [(1, ""), ("x|y", 2.5)]) == "| a | b |\n|---|---|\n| 1 |  |\n| x\\|y | 2.5 |"
    assert markdown_table(("a", "b", "c"), [], align=("left", "right", "center")).splitlines()[1] == \
        "|:---|---:|:---:|"
    with pytest.raises(ValueError, match="2 cells for 3 columns"):
        markdown_table(("a", "b", "c"), [(1, 2)])
