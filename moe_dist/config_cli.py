"""``moe-dist config keys|list|show``: what can be configured, what is shipped, what a run gets.

``keys`` reads each key's meaning from the attribute docstrings of moe_dist/config.py (the
string under each dataclass field), parsed with ``ast``, so the source stays the one place a
key is documented. ``list`` reads the comment that starts every shipped config file (its
command and the paper's result). ``show`` prints the config a ``train`` command would run.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import re
import shutil
import sys
import textwrap
from pathlib import Path
from typing import Any

import yaml

from moe_dist import config as config_module
from moe_dist.config import CHOICES, CONFIGS, Config, load_config, to_dict, unknown_key_hint
from moe_dist.errors import ConfigError

__all__ = ["KeyInfo", "key_infos", "attribute_docs", "config_files", "register"]


@dataclasses.dataclass(frozen=True)
class KeyInfo:
    """One dotted config key: its type as written in config.py, default and meaning."""

    key: str
    type: str
    default: Any
    doc: str


def attribute_docs(source: str) -> dict[str, dict[str, str]]:
    """Class name -> field name -> the string literal right under the field, on one line."""
    docs: dict[str, dict[str, str]] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields = docs.setdefault(node.name, {})
        for stmt, after in zip(node.body, node.body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                fields[stmt.target.id] = " ".join(after.value.value.split())
    return docs


def key_infos() -> list[KeyInfo]:
    """Every key of ``Config`` in declaration order, with its documentation from config.py."""
    docs = attribute_docs(Path(config_module.__file__).read_text(encoding="utf-8"))
    infos: list[KeyInfo] = []

    def walk(instance: Any, prefix: str) -> None:
        for f in dataclasses.fields(instance):
            value = getattr(instance, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                doc = docs.get(type(instance).__name__, {}).get(f.name, "")
                infos.append(KeyInfo(prefix + f.name, str(f.type), value, doc))

    walk(Config(), "")
    return infos


def _write(lines: list[str]) -> None:
    """Print ``lines``; a reader that stops early (``| head``) ends the output without a traceback."""
    try:
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python flushes stdout again at exit


def _width() -> int:
    return max(60, min(shutil.get_terminal_size().columns, 100))


def cmd_keys(args: argparse.Namespace) -> int:
    infos = key_infos()
    if args.section:
        infos = [i for i in infos if i.key == args.section or i.key.startswith(args.section + ".")]
        if not infos:
            raise ConfigError(f"config keys: no key or section {args.section!r}{unknown_key_hint(args.section)}")
    lines = [] if args.section else [
        "Every config key as KEY: TYPE = DEFAULT, then its meaning. Set keys in a config file or as",
        "key=value on the command line (moe-dist train --config FILE train.epochs=5).", ""]
    wrap = textwrap.TextWrapper(width=_width(), initial_indent="    ", subsequent_indent="    ")
    for info in infos:
        lines.append(f"{info.key}: {info.type} = {json.dumps(info.default)}")
        if info.doc:
            lines.append(wrap.fill(info.doc))
        if info.key in CHOICES:
            lines.append(wrap.fill(f"allowed: {', '.join(CHOICES[info.key])}"))
    _write(lines)
    return 0


def config_files(root: Path = CONFIGS) -> list[tuple[Path, list[str]]]:
    """Every shipped config file under ``root`` with the lines of its leading comment."""
    files = []
    for path in sorted(root.rglob("*.yaml")):
        comment = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.startswith("#"):
                break
            comment.append(line.lstrip("#").strip())
        files.append((path, comment))
    return files


def _first_sentence(text: str) -> str:
    """Up to the first full stop followed by a capital or a digit (``et al. (2022)`` is no end)."""
    return re.split(r"(?<=\.)\s+(?=[A-Z0-9])", text.strip(), maxsplit=1)[0]


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it, else absolute."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def cmd_list(args: argparse.Namespace) -> int:
    files = config_files()
    folders = sorted({path.parent.relative_to(CONFIGS).as_posix() for path, _ in files})
    if args.folder:
        if args.folder not in folders:
            raise ConfigError(f"config list: no folder {args.folder!r} in {_shown(CONFIGS)} "
                              f"(folders: {', '.join(folders)})")
        files = [(p, c) for p, c in files if p.parent.relative_to(CONFIGS).as_posix() == args.folder]
    lines = [f"Shipped configs in {_shown(CONFIGS)}/: each file, what it reproduces and its command.",
             "moe-dist config show FILE [key=value ...] prints every key a run of it would use."]
    folder = None
    for path, comment in files:
        if path.parent != folder:
            folder = path.parent
            lines.append("")
        about = _first_sentence(" ".join(line for line in comment[1:] if not line.startswith("(")))
        lines.append(f"{_shown(path)}: {about}" if about else _shown(path))
        lines += [f"    {comment[0]}"] if comment else []
    _write(lines)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    cfg = load_config(args.file, args.overrides)
    _write([f"# {' '.join([_shown(Path(args.file)), *args.overrides])}: every key, resolved and validated",
            yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip("\n")])
    return 0


def register(subparsers: Any) -> None:
    """Add ``moe-dist config keys [SECTION]``, ``config list [FOLDER]``, ``config show FILE [key=value ...]``."""
    raw = argparse.RawDescriptionHelpFormatter
    config = subparsers.add_parser(
        "config", help="list config keys and shipped config files, show a resolved config",
        description="What can be configured, which configs ship with moe_dist, and what a run would use.",
        epilog="examples:\n  moe-dist config keys train\n  moe-dist config list mnist\n"
               "  moe-dist config show configs/mnist/vanilla.yaml train.epochs=5", formatter_class=raw)
    sub = config.add_subparsers(dest="action", required=True, metavar="ACTION")
    sections = ", ".join(f.name for f in dataclasses.fields(Config) if dataclasses.is_dataclass(f.default_factory))
    p = sub.add_parser("keys", help="every config key with its type, default and meaning",
                       description="Every config key with its type, default and meaning.",
                       epilog="example:\n  moe-dist config keys moe", formatter_class=raw)
    p.add_argument("section", nargs="?", default="", metavar="SECTION",
                   help=f"only this section ({sections}) or key")
    p.set_defaults(func=cmd_keys)
    p = sub.add_parser("list", help="the shipped config files and what each reproduces",
                       description="The shipped config files, each with its command and what it reproduces.",
                       epilog="example:\n  moe-dist config list synthetic", formatter_class=raw)
    p.add_argument("folder", nargs="?", default="", metavar="FOLDER",
                   help="only this folder of configs/ (e.g. mnist, synthetic, sweeps)")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("show", help="a config file with overrides applied, as YAML (every key)",
                       description="The config a run of FILE with these overrides would use, every key, as YAML.",
                       epilog="example:\n  moe-dist config show configs/mnist/vanilla.yaml data.name=mnist10k seed=1",
                       formatter_class=raw)
    p.add_argument("file", metavar="FILE", help="YAML config file, e.g. configs/mnist/vanilla.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, as for moe-dist train")
    p.set_defaults(func=cmd_show)
