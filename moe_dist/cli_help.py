"""The texts of ``moe-dist --help`` and the commands' help that moe_dist/cli.py builds: what
the tool does, an example per command, what each dataset is. Wrapped by hand (shown with
argparse's RawDescriptionHelpFormatter); the long explanations are in README.md."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
moe-dist trains mixture-of-experts models whose experts can be sharded across processes
(expert parallelism), from one CPU process to GPU clusters, and reproduces two papers on
expert specialisation: Krishnamurthy et al. (AISTATS 2023) and Chen et al. (NeurIPS 2022).
A run is a YAML config plus key=value overrides; it writes one run folder (the resolved
config, metrics, TensorBoard events, checkpoints) and resumes from it when restarted."""
EXAMPLES: dict[str, str] = {  # one per command, in the order of the command list
    "train": "moe-dist train --config configs/mnist/vanilla.yaml data.name=mnist10k run_dir=runs/vanilla",
    "eval": "moe-dist eval runs/vanilla",
    "data": "moe-dist data info mnist10k",
    "config": "moe-dist config keys train",
    "sweep": "moe-dist sweep configs/sweeps/synthetic_s1.yaml --list",
    "stack": "moe-dist stack runs.yaml --dry-run",
    "report": "moe-dist report docs/results/synthetic --out reports/synthetic",
    "distill": "moe-dist distill runs/attentive_lcv --config configs/mnist/distilled_lcv.yaml",
    "study": "moe-dist study experts --config configs/mnist/vanilla.yaml --experts 5,10,15",
    "tensorboard": "moe-dist tensorboard runs",
}
RAW = argparse.RawDescriptionHelpFormatter  # the texts below are wrapped by hand
TRAIN_DESCRIPTION = """\
Train one config: a YAML file (moe-dist config list: the shipped ones) plus dotted key=value
overrides (moe-dist config keys: every key). Without --config it trains the embedded default,
Chen et al.'s synthetic setting s1 (about a minute on a CPU). A run restarted with the same
run_dir resumes from its latest checkpoint."""
TRAIN_EXAMPLES = f"""\
examples:
  moe-dist train
  {EXAMPLES['train']}
  moe-dist train --config configs/synthetic/s1_single_cubic.yaml train.epochs=50 seed=3
  moe-dist train --config configs/fmnist/vanilla.yaml --seeds 0-9 run_dir=runs/vanilla   # 10 runs, stacked"""
DATA_DESCRIPTION = """\
Download a dataset (with torchvision: pip install -e ".[vision]", needs network), check and
describe one (info), or write one to webdataset tar shards for data.format=webdataset.
Files are looked up in --root, else $MOE_DIST_DATA, else ./data."""
DATA_EXAMPLES = """\
examples:
  moe-dist data download fashion_mnist
  moe-dist data info mnist10k
  moe-dist data shards fashion_mnist --out shards/fmnist --shard-size 10000"""
# --help descriptions of the commands whose register() gives none fit for users (report passes
# its module docstring, tensorboard none).
DESCRIPTIONS: dict[str, str] = {
    "stack": """\
Train the runs a stack file lists (configs with overrides, or distillations from source
runs) in one process, runs that share an architecture and schedule as one stacked
computation; finished runs are skipped, interrupted ones resume. Details: README,
"Stacked runs".""",
    "report": """\
The papers' tables from finished runs: every run folder below the given paths, grouped by
config name and the hyperparameters that differ (the seeds of one setting form one row),
written to --out as report.md, report.csv and figures/. Details: README, "Reports".""",
    "tensorboard": """\
TensorBoard on a run folder or a folder of runs: training curves, MoE metrics, selection
tables, hparams. It serves this machine only unless --host says otherwise; from another
machine use ssh -L 6006:127.0.0.1:6006 HOST.""",
}
# `moe-dist data --help`: what each data.name is (the keys are moe_dist.config.CHOICES["data.name"]).
DATASET_NOTES: dict[str, str] = {
    "mnist": "full MNIST, 60,000 train / 10,000 test digits",
    "fashion_mnist": "full Fashion-MNIST, 60,000 / 10,000 clothing images",
    "mnist10k": "the real MNIST test set split 8,000 train / 2,000 test (tests/data holds a copy)",
    "cifar100": "CIFAR-100, 50,000 / 10,000 colour images in 100 classes",
    "fmnist_mnist": "the paper's 12-class Fashion-MNIST + MNIST combination (docs/papers.md A.3)",
    "synthetic": "Chen et al.'s cluster data, settings s1-s4, generated in memory (nothing to download)",
}
