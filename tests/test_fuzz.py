"""The fuzz harnesses in the test suite: the corpus, every crash found so far, and a short run.

The long run (>= 10^6 inputs, coverage-guided with atheris) is a documented
command, not a test: docs/reliability.md has the command and its result.
Each crash it found is an input under fuzz/regressions/<target>/ (replayed
here) and a named test below that says what was wrong.
"""

from __future__ import annotations

import ctypes
import errno
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

import vfiosim
from vfiosim import fuzz, uapi
from vfiosim.machine_spec import MachineFileError
from vfiosim.transport import protocol as P

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"


def inputs(kind: str):
    out = []
    for target in fuzz.TARGETS:
        d = FUZZ / kind / target
        if d.is_dir():
            out += [pytest.param(target, f, id=f"{target}/{f.name}") for f in sorted(d.iterdir()) if f.is_file()]
    return out


@pytest.mark.parametrize("target,path", inputs("regressions"))
def test_every_crash_found_stays_fixed(target, path):
    assert fuzz.run_one(target, path.read_bytes()) is None


def test_the_seed_corpus_runs_clean():
    files = inputs("corpus")
    assert len(files) >= 3 * 5, "the corpus has seeds for every target"
    for param in files:
        target, path = param.values
        assert fuzz.run_one(target, path.read_bytes()) is None, path


@pytest.fixture
def checkout_corpus(monkeypatch):
    """The engine's seeds are this checkout's, also when the vfiosim under
    test is an installed copy (CI runs the suite after `pip install .`)."""
    monkeypatch.setattr(fuzz, "REPO_FUZZ", FUZZ)


def test_an_installed_copy_finds_the_corpus_of_the_checkout_it_runs_in(monkeypatch, tmp_path):
    monkeypatch.setattr(fuzz, "REPO_FUZZ", tmp_path / "site-packages" / "fuzz")   # no corpus beside it
    monkeypatch.setattr(fuzz, "PACKAGED_FUZZ", tmp_path / "site-packages" / "vfiosim" / "fuzz_inputs")  # nor in it
    monkeypatch.chdir(FUZZ.parent)
    assert fuzz.corpus_dirs("ioctl")[0].resolve() == FUZZ / "corpus" / "ioctl"
    monkeypatch.chdir(tmp_path)                                   # and elsewhere: none, and it says so
    assert fuzz.corpus_dirs("ioctl") == []
    out = io.StringIO()
    fuzz.random_engine("ioctl", runs=1, seed=1, extra_dirs=[], max_len=64, crash_dir=tmp_path, seconds=None, out=out)
    assert "no seed corpus" in out.getvalue()


def test_an_installed_copy_elsewhere_uses_the_inputs_installed_with_it(monkeypatch, tmp_path):
    """A wheel carries the corpus and regressions (setup.py copies them into vfiosim/fuzz_inputs)."""
    build = tmp_path / "build"
    subprocess.run([sys.executable, str(FUZZ.parent / "setup.py"), "-q", "build_py", "--build-lib", str(build)],
                   cwd=FUZZ.parent, check=True, capture_output=True)
    packaged = build / "vfiosim" / "fuzz_inputs"
    for kind in ("corpus", "regressions"):
        inside = sorted(p.relative_to(packaged / kind) for p in (packaged / kind).rglob("*") if p.is_file())
        assert inside == sorted(p.relative_to(FUZZ / kind) for p in (FUZZ / kind).rglob("*") if p.is_file())
    monkeypatch.setattr(fuzz, "REPO_FUZZ", tmp_path / "site-packages" / "fuzz")
    monkeypatch.setattr(fuzz, "PACKAGED_FUZZ", packaged)
    monkeypatch.chdir(tmp_path)
    assert fuzz.corpus_dirs("protocol") == [packaged / "corpus" / "protocol", packaged / "regressions" / "protocol"]


@pytest.mark.parametrize("target", sorted(fuzz.TARGETS))
def test_a_short_random_run_finds_nothing(target, tmp_path, checkout_corpus):
    out = io.StringIO()
    summary = fuzz.random_engine(target, runs=150, seed=7, extra_dirs=[], max_len=1024, crash_dir=tmp_path,
                                 seconds=None, out=out)
    assert summary["inputs"] == 150
    assert summary["crashes"] == 0, out.getvalue()


def test_the_harness_reports_an_escaping_exception(monkeypatch, tmp_path, checkout_corpus):
    """A harness that could not fail would prove nothing: an internal error
    planted in the kernel is found and its input saved."""
    from vfiosim.kernel.vfio.container import VfioContainer

    def broken(self, arg, current):
        raise RuntimeError("planted bug")
    monkeypatch.setattr(VfioContainer, "check_extension", broken)
    out = io.StringIO()
    summary = fuzz.random_engine("ioctl", runs=400, seed=3, extra_dirs=[], max_len=1024, crash_dir=tmp_path,
                                 seconds=None, out=out)
    assert summary["crashes"] > 0 and "planted bug" in out.getvalue()
    assert all(Path(f).exists() for f in summary["crash_files"])
    import conftest                                  # the planted oopses are this test's point
    for m in conftest._machines:
        m.oopses.clear()


# -- what the crashes were ---------------------------------------------------------------------------

def test_a_machine_file_with_a_few_bytes_of_ram_is_refused():
    """Found by the machine-file fuzzer: ``ram = 4`` passed the schema and the
    PowerNV build then failed with an internal KernelError, not a
    MachineFileError."""
    text = (Path(vfiosim.__file__).parent / "presets" / "powernv.toml").read_text()
    bad = text.replace('ram = "4G"', "ram = 4", 1)
    assert bad != text
    with pytest.raises(MachineFileError, match="machine.ram"):
        vfiosim.Machine.from_toml(bad)


def test_a_dma32_window_smaller_than_a_tce_is_refused():
    """Found by the machine-file fuzzer: ``m32_pci_base = 1`` on the 3.10
    profile made the PE's 32-bit table impossible to build (an internal error)."""
    text = (Path(vfiosim.__file__).parent / "presets" / "powernv.toml").read_text()
    bad = text.replace('m32_pci_base = "2G"', "m32_pci_base = 1")
    assert bad != text
    with pytest.raises(MachineFileError, match="m32_pci_base"):
        vfiosim.Machine.from_toml(bad, kernel="3.10")


def test_an_open_whose_fd_cannot_be_installed_leaves_the_group_closed():
    """Found by the protocol fuzzer: OP_OPEN of /dev/vfio/1 with placeholder fd
    -1 opened the group and then failed to install it (EBADF), leaving the
    group open for good: every later open was EBUSY, for every process."""
    m = vfiosim.Machine.default()
    p = m.spawn()
    k = m.kernel
    with pytest.raises(OSError) as exc:
        p._call("open", k.sys_open, "/dev/vfio/1", os.O_RDWR, 0, -1)
    assert exc.value.errno == errno.EBADF
    other = m.spawn()
    fd = other.open("/dev/vfio/1")
    assert fd >= 3
    other.exit()
    p.exit()


def test_dup2_to_an_fd_out_of_range_takes_no_reference():
    """Found by the protocol fuzzer: OP_DUP (dup2) of a group fd to fd
    2147483647 took a reference on the group file and then failed (EBADF):
    the group stayed open after the process exited."""
    m = vfiosim.Machine.default()
    p = m.spawn()
    g = p.open("/dev/vfio/0")
    for newfd in ((1 << 31) - 1, 1024, -1):
        with pytest.raises(OSError) as exc:
            p._call("dup2", m.kernel.sys_dup2, g, newfd)
        assert exc.value.errno == errno.EBADF
    p.exit()
    other = m.spawn()
    assert other.open("/dev/vfio/0") >= 3


def test_an_open_at_a_used_fd_number_releases_what_was_there():
    """Found by the protocol fuzzer: OP_OPEN at an fd number the simulated table
    still used (a close the shim never saw) replaced the file without closing
    it: the group it named stayed open for good."""
    m = vfiosim.Machine.default()
    p = m.spawn()
    k = m.kernel
    g = p.open("/dev/vfio/1")
    assert p._call("open", k.sys_open, "/dev/vfio/vfio", os.O_RDWR, 0, g) == g
    other = m.spawn()
    assert other.open("/dev/vfio/1") >= 3               # group 1 was released
    p.exit()
    other.exit()
    assert not m.oopses
