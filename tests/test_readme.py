"""The README's set-up commands: exactly two, working where the system Python
refuses `pip install` (Debian/Ubuntu's externally-managed-environment), and
the test command is what CI runs."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def setup_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", section, re.S)]


def steps(command: str) -> list[list[str]]:
    return [shlex.split(part) for part in command.split("&&")]


def test_the_readme_has_exactly_two_set_up_commands():
    commands = setup_commands()
    assert len(commands) == 2, commands
    assert all("\n" not in c for c in commands), "each is one line a user pastes"
    demo, tests = (steps(c) for c in commands)
    assert demo[-1][-1] == "demo" and "vfiosim" in demo[-1][0]
    assert tests[-1][-2:] == ["-m", "pytest"]
    assert any(arg == ".[test]" for step in tests for arg in step)


def test_no_set_up_command_installs_into_the_system_python():
    """`python3 -m pip install` or a bare `pip install` fails with
    externally-managed-environment on Debian and Ubuntu: every install goes
    into the virtual environment the command creates first."""
    for command in setup_commands():
        parts = steps(command)
        assert parts[0][:3] == ["python3", "-m", "venv"], command
        venv = parts[0][3]
        for step in parts[1:]:
            if "install" in step:
                assert step[0] == f"{venv}/bin/pip", step
            else:
                assert step[0].startswith(f"{venv}/bin/"), step


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().rstrip().splitlines()
    assert ci[-1] == setup_commands()[1]
