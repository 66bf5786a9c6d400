"""The report of ``moe-dist study experts``: study.md, study.csv and the figures, read from the
run folders ``ROOT/{regulariser}_e{E}/seed{S}`` alone (no data, no config, no training).

Each (E, regulariser) point is aggregated over its finished seeds: mean and sample std
(n - 1, blank for one seed). Points with fewer finished seeds than the study asks for are
listed, so the report of a study still training (or interrupted) is a true partial one.
A run's regulariser is its folder's name and its settings are read from its config.yaml,
so the report does not depend on the regulariser table of the code that reads it.
"""

from __future__ import annotations

import csv
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_dist.errors import ConfigError, MoEDistError
from moe_dist.fields import FIELDS, METRICS, names
from moe_dist.rundir import RunDir
from moe_dist.tables import markdown_table

#: The aggregated metrics.json fields, in study.md's column order (checked against moe_dist/fields.py).
METRIC_KEYS = names("experts_used", "usage_entropy", "sample_entropy", "mutual_information",
                    "mutual_information_predicted", "test_error", "step_seconds", "peak_memory_mb")
#: Derived from a run's metrics: the effective number of experts, 2^H_u (the perplexity of
#: the usage distribution). "experts used" counts experts above 1 % of the test samples, which
#: no expert can reach once uniform usage gives each less (E > 100: at E = 160, 0.6 % each);
#: 2^H_u is E for uniform usage and k for k equally used experts at any E.
DERIVED_KEYS = {"effective_experts": lambda metrics: 2.0 ** metrics["usage_entropy"]
                if isinstance(metrics.get("usage_entropy"), (int, float)) else None}
#: Aggregated when registered and present in a run: bytes sent per step under expert parallelism
#: is measured by newer trainers only, so older and single-process runs leave its column out.
OPTIONAL_KEYS = tuple(f.key for f in FIELDS if f.record == METRICS and f.key in ("comm_bytes_per_step",))
#: study.md headers and number formats of the metric columns.
_COLUMNS = {"experts_used": ("experts used", ".1f"), "effective_experts": ("2^H_u", ".1f"),
            "usage_entropy": ("H_u", ".3f"),
            "sample_entropy": ("H_s", ".3f"), "mutual_information": ("I(E;Y)", ".3f"),
            "mutual_information_predicted": ("I pred.", ".3f"), "test_error": ("test error", ".4f"),
            "step_seconds": ("step s", ".4f"), "peak_memory_mb": ("peak memory MB", ".0f"),
            "comm_bytes_per_step": ("bytes sent/step", ".4g")}
_POINT = re.compile(r"(?P<regularizer>.+)_e(?P<E>\d+)")
_SEED = re.compile(r"seed(?P<seed>\d+)")


def experts_run_dir(root: Path, regularizer: str, num_experts: int, seed: int) -> Path:
    """The run folder of one (regulariser, E, seed) of the study."""
    return Path(root) / f"{regularizer}_e{num_experts}" / f"seed{seed}"


@dataclass(frozen=True)
class StudyGrid:
    """The points a report covers: every E x regulariser, each with these seeds."""
    experts: tuple[int, ...]
    regularizers: tuple[str, ...]
    seeds: tuple[int, ...]


@dataclass(frozen=True)
class StudyRun:
    """One finished run: its seed, saved config (a nested dict) and metrics.json."""
    seed: int
    config: dict[str, Any]
    metrics: dict[str, Any]


def discover_grid(root: Path, experts: Sequence[int] | None = None, regularizers: Sequence[str] | None = None,
                  seeds: Sequence[int] | None = None, order: Sequence[str] = ()) -> StudyGrid:
    """The grid of ``root``'s run folders (finished or not), where a list is not given:
    regularisers in ``order`` first (the study's), then by name."""
    found = []  # (regulariser, E, seed) of every run folder
    for point in sorted(Path(root).iterdir()) if Path(root).is_dir() else []:
        match = _POINT.fullmatch(point.name)
        if point.is_dir() and match:
            found += [(match["regularizer"], int(match["E"]), int(seed["seed"])) for run in sorted(point.iterdir())
                      if run.is_dir() and (seed := _SEED.fullmatch(run.name))]
    if not found and None in (experts, regularizers, seeds):
        raise MoEDistError(f"--root {root}: no study run folders there (REGULARIZER_eE/seedS); "
                           "give the --root a study wrote")
    rank = {r: i for i, r in enumerate(order)}
    return StudyGrid(tuple(experts or sorted({E for _, E, _ in found})),
                     tuple(regularizers or sorted({r for r, _, _ in found}, key=lambda r: (rank.get(r, len(rank)), r))),
                     tuple(seeds if seeds is not None else sorted({s for _, _, s in found})))


def read_runs(root: Path, grid: StudyGrid) -> dict[tuple[str, int], list[StudyRun]]:
    """(regulariser, E) -> its finished runs in seed order, for every point of ``grid`` (E-major)."""
    runs: dict[tuple[str, int], list[StudyRun]] = {}
    for E in grid.experts:
        for regularizer in grid.regularizers:
            dirs = [(s, RunDir(experts_run_dir(root, regularizer, E, s))) for s in grid.seeds]
            runs[(regularizer, E)] = [StudyRun(s, run.read_config_dict() if run.is_run() else {}, run.read_metrics())
                                      for s, run in dirs if run.finished()]
    return runs


def metric_keys(runs: dict[tuple[str, int], list[StudyRun]]) -> tuple[str, ...]:
    """The aggregated fields: METRIC_KEYS, and the optional ones some run has."""
    present = {k for point in runs.values() for run in point for k in run.metrics}
    return (METRIC_KEYS[0], *DERIVED_KEYS, *METRIC_KEYS[1:], *(k for k in OPTIONAL_KEYS if k in present))


def median_step_seconds(metrics: dict[str, Any]) -> Any:
    """Seconds per training step in the run's median epoch (``epoch_seconds`` of the history
    over the steps per epoch). A pause lengthens one epoch and the run's mean, metrics.json's
    ``step_seconds`` (train_seconds / steps): a process stopped while a benchmark ran beside it,
    a machine busy for a while. The median epoch does not see it. Runs without epoch times
    give their mean."""
    history = metrics.get("history") or []
    epochs = _numbers(record.get("epoch_seconds") for record in history)
    steps = metrics.get("steps")
    if not epochs or len(epochs) != len(history) or not isinstance(steps, int) or steps <= 0:
        return metrics.get("step_seconds")
    return statistics.median(epochs) * len(epochs) / steps


def _metric(metrics: dict[str, Any], key: str) -> Any:
    """A run's value of ``key``; for a per-kind record (``comm_bytes_per_step``: dispatch,
    gradients, other, total) its total; for ``step_seconds`` its median epoch's."""
    if key in DERIVED_KEYS:
        return DERIVED_KEYS[key](metrics)
    if key == "step_seconds":
        return median_step_seconds(metrics)
    value = metrics.get(key)
    return value.get("total") if isinstance(value, dict) else value


def _numbers(values: Iterable[Any]) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]


def summarize(runs: dict[tuple[str, int], list[StudyRun]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """study.csv's rows: one per point with a finished run. ``<key>_mean`` and ``<key>_std``
    (sample std, n - 1; None for one seed); the stack size (stacked runs' times are the
    stack's) and the process layouts the seeds ran with."""
    rows = []
    for (regularizer, E), point in runs.items():
        if not point:
            continue
        row: dict[str, Any] = {"E": E, "regularizer": regularizer, "seeds": len(point)}
        for key in keys:
            values = _numbers(_metric(run.metrics, key) for run in point)
            row[f"{key}_mean"] = statistics.fmean(values) if values else None
            row[f"{key}_std"] = statistics.stdev(values) if len(values) >= 2 else None
        row["stack_members_mean"] = statistics.fmean(run.metrics.get("stack_members") or 1 for run in point)
        for key in ("num_processes", "ep_size"):
            row[key] = "/".join(str(v) for v in sorted({run.metrics.get(key, 1) for run in point}))
        rows.append(row)
    return rows


def incomplete_points(runs: dict[tuple[str, int], list[StudyRun]], grid: StudyGrid) -> list[str]:
    """``attentive_ls E=160: 1 of 3 seeds (missing seed 1, 2)``, one per point short of seeds;
    one line for an E none of whose points has finished (a study not yet that far)."""
    lines = []
    for E in grid.experts:
        points = [(r, runs[(r, E)]) for r in grid.regularizers]
        if not any(point for _, point in points):
            lines.append(f"E={E}: no finished run ({', '.join(grid.regularizers)}: 0 of {len(grid.seeds)} seeds)")
            continue
        for regularizer, point in points:
            missing = [s for s in grid.seeds if s not in {run.seed for run in point}]
            if missing:
                lines.append(f"{regularizer} E={E}: {len(point)} of {len(grid.seeds)} seeds "
                             f"(missing seed {', '.join(map(str, missing))})")
    return lines


def describe_regularizer(config: dict[str, Any]) -> str:
    """A run's regulariser in words, from its saved config: ``dense routing, L_cv w 0.2``."""
    moe, loss = config.get("moe", {}), config.get("loss", {})
    parts = [f"{moe.get('routing', '?')} routing"]
    if loss.get("importance_weight"):
        parts.append(f"L_cv w {loss['importance_weight']:g}")
    if loss.get("ls_beta") or loss.get("ls_gamma"):
        parts.append(f"L_s beta {loss.get('ls_beta', 0):g} gamma {loss.get('ls_gamma', 0):g} "
                     f"({loss.get('ls_variant', '?')} normalisation)")
    return ", ".join(parts) if len(parts) > 1 else f"{parts[0]}, no regulariser"


def _cell(row: dict[str, Any], key: str) -> str:
    """``mean ± std``, the mean alone for one seed, blank where no run has the field."""
    mean, std = row.get(f"{key}_mean"), row.get(f"{key}_std")
    spec = _COLUMNS[key][1]
    if mean is None:
        return ""
    return f"{mean:{spec}}" if std is None else f"{mean:{spec}} ± {std:{spec}}"


def _layout(row: dict[str, Any]) -> str:
    """``2 (ep 2)``: processes, and the expert-parallel ranks where the experts were sharded."""
    return row["num_processes"] if row["ep_size"] == "1" else f"{row['num_processes']} (ep {row['ep_size']})"


def experts_markdown(runs: dict[tuple[str, int], list[StudyRun]], rows: list[dict[str, Any]], keys: Sequence[str],
                     grid: StudyGrid, root: Path, config: str | Path | None = None) -> str:
    """study.md: one row per (E, regulariser) with a finished run, cells mean ± std over seeds,
    then the points short of seeds."""
    first: dict[str, dict[str, Any]] = {}  # each regulariser's settings, from its first run
    for (regularizer, _), point in runs.items():
        if point:
            first.setdefault(regularizer, point[0].config)
    any_run = next(iter(first.values()), {})
    data, train = any_run.get("data", {}), any_run.get("train", {})
    lines = ["# Expert-count study (docs/papers.md A.10)", "",
             f"Runs under `{root}`{f' (base config `{config}`)' if config else ''}: data {data.get('name', '?')}, "
             f"{any_run.get('model', {}).get('arch', '?')} architecture, {train.get('epochs', '?')} epochs, "
             f"batch {train.get('batch_size', '?')}. Regularisers (each run's saved config): "
             + "; ".join(f"{r} = {describe_regularizer(first[r]) if r in first else '(no finished run)'}"
                         for r in grid.regularizers) + ".",
             "",
             "Cells: mean ± sample std (n - 1) over the seeds, the mean alone for one seed. experts used = "
             "experts top-gated for > 1 % of the test samples (at most 100, and fewer once E > 100 even "
             "for uniform usage); 2^H_u = the effective number of experts (E for uniform usage); H_u, H_s and I(E;Y) in bits (H_u at most log2 E); "
             "I pred. = I(E;Y) with the chosen expert's predicted class (the paper's code). step s = seconds "
             "per training step in the run's median epoch (a pause in one epoch does not count). stack = runs "
             "trained as one stack (mean of stack_members): the step time and peak memory of a stacked run "
             "are the whole stack's, all its members computed together in one process. procs = processes "
             "(ep = expert-parallel ranks).", ""]
    headers = ("E", "regulariser", "seeds", *(_COLUMNS[k][0] for k in keys), "stack", "procs")
    lines.append(markdown_table(headers, [(r["E"], r["regularizer"], r["seeds"], *(_cell(r, k) for k in keys),
                                           f"{r['stack_members_mean']:g}", _layout(r)) for r in rows]))
    incomplete = incomplete_points(runs, grid)
    if incomplete:
        lines += ["", f"Incomplete points ({len(grid.seeds)} seeds asked for: {', '.join(map(str, grid.seeds))}):", ""]
        lines += [f"- {line}" for line in incomplete]
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """study.csv: E, regularizer, seeds, then ``<key>_mean``, ``<key>_std`` per field (empty: none)."""
    fieldnames = list(dict.fromkeys(k for row in rows for k in row)) or ["E", "regularizer", "seeds"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)


def heatmap_choice(experts: Sequence[int], regularizers: Sequence[str], heatmaps: Sequence[int] | None,
                   heatmap_regularizers: Sequence[str] | None) -> tuple[list[int], list[str]]:
    """The (E values, regularisers) of study_selection.png among those available: by default
    the smallest and largest E, and L_cv and L_s (else every regulariser)."""
    if not experts:
        return [], []
    if heatmaps is None:
        heatmaps = sorted({min(experts), max(experts)})
    for E in heatmaps:
        if E not in experts:
            raise ConfigError(f"--heatmaps {E}: the study has no run with E = {E}; "
                              f"available: {','.join(map(str, sorted(experts)))}")
    if heatmap_regularizers is None:
        heatmap_regularizers = [r for r in ("lcv", "ls") if r in regularizers] or list(regularizers)
    for r in heatmap_regularizers:
        if r not in regularizers:
            raise ConfigError(f"--heatmap-regularizers {r!r}: the study has no run of it; "
                              f"available: {','.join(regularizers)}")
    return list(heatmaps), list(heatmap_regularizers)


def write_experts_report(root: str | Path, grid: StudyGrid, config: str | Path | None = None,
                         heatmaps: Sequence[int] | None = None,
                         heatmap_regularizers: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Write study.md, study.csv and the figures (moe_dist/experiments/study_figures.py) of
    ``grid``'s finished runs under ``root``; returns study.csv's rows."""
    from moe_dist.experiments.study_figures import write_study_figures

    root = Path(root)
    runs = read_runs(root, grid)
    if not any(runs.values()):
        raise MoEDistError(f"--root {root}: none of the study's runs has finished (no metrics.json)")
    present = {key: point for key, point in runs.items() if point}
    selection = heatmap_choice(sorted({E for _, E in present}), list(dict.fromkeys(r for r, _ in present)),
                               heatmaps, heatmap_regularizers)
    keys = metric_keys(runs)
    rows = summarize(runs, keys)
    write_csv(rows, root / "study.csv")
    (root / "study.md").write_text(experts_markdown(runs, rows, keys, grid, root, config))
    write_study_figures(rows, runs, root, *selection)
    return rows
