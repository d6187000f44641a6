"""The README's promises, run as a user types them: its Python API example (a real subprocess, from a fresh working
directory), and its tour's commands exist with the flags it names."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def python_example() -> str:
    section = README.partition("## Python API")[2]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README has no Python API example"
    return match.group(1)


def shell_commands(text: str = README) -> list[str]:
    """Every `fedlora ...` command line in the code blocks of ``text``."""
    blocks = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, re.S)
    return [line.strip() for block in blocks for line in block.replace("\\\n", " ").splitlines() if line.strip().startswith("fedlora ")]


@pytest.mark.slow
def test_the_python_api_example_runs_as_written(tmp_path):
    """The example as printed (tiny model, offline data), in a fresh process, from an empty directory."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", python_example()], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "| fedit |" in res.stdout and "| fedsa |" in res.stdout  # the comparison's table was printed
    assert (tmp_path / "runs" / "api" / "metrics.jsonl").exists()
    assert (tmp_path / "runs" / "api-cmp" / "comparison.md").exists()


def test_the_tours_commands_parse_with_the_flags_they_name():
    from fedlora.cli.main import build_parser

    commands = shell_commands()
    assert any(c.startswith("fedlora run") for c in commands) and any(c.startswith("fedlora compare") for c in commands)
    docs = {path.name: shell_commands(path.read_text()) for path in sorted((ROOT / "docs").glob("*.md"))}
    assert docs["instruct.md"], "docs/instruct.md's run command is checked too"
    parser = build_parser()
    for command in commands + [c for cs in docs.values() for c in cs]:
        argv = command.split("#")[0].split()[1:]
        parser.parse_args(argv)  # an unknown flag or a bad value exits (SystemExit) and fails here
