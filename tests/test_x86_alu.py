"""The shim's run-ahead emulator of register arithmetic and branches
(src/vfiosim/preload/x86_alu.h) against the CPU it runs on.

tests/c/x86_alu_check.c runs random instructions of every accepted form on
the CPU and through the emulator, with random registers and flags, and
compares every register and the six arithmetic flags, and every condition
code against SETcc; it also checks the forms that must be refused (memory
operands, %rsp, calls, system calls).  The mutation test proves the check
would see an emulator that got one flag wrong.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from runutil import C_DIR, cc

PRELOAD = Path(__file__).resolve().parent.parent / "src" / "vfiosim" / "preload"


def check(exe: Path, cases: int, seed: int) -> tuple[int, dict[str, int], str]:
    proc = subprocess.run([str(exe), str(cases), str(seed)], capture_output=True, text=True, timeout=120)
    summary = proc.stdout.strip().splitlines()[-1]
    return proc.returncode, {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", summary)}, proc.stdout


@pytest.fixture(scope="module")
def checker(tmp_path_factory):
    return cc(C_DIR / "x86_alu_check.c", tmp_path_factory.mktemp("alu"), "-I", str(PRELOAD))


@pytest.mark.parametrize("seed", [1, 0x5EED, 0xC0FFEE])
def test_the_emulator_computes_what_the_cpu_computes(checker, seed):
    rc, counts, out = check(checker, 150_000, seed)
    assert rc == 0, out[-3000:]
    assert counts["mismatches"] == 0
    # Every family was exercised, not just refused.
    assert counts["alu"] > 50_000 and counts["mov"] > 10_000 and counts["setcc"] > 20_000


@pytest.mark.parametrize("mutation", [
    ("f = (f & ~1ull) | (*flags & 1);", "(void)0;"),             # INC/DEC clobber CF
    ("if ((a ^ b ^ res) & 0x10)", "if ((a ^ b ^ res) & 0x08)"),   # AF from the wrong bit
    ("case 6: r = sf != of; break;", "case 6: r = sf; break;"),   # JL as JS
    ("r[n] = v & 0xffffffffull;", "r[n] = (r[n] & ~0xffffffffull) | (v & 0xffffffffull);"),   # no zero-extension
])
def test_the_check_catches_a_wrong_emulator(tmp_path, mutation):
    old, new = mutation
    text = (PRELOAD / "x86_alu.h").read_text()
    assert text.count(old) == 1
    (tmp_path / "x86_alu.h").write_text(text.replace(old, new))
    shutil.copy(C_DIR / "x86_alu_check.c", tmp_path / "x86_alu_check.c")
    exe = cc(tmp_path / "x86_alu_check.c", tmp_path, "-I", str(tmp_path))
    rc, counts, out = check(exe, 20_000, 1)
    assert rc == 1 and counts["mismatches"] > 0, out[-2000:]
