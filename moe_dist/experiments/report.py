"""``moe-dist report``: turn run folders into the papers' tables, a CSV and figures.

Every folder below the given paths that holds ``config.yaml`` and ``metrics.json`` is a
run. Runs are grouped by experiment: the config ``name`` plus the hyperparameters that
differ between runs of that name (so grid points are separate rows and the seeds of one
point are one row). Bookkeeping keys that do not change the result (``seed``, ``run_dir``,
``data.root``, progress, threads, device, evaluation and checkpoint cadence) never split a
group; ``train.init_from`` (the source of a distillation) is compared without its final
``seedN`` folder, so distillations from the seeds of one source configuration form a row.

Outputs under ``--out``:

- ``report.md``: one table per dataset family (name prefix before ``/``), rows ordered
  single, vanilla, vanilla_lcv, vanilla_ls, attentive, attentive_lcv, attentive_ls,
  distilled_lcv, distilled_ls, then others. Image rows: n, train error, test error
  mean ± std, the best-by-train-error test error (docs/papers.md A.5/A.7: the paper reports the
  run with the lowest final training error), I(E;Y), H_s, H_u, wall time per run, and the
  paper's numbers beside them. Synthetic rows (Chen et al.) show accuracies in % and the
  dispatch entropy instead. The std is the sample std (ddof=1) over the group's runs, or
  with ``--std family`` the paper's family-wide std over all runs sharing the name.
- ``report.csv``: the same rows, one column per value (errors as fractions, full precision,
  empty where not defined), with the paper's values as ``paper_*`` columns.
- ``figures/selection_<group>.png``: the expert-selection heatmap of each MoE group's
  best-by-train-error run; ``figures/curves_<family>.png``: test error against epoch, mean
  over each group's runs. ``report.md`` links them.
"""

from __future__ import annotations

import argparse
import csv
import re
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from moe_dist.config import Config, flatten, to_dict
from moe_dist.errors import MoEDistError
from moe_dist.fields import report_aggregates
from moe_dist.paper import PUBLISHED_KEYS, published
from moe_dist.rundir import CONFIG, METRICS, RunDir
from moe_dist.tables import markdown_table

METHOD_ORDER = ("single", "vanilla", "vanilla_lcv", "vanilla_ls", "attentive", "attentive_lcv",
                "attentive_ls", "distilled_lcv", "distilled_ls")
# Keys that say where and how a run was executed, not what was trained.
BOOKKEEPING_KEYS = frozenset({
    "seed", "run_dir", "data.root", "train.progress", "train.num_threads", "train.device",
    "train.eval_every", "train.eval_batch_size", "train.checkpoint_every", "train.keep_checkpoints",
})
SEED_FOLDER = re.compile(r"seed\d+")
STD_CAPTIONS = {
    "seeds": "sample std (ddof=1) over the seeds of this configuration",
    "family": "the paper's family-wide std: sample std (ddof=1) of the test error over all runs "
              "of all grid points sharing the experiment name (docs/papers.md A.7)",
}
PAPER_KEYS = PUBLISHED_KEYS  # the paper_* columns: everything moe_dist.paper publishes
# The errors have their own columns (mean, std, best-by-train-error); the other metrics'
# aggregates come from the registry (moe_dist/fields.py, Field.report).
CSV_COLUMNS = (
    "family", "name", "group", "params", "n", "std_over", "train_error_mean", "test_error_mean",
    "test_error_std", "best_train_error", "best_test_error", "best_run", "family_best",
    *(f"{key}_{aggregate}" for key, aggregate in report_aggregates()),
    *(f"paper_{k}" for k in PAPER_KEYS), "runs",
)


@dataclass
class Run:
    path: Path
    config: dict[str, Any]  # flattened, dotted keys
    metrics: dict[str, Any]

    @property
    def name(self) -> str:
        return self.config.get("name") or "unnamed"


@dataclass
class Group:
    """The runs of one experiment configuration: a row of the table."""

    name: str
    params: tuple[tuple[str, Any], ...]
    runs: list[Run]

    @property
    def family(self) -> str:
        return self.name.partition("/")[0] if "/" in self.name else "other"

    @property
    def method(self) -> str:
        return self.name.partition("/")[2] or self.name

    @property
    def params_text(self) -> str:
        return ", ".join(_param_text(key, value) for key, value in self.params)

    @property
    def label(self) -> str:
        return f"{self.name} ({self.params_text})" if self.params else self.name

    @property
    def method_label(self) -> str:
        """The label within its family's table: without the family prefix."""
        return f"{self.method} ({self.params_text})" if self.params else self.method

    @property
    def synthetic(self) -> bool:
        return self.name.startswith("synthetic/") or any(
            r.metrics.get("dispatch_entropy") is not None for r in self.runs)

    def best(self) -> Run:
        """The row's best-by-train-error run (ties: the first by path)."""
        return min(self.runs, key=_train_error)


def _train_error(run: Run) -> float:
    """The paper's selection key (docs/papers.md A.5): the reported run has the lowest final training error."""
    return run.metrics.get("train_error", float("inf"))


def _comparable(key: str, value: Any) -> Any:
    """A distillation's source counts by configuration, not by the seed it came from."""
    if key == "train.init_from" and value and SEED_FOLDER.fullmatch(Path(value).name):
        return str(Path(value).parent)
    return value


def _param_text(key: str, value: Any) -> str:
    if key == "train.init_from":
        return f"from {'/'.join(Path(value).parts[-2:]) if value else 'scratch'}"
    shown = f"{value:g}" if isinstance(value, float) else str(value)
    return f"{key.rsplit('.', 1)[-1]}={shown}"


DEFAULTS = flatten(to_dict(Config()))


def find_runs(paths: list[str]) -> list[Run]:
    """Every run folder at or below the given paths that holds a metrics.json: each must be
    a finished run (moe_dist.rundir), else the report stops and names it."""
    found: dict[Path, Run] = {}
    for given in paths:
        root = Path(given)
        if not root.is_dir():
            raise MoEDistError(f"{root} is not a folder (give run folders or folders holding them)")
        for metrics_path in root.rglob(METRICS):
            run = RunDir(metrics_path.parent)
            if run.path.resolve() in found or not metrics_path.is_file() or not run.is_run():
                continue
            if not run.finished():
                raise MoEDistError(f"{run.path}: unreadable run files: {METRICS} is not complete JSON")
            # Keys added to the config after a run was made take their defaults, the values
            # the run effectively had, so old and new runs of one configuration group together.
            config = run.read_config_dict()
            found[run.path.resolve()] = Run(run.path, {**DEFAULTS, **flatten(config)}, run.read_metrics())
    if not found:
        raise MoEDistError(f"no run folders (config.yaml + metrics.json) under {', '.join(paths)}")
    return sorted(found.values(), key=lambda r: str(r.path))


def _sortable(value: Any) -> tuple[int, Any]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value)
    return (1, str(value))


def group_runs(runs: list[Run]) -> list[Group]:
    """Groups keyed by name plus the non-bookkeeping keys whose values differ within the name."""
    by_name: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_name[run.name].append(run)
    groups: list[Group] = []
    for name, named in by_name.items():
        keys = sorted({k for r in named for k in r.config} - BOOKKEEPING_KEYS)
        varying = [k for k in keys if len({repr(_comparable(k, r.config.get(k))) for r in named}) > 1]
        points: dict[tuple[Any, ...], list[Run]] = defaultdict(list)
        for run in named:
            points[tuple(repr(_comparable(k, run.config.get(k))) for k in varying)].append(run)
        for members in points.values():
            params = tuple((k, _comparable(k, members[0].config.get(k))) for k in varying)
            groups.append(Group(name, params, members))

    def order(group: Group) -> tuple[Any, ...]:
        rank = METHOD_ORDER.index(group.method) if group.method in METHOD_ORDER else len(METHOD_ORDER)
        return (group.family, rank, group.name, tuple(_sortable(v) for _, v in group.params))

    return sorted(groups, key=order)


def _values(runs: list[Run], key: str) -> list[float]:
    return [float(r.metrics[key]) for r in runs if isinstance(r.metrics.get(key), (int, float))]


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _std(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) >= 2 else None


def _aggregate(aggregate: str, key: str, runs: list[Run], spread: list[Run]) -> float | None:
    """A ``<key>_<aggregate>`` column: mean or max over the row's runs, std over ``spread``
    (the row's runs, or with ``--std family`` every run of its name)."""
    if aggregate == "mean":
        return _mean(_values(runs, key))
    if aggregate == "std":
        return _std(_values(spread, key))
    if aggregate == "max":
        return max(_values(runs, key), default=None)
    raise ValueError(f"unknown report aggregate {aggregate!r} of {key} (moe_dist/fields.py)")


def summarize(groups: list[Group], std_over: str) -> list[dict[str, Any]]:
    """One CSV-ready row per group; std over the group's runs or over its whole name."""
    by_name: dict[str, list[Run]] = defaultdict(list)
    for group in groups:
        by_name[group.name].extend(group.runs)
    family_best = {name: min(runs, key=_train_error) for name, runs in by_name.items()}
    rows = []
    for group in groups:
        spread = group.runs if std_over == "seeds" else by_name[group.name]
        best = group.best()
        paper = published(group.name)
        rows.append({
            "family": group.family, "name": group.name, "group": group.label, "params": group.params_text,
            "n": len(group.runs), "std_over": std_over,
            "train_error_mean": _mean(_values(group.runs, "train_error")),
            "test_error_mean": _mean(_values(group.runs, "test_error")),
            "test_error_std": _std(_values(spread, "test_error")),
            "best_train_error": best.metrics.get("train_error"),
            "best_test_error": best.metrics.get("test_error"),
            "best_run": str(best.path),
            "family_best": len(by_name[group.name]) > len(group.runs) and family_best[group.name] is best,
            **{f"{key}_{aggregate}": _aggregate(aggregate, key, group.runs, spread)
               for key, aggregate in report_aggregates()},
            **{f"paper_{k}": paper.get(k) for k in PAPER_KEYS},
            "runs": ";".join(str(r.path) for r in group.runs),
        })
    return rows


def _num(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _pm(mean: float | None, std: float | None, digits: int) -> str:
    return f"{_num(mean, digits)} ± {_num(std, digits) if std is not None else 'n/a'}"


def _acc(error: float | None) -> float | None:
    return None if error is None else 100 * (1 - error)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 90:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def _method_cell(group: Group, row: dict[str, Any]) -> str:
    return f"{group.method_label} *" if row["family_best"] else group.method_label


def _image_table(pairs: list[tuple[Group, dict[str, Any]]]) -> list[str]:
    # "I pred." is the paper's own definition (row = the chosen expert's predicted class,
    # docs/papers.md A.7), the one its "paper I" column was computed with; "I(E;Y)" uses true labels.
    headers = ("method", "n", "train err", "test err (mean ± std)", "best-by-train-error test err", "I(E;Y)",
               "I pred.", "H_s", "H_u", "train time/run", "paper test err ± std", "paper I", "paper H_s", "paper H_u")
    rows = []
    for g, r in pairs:
        paper = _pm(r["paper_test_error"], r["paper_std"], 3) if r["paper_test_error"] is not None else "–"
        rows.append((
            _method_cell(g, r), r["n"], _num(r["train_error_mean"], 4),
            _pm(r["test_error_mean"], r["test_error_std"], 4), _num(r["best_test_error"], 4),
            _num(r["mutual_information_mean"], 3), _num(r["mutual_information_predicted_mean"], 3),
            _num(r["sample_entropy_mean"], 3), _num(r["usage_entropy_mean"], 3), _duration(r["train_seconds_mean"]),
            paper, _num(r["paper_mutual_information"], 3), _num(r["paper_sample_entropy"], 3),
            _num(r["paper_usage_entropy"], 3)))
    return markdown_table(headers, rows).splitlines()


def _synthetic_table(pairs: list[tuple[Group, dict[str, Any]]]) -> list[str]:
    headers = ("method", "n", "train acc %", "test acc % (mean ± std)", "best-by-train-error test acc %",
               "dispatch entropy (mean ± std)", "train time/run", "paper test acc %", "paper dispatch entropy")
    rows = []
    for g, r in pairs:
        std = None if r["test_error_std"] is None else 100 * r["test_error_std"]
        rows.append((
            _method_cell(g, r), r["n"], _num(_acc(r["train_error_mean"]), 2),
            _pm(_acc(r["test_error_mean"]), std, 2), _num(_acc(r["best_test_error"]), 2),
            _pm(r["dispatch_entropy_mean"], r["dispatch_entropy_std"], 3), _duration(r["train_seconds_mean"]),
            _num(_acc(r["paper_test_error"]), 2), _num(r["paper_dispatch_entropy"], 3)))
    return markdown_table(headers, rows).splitlines()


def _class_names(run: Run, columns: int) -> list[str] | None:
    """Tick labels of the selection heatmap, where the dataset's class names are fixed."""
    from moe_dist.plots import class_names

    return class_names(run.config.get("data.name"), columns)


def _slug(text: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "group"
    slug, k = base, 2
    while slug in taken:
        slug, k = f"{base}_{k}", k + 1
    taken.add(slug)
    return slug


def write_figures(groups: list[Group], folder: Path) -> tuple[list[tuple[str, Path]], list[tuple[str, Path]]]:
    """Selection heatmaps (best run of each MoE group) and learning curves per family."""
    import matplotlib.pyplot as plt

    from moe_dist.plots import selection_heatmap

    folder.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    selections = []
    for group in groups:
        best = group.best()
        table = best.metrics.get("selection_table")
        if not table:
            continue
        fig = selection_heatmap(table, _class_names(best, len(table[0])),
                                title=f"{group.label}\nseed {best.config.get('seed')}, "
                                      f"test error {best.metrics.get('test_error', float('nan')):.4f}")
        path = folder / f"selection_{_slug(group.label, taken)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        selections.append((group.label, path))
    curves = []
    for family in dict.fromkeys(g.family for g in groups):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for group in (g for g in groups if g.family == family):
            by_epoch: dict[int, list[float]] = defaultdict(list)
            for run in group.runs:
                for record in run.metrics.get("history", []):
                    if isinstance(record.get("test_error"), (int, float)):
                        by_epoch[int(record["epoch"])].append(float(record["test_error"]))
            if by_epoch:
                epochs = sorted(by_epoch)
                ax.plot(epochs, [statistics.fmean(by_epoch[e]) for e in epochs], marker=".",
                        label=f"{group.method_label} (n={len(group.runs)})")
        if ax.lines:
            ax.set_xlabel("epoch")
            ax.set_ylabel("test error (mean over runs)")
            ax.set_title(f"{family}: learning curves", fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6, ncol=2)
            fig.tight_layout()
            path = folder / f"curves_{_slug(family, taken)}.png"
            fig.savefig(path, dpi=110)
            curves.append((family, path))
        plt.close(fig)
    return selections, curves


def _provenance(runs: list[Run]) -> str:
    hardware = Counter(str(r.metrics.get("hardware", "unknown")) for r in runs)
    torch_versions = sorted({str(r.metrics.get("torch", "unknown")) for r in runs})
    where = "; ".join(f"{h} ({n} run{'s' if n != 1 else ''})" for h, n in hardware.most_common())
    return f"Hardware: {where}. torch {', '.join(torch_versions)}."


def write_report(paths: list[str], out: Path, std_over: str = "seeds", title: str = "moe_dist report") -> Path:
    """Write report.md, report.csv and figures/ under ``out``; returns the Markdown path."""
    runs = find_runs(paths)
    groups = group_runs(runs)
    rows = summarize(groups, std_over)
    out.mkdir(parents=True, exist_ok=True)
    selections, curves = write_figures(groups, out / "figures")

    with (out / "report.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row[k] is None else row[k] for k in CSV_COLUMNS})

    generated = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    lines = [f"# {title}", "",
             f"Generated {generated} from {len(runs)} runs in {len(groups)} groups. {_provenance(runs)}", "",
             f"Std (±): {STD_CAPTIONS[std_over]}. "
             "Best-by-train-error: the test error of the row's run with the lowest final training error, "
             "the paper's selection rule (docs/papers.md A.5); `*` marks the row holding the run that rule "
             "picks over all rows of the name. Paper values: docs/papers.md A.9 (with its family-wide std) "
             "and B.5."]
    for family in dict.fromkeys(g.family for g in groups):
        pairs = [(g, r) for g, r in zip(groups, rows) if g.family == family]
        synthetic = any(g.synthetic for g, _ in pairs)
        table = _synthetic_table if synthetic else _image_table
        lines += ["", f"## {family}", "", *table(pairs)]
        if synthetic:
            lines += ["", "Accuracy = 100 x (1 - error); dispatch entropy in nats (docs/papers.md B.4)."]
    if selections or curves:
        lines += ["", "## Figures"]
    if curves:
        lines += ["", "### Learning curves", ""]
        lines += [f"![{family} learning curves]({p.relative_to(out).as_posix()})" for family, p in curves]
    if selections:
        lines += ["", "### Expert selection (best-by-train-error run of each group)", ""]
        lines += [f"![{label}]({p.relative_to(out).as_posix()})" for label, p in selections]
    markdown = out / "report.md"
    markdown.write_text("\n".join(lines) + "\n")
    return markdown


def unfinished_runs(paths: list[str]) -> list[Path]:
    """Run folders (a config.yaml) below ``paths`` that are not finished: the report leaves
    them out, and says so."""
    folders = {p.parent.resolve(): p.parent for given in paths for p in Path(given).rglob(CONFIG)}
    return sorted(folder for folder in folders.values() if not RunDir(folder).finished())


def cmd_report(args: argparse.Namespace) -> int:
    markdown = write_report(args.paths, Path(args.out), args.std, args.title)
    text = markdown.read_text()
    print(text.split("\n## Figures")[0].rstrip())  # the tables; the figures are files
    skipped = unfinished_runs(args.paths)
    if skipped:
        listed = ", ".join(str(p) for p in skipped[:10]) + (", ..." if len(skipped) > 10 else "")
        print(f"\nleft out {len(skipped)} unfinished run folder(s) (no complete metrics.json): {listed}")
    print(f"\nwrote {markdown}, {markdown.with_suffix('.csv')} and {markdown.parent / 'figures'}/")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("report", help="tables (Markdown, CSV) and figures from run folders",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="RUN_DIR_OR_ROOT", help="run folders or folders searched for runs")
    p.add_argument("--out", required=True, help="output folder for report.md, report.csv, figures/")
    p.add_argument("--std", choices=tuple(STD_CAPTIONS), default="seeds",
                   help="seeds: std over a row's runs; family: the paper's std over all runs of the name")
    p.add_argument("--title", default="moe_dist report", help="heading of report.md")
    p.set_defaults(func=cmd_report)
