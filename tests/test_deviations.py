"""Every deviation message the kernel can print cites a heading of
docs/deviations.md, and every message is built from the one table
(kernel/deviations.py) rather than written inline."""

from __future__ import annotations

import ast
import re
import string
from pathlib import Path

import pytest

from vfiosim.kernel.deviations import DEVIATIONS, deviation, deviation_id

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "deviations.md"
KERNEL = ROOT / "src" / "vfiosim" / "kernel"


def documented_ids() -> set[str]:
    return set(re.findall(r"^### (\w+)\. ", DOC.read_text(), flags=re.MULTILINE))


def test_every_table_entry_is_a_heading_of_deviations_md():
    ids = documented_ids()
    assert {"1", "2b", "3f", "6e", "9"} <= ids                  # the parser finds the headings
    missing = sorted(k for k in DEVIATIONS if deviation_id(k) not in ids)
    assert not missing, f"no heading in docs/deviations.md for {missing}"


def test_every_deviation_the_kernel_prints_is_in_the_table():
    used = set()
    for path in KERNEL.rglob("*.py"):
        used |= set(re.findall(r"""\bdeviation\(\s*["']([\w.]+)["']""", path.read_text()))
    assert used, "the kernel prints no deviation at all?"
    assert not used - set(DEVIATIONS), f"unknown deviation keys used: {sorted(used - set(DEVIATIONS))}"
    assert not set(DEVIATIONS) - used, f"table entries nothing prints: {sorted(set(DEVIATIONS) - used)}"


def test_no_kernel_message_cites_deviations_md_inline():
    """A string in kernel code that cites docs/deviations.md comes from the
    table; docstrings and comments may cite it."""
    offenders = []
    for path in KERNEL.rglob("*.py"):
        if path.name == "deviations.py":
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body
                      and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings \
                    and "deviations.md" in node.value:
                offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders


@pytest.mark.parametrize("key", sorted(DEVIATIONS))
def test_each_message_formats_and_cites_its_id(key):
    fields = {name for _, name, _, _ in string.Formatter().parse(DEVIATIONS[key]) if name}
    line = deviation(key, **{name: 0 for name in fields})
    assert line.startswith("vfiosim: ") and line.endswith(f"(docs/deviations.md {deviation_id(key)})")
