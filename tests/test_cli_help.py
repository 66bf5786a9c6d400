"""The command line a new user meets: suggestions for unknown keys, `moe-dist config`,
`--version`, and `--help` texts written for users (short, with examples, no code markup)."""

from __future__ import annotations

import argparse
import importlib.metadata
import re

import pytest
import yaml

from conftest import CONFIGS, REPO
from moe_dist import cli, cli_help
from moe_dist.cli import build_parser, main
from moe_dist.config import CHOICES, Config, config_keys, load_config, to_dict, with_values
from moe_dist.config_cli import config_files, key_infos
from moe_dist.errors import ConfigError

SYNTHETIC = str(CONFIGS / "synthetic" / "s1_moe_nonlinear.yaml")
EVERY_KEY = "(moe-dist config keys lists every key)"


def _error(capsys, argv: list[str]) -> str:
    """The one line `moe-dist ARGV` prints on stderr when it stops with exit status 2."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1, captured.err
    return captured.err.strip()


def _help(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


# ---------------------------------------------------------------- unknown keys

@pytest.mark.parametrize("override, hint", [
    ("train.epoch=3", "override: unknown key 'train.epoch'; did you mean train.epochs? " + EVERY_KEY),
    ("epochs=3", "override: unknown key 'epochs'; did you mean train.epochs? " + EVERY_KEY),
    ("lr=0.1", "override: unknown key 'lr'; did you mean train.lr? " + EVERY_KEY),
    ("moe.experts=4", "override: unknown key 'moe.experts'; did you mean moe.num_experts? " + EVERY_KEY),
    ("trian.epochs=3", "override: unknown key 'trian'; did you mean train? " + EVERY_KEY),  # the section is named
    ("xyzzy=1", "override: unknown key 'xyzzy' " + EVERY_KEY),
])
def test_an_unknown_override_names_the_nearest_keys(capsys, tmp_path, override, hint):
    line = _error(capsys, ["train", f"run_dir={tmp_path / 'run'}", override])
    assert line == f"moe-dist: error: {hint}"
    assert not (tmp_path / "run").exists()


def test_an_unknown_key_in_a_config_file_names_the_file_and_the_nearest_key(capsys, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("moe:\n  num_expert: 4\n")
    assert _error(capsys, ["train", "--config", str(path)]) == (
        f"moe-dist: error: {path}: unknown key 'moe.num_expert'; did you mean moe.num_experts? {EVERY_KEY}")


def test_with_values_names_the_nearest_key():
    with pytest.raises(ConfigError, match=re.escape(f"unknown config key 'train.frozen'; did you mean "
                                                    f"train.freeze? {EVERY_KEY}")):
        with_values(Config(), {"train.frozen": ["gate"]})


def test_an_invalid_value_still_names_the_allowed_values(capsys):
    assert _error(capsys, ["train", "moe.routing=sparse"]).endswith(
        "moe.routing='sparse' is not one of: dense, topk, attentive, hierarchical")


# ---------------------------------------------------------------- moe-dist config

def test_config_keys_lists_every_key_with_type_default_and_meaning(capsys):
    assert main(["config", "keys"]) == 0
    out = capsys.readouterr().out
    headers = re.findall(r"^(\S+): (\S+) = (.+)$", out, flags=re.MULTILINE)
    assert [key for key, _, _ in headers] == config_keys()
    assert ("train.epochs", "int", "20") in headers and ("moe.routing", "str", '"dense"') in headers
    assert ("train.init_parts", "list[str]", '["experts", "gate"]') in headers
    # The meaning is the docstring under the field in moe_dist/config.py; every key has one.
    assert all(info.doc for info in key_infos()), [info.key for info in key_infos() if not info.doc]
    assert "train.epochs: int = 20\n    Passes over the training set (full-batch runs: gradient steps).\n" in out
    assert "    allowed: mnist, fmnist, fmnist_mnist, cifar100, patch_cnn\n" in out  # model.arch's doc lacks them


def test_config_keys_section_lists_only_that_section(capsys):
    assert main(["config", "keys", "train"]) == 0
    keys = re.findall(r"^(\S+): ", capsys.readouterr().out, flags=re.MULTILINE)
    assert keys == [k for k in config_keys() if k.startswith("train.")]
    assert _error(capsys, ["config", "keys", "trian"]) == (
        f"moe-dist: error: config keys: no key or section 'trian'; did you mean train? {EVERY_KEY}")


def test_config_list_names_every_shipped_config_with_its_first_comment_line(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(["config", "list"]) == 0
    out = capsys.readouterr().out
    files = config_files()
    assert len(files) == len(list(CONFIGS.rglob("*.yaml"))) > 40
    for path, comment in files:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# moe-dist ") and comment[0] == first[1:].strip()
        assert f"\n{path.relative_to(REPO)}: " in out and f"\n    {comment[0]}\n" in out
    assert ("configs/mnist/vanilla.yaml: Krishnamurthy et al. (AISTATS 2023) Table 2, MNIST: vanilla "
            "output-mixture MoE, 5 experts.\n    moe-dist train --config configs/mnist/vanilla.yaml\n") in out
    assert main(["config", "list", "sweeps"]) == 0
    listed = re.findall(r"^(configs/\S+):", capsys.readouterr().out, flags=re.MULTILINE)
    assert listed == sorted(str(p.relative_to(REPO)) for p in (CONFIGS / "sweeps").glob("*.yaml"))
    assert "folders: cifar100, fmnist, mnist, section4, sweeps, synthetic" in _error(capsys, ["config", "list", "nope"])


def test_config_show_prints_the_resolved_config_as_yaml(capsys):
    overrides = ["train.epochs=7", "moe.num_experts=4", "data.train_size=100"]
    assert main(["config", "show", SYNTHETIC, *overrides]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# ") and out.endswith("\n")
    shown = yaml.safe_load(out)
    assert shown == to_dict(load_config(SYNTHETIC, overrides))
    assert (shown["train"]["epochs"], shown["moe"]["num_experts"]) == (7, 4)
    assert "did you mean train.epochs?" in _error(capsys, ["config", "show", SYNTHETIC, "train.epoch=7"])


# ---------------------------------------------------------------- --version and --help

def test_version_names_moe_dist_and_torch(capsys):
    import torch

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"moe-dist {importlib.metadata.version('moe_dist')} (torch {torch.__version__},")


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, parser) of every subcommand, nested ones (config keys, study experts) included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from _commands(sub, (*path, name))


def test_top_level_help_says_what_moe_dist_does_with_an_example_per_command(capsys):
    out = _help(capsys, [])
    assert out.split("\n\n")[1] == cli_help.DESCRIPTION  # the user's text, not the module docstring
    assert cli.__doc__.strip() not in out
    names = [path[0] for path, _ in _commands(build_parser()) if len(path) == 1]
    assert sorted(names) == sorted(cli_help.EXAMPLES)
    for name in names:
        assert re.search(rf"^    {name}\s+\S", out, flags=re.MULTILINE) or f"    {name}\n" in out, name  # purpose
        assert re.search(rf"^  moe-dist {name} ", out, flags=re.MULTILINE), name  # example


@pytest.mark.parametrize("path", [path for path, _ in _commands(build_parser())], ids=" ".join)
def test_every_command_help_is_short_and_has_an_example(capsys, path):
    out = _help(capsys, list(path))
    assert re.search(rf"^examples?\b.*:\n(  .*\n)*  moe-dist {' '.join(path)}\b", out, flags=re.MULTILINE), out
    description = out.split("\n\n")[1]
    assert not description.startswith(("positional arguments", "options")), f"no description:\n{out}"
    assert len(description.splitlines()) <= 5, description
    assert "``" not in out and "::" not in out  # no reStructuredText from module docstrings


def test_data_help_names_every_dataset(capsys):
    out = _help(capsys, ["data"])
    assert set(cli_help.DATASET_NOTES) == set(CHOICES["data.name"])
    for name in CHOICES["data.name"]:
        assert re.search(rf"^  {name} +{re.escape(cli_help.DATASET_NOTES[name])}$", out, flags=re.MULTILINE), name
