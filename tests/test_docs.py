"""Shipped configurations parse, and the commands in the README and docs are ones the code accepts."""

from __future__ import annotations

import argparse
import re
import shlex
import typing
from pathlib import Path

import pytest
import yaml

from caft.cli import build_parser
from caft.config import TrainConfig, load_config

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_CONFIGS = sorted((REPO / "examples").glob("*.yaml"))
PROJECT_CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def is_accelerate_config(path: Path) -> bool:
    data = yaml.safe_load(path.read_text()) or {}
    return "distributed_type" in data or "compute_environment" in data


def fenced_blocks(text: str, languages=("bash", "sh", "shell")) -> list[str]:
    """Return the bodies of the fenced code blocks in the given languages (three or more backticks)."""
    pattern = re.compile(r"^(`{3,})(\w*)[^\n]*\n(.*?)^\1\s*$", re.M | re.S)
    return [match.group(3) for match in pattern.finditer(text) if match.group(2) in languages]


def section(text: str, heading: str) -> str:
    """Return the text under a `## heading`, up to the next heading of the same level."""
    match = re.search(rf"^## {re.escape(heading)}\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README has no '## {heading}' section"
    return match.group(1)


def shell_lines(block: str) -> list[str]:
    """Join backslash continuations and drop comments and blank lines."""
    joined = re.sub(r"\\\n\s*", " ", block)
    lines = []
    for line in joined.splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def caft_arguments(line: str) -> list[str] | None:
    """Return the arguments after `caft` in a shell line (also `.venv/bin/caft`), or None."""
    for part in line.split("&&"):
        words = shlex.split(part)
        if words and Path(words[0]).name == "caft":
            return words[1:]
    return None


def documented_commands() -> list[tuple[str, list[str]]]:
    """Every `caft ...` line in the bash blocks of the README and docs, except synopses and elided examples."""
    commands = []
    for path in DOC_FILES:
        for block in fenced_blocks(path.read_text()):
            for line in shell_lines(block):
                arguments = caft_arguments(line)
                if arguments is None or "..." in line or "[" in line:
                    continue
                commands.append((f"{path.relative_to(REPO)}: {line}", arguments))
    return commands


# Configuration files --------------------------------------------------------------------------------


def test_examples_exist():
    assert EXAMPLE_CONFIGS


@pytest.mark.parametrize("path", EXAMPLE_CONFIGS, ids=lambda path: path.name)
def test_example_config_parses(path):
    config = load_config(argparse.Namespace(config=str(path)))
    assert isinstance(config, TrainConfig)
    # YAML reads 1e-4 as a string, which TrainConfig would keep, so every value must have its field's type.
    hints = typing.get_type_hints(TrainConfig)
    for name, value in yaml.safe_load(path.read_text()).items():
        expected = tuple(t for t in typing.get_args(hints[name]) or (hints[name],) if t is not type(None))
        expected = tuple(typing.get_origin(t) or t for t in expected)
        if float in expected:
            expected += (int,)
        assert value is None or isinstance(value, expected), f"{path.name}: {name}: {value!r} is not {expected}"


@pytest.mark.parametrize("path", PROJECT_CONFIGS, ids=lambda path: str(path.relative_to(REPO)))
def test_project_config_parses(path):
    if is_accelerate_config(path):
        from accelerate.commands.config.config_args import load_config_from_file

        config = load_config_from_file(str(path))
        assert config.distributed_type is not None
    else:
        assert isinstance(load_config(argparse.Namespace(config=str(path))), TrainConfig)


# README and docs ------------------------------------------------------------------------------------


def ci_commands() -> list[str]:
    """The commands `.ci/run` executes, without `set` and `cd` lines."""
    lines = shell_lines((REPO / ".ci" / "run").read_text())
    return [line for line in lines if not line.startswith(("set ", "cd "))]


def test_readme_test_command_is_ci():
    blocks = fenced_blocks(section((REPO / "README.md").read_text(), "Tests"))
    assert blocks, "README's Tests section has no bash block"
    command = shell_lines(blocks[0])
    assert len(command) == 1
    assert [part.strip() for part in command[0].split("&&")] == ci_commands()


def test_readme_main_command_parses(monkeypatch):
    monkeypatch.chdir(REPO)
    blocks = fenced_blocks(section((REPO / "README.md").read_text(), "First run"))
    assert blocks, "README's First run section has no bash block"
    lines = shell_lines(blocks[0])
    arguments = caft_arguments(lines[0])
    assert arguments is not None and arguments[0] == "train"
    assert lines[0].split("&&")[0].strip() == ci_commands()[0]  # the same setup as the tests
    config = load_config(build_parser().parse_args(arguments))
    assert config.heads_pretraining
    assert config.output_dir


@pytest.mark.parametrize("arguments", [pytest.param(arguments, id=where) for where, arguments in documented_commands()])
def test_documented_command_parses(arguments, monkeypatch):
    monkeypatch.chdir(REPO)
    parser = build_parser()
    if "--help" in arguments or "-h" in arguments:
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(arguments)
        assert exit_info.value.code == 0
        return
    args = parser.parse_args(arguments)
    if args.command in ("train", "train-heads"):
        assert isinstance(load_config(args), TrainConfig)


def test_every_command_has_page():
    parser = build_parser()
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    pages = {path.stem for path in (REPO / "docs" / "commands").glob("*.md")}
    assert set(commands.choices) <= pages
    assert pages <= set(commands.choices)


def test_doc_flags_exist():
    """Every `--flag` in a docs/commands page's tables is a flag of that command."""
    parser = build_parser()
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    for path in sorted((REPO / "docs" / "commands").glob("*.md")):
        if path.stem not in commands.choices:
            continue
        known = {flag for action in commands.choices[path.stem]._actions for flag in action.option_strings}
        table_rows = [line for line in path.read_text().splitlines() if line.startswith("| `")]
        flags = {flag for row in table_rows for flag in re.findall(r"`(--?[a-z][\w-]*)`", row.split("|")[1])}
        unknown = flags - known
        assert not unknown, f"{path.name} documents unknown flags {sorted(unknown)}"

