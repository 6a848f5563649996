"""DMA into a program's shared memory file through the daemon's own mapping of
it (transport/host.py's SharedFiles): the same results as through
/proc/<pid>/mem, the pinned file page reached after a remap, fallbacks, and
nothing left behind."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

import vfiosim
from vfiosim.transport.host import HostMM
from runutil import ThreadedDaemon

PROGRAM = Path(__file__).resolve().parent / "data" / "edu_shared_memory.py"
MACHINES = {"type1": "x86", "spapr2": "powernv"}


@pytest.fixture(params=sorted(MACHINES))
def iommu(request):
    return request.param


@pytest.fixture
def served(iommu, tmp_path):
    d = ThreadedDaemon(vfiosim.Machine.preset(MACHINES[iommu]), tmp_path)
    yield d
    d.close()


def files_of(d: ThreadedDaemon, pid: int):
    st = d.daemon.states[pid]
    assert isinstance(st.task.mm, HostMM)
    return st.task.mm.files


def daemon_maps_file(name: str) -> bool:
    """The daemon (this process) maps a memfd called ``name``."""
    return f"/memfd:{name}" in Path("/proc/self/maps").read_text()


def start(d: ThreadedDaemon, iommu: str, kind: str, *extra: str):
    proc = d.popen([sys.executable, str(PROGRAM), iommu, kind, *extra], stdin=-1)
    line = proc.stdout.readline()
    assert line == "round trip ok\n", (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc


def step(proc, expect_lines: int = 1) -> list[str]:
    proc.stdin.write("\n")
    proc.stdin.flush()
    return [proc.stdout.readline().strip() for _ in range(expect_lines)]


def finish(proc) -> None:
    proc.stdin.write("\n")
    proc.stdin.flush()
    assert proc.wait(30) == 0, proc.stderr.read()


@pytest.mark.parametrize("kind", ["memfd", "memfd-closed", "anon"])
def test_edu_dma_gives_the_same_bytes_with_and_without_the_daemons_mapping(served, iommu, kind):
    """The round trip (a page the CPU wrote, read by the device; the device's
    write across a page boundary) through the mapping (memfd) and through
    /proc/<pid>/mem (its fd closed: the daemon cannot have it; anonymous)."""
    proc = start(served, iommu, kind)
    files = files_of(served, proc.pid)
    if kind == "memfd":
        assert files.count() == 1 and files.bound == 256 and files.mapped == 1 << 20
        assert daemon_maps_file("edu-dma")
    else:
        assert files.count() == 0 and not daemon_maps_file("edu-dma")
    assert len(files.refused) == (kind == "memfd-closed")    # looked for once, not found; anon: not looked for
    assert step(proc) == ["unmapped"]
    if iommu == "type1":            # sPAPR v2: the registration still pins the pages
        assert files.count() == 0 and files.bound == 0 and files.mapped == 0
        assert not daemon_maps_file("edu-dma")
    finish(proc)
    assert served.wait_idle()
    assert not daemon_maps_file("edu-dma")


def test_dma_after_a_remap_reaches_the_pinned_file_page(served, iommu):
    """On Linux the IOMMU maps the page that was pinned: after the program
    maps something else at the address, the device's write lands in the
    file, not in the new mapping."""
    proc = start(served, iommu, "memfd", "remap")
    assert step(proc, 2) == ["new mapping zeros", "file page pattern"]
    assert step(proc) == ["unmapped"]
    finish(proc)
    assert served.wait_idle()
    assert not daemon_maps_file("edu-dma")


def test_without_the_file_a_remap_is_reached_through_the_address(served, iommu):
    """Private memory keeps today's path: DMA by address (docs/deviations.md)."""
    proc = start(served, iommu, "anon", "remap")
    assert step(proc, 1) == ["new mapping pattern"]
    assert step(proc) == ["unmapped"]
    finish(proc)


def test_a_file_truncated_under_dma_does_not_bring_the_daemon_down(served, iommu):
    """Past the end of the file the daemon's mapping would raise SIGBUS: its
    handler puts a private zero page there, so the device reads zeros (page
    0) and its writes reach nobody (page 8), and the daemon serves on.  Linux
    reaches the truncated, still pinned, pages instead, which the program no
    longer sees either; once the file grows back, a page the daemon had not
    touched meanwhile (9) is the file's new page, where Linux still reaches
    the old one (docs/deviations.md)."""
    proc = start(served, iommu, "memfd", "truncate")
    assert step(proc) == ["after truncate zeros zeros"]
    assert step(proc) == ["unmapped"]
    finish(proc)
    assert served.wait_idle()
    assert not daemon_maps_file("edu-dma")
    again = start(served, iommu, "memfd")
    assert step(again) == ["unmapped"]
    finish(again)


def test_a_killed_program_leaves_no_mapping(served, iommu):
    proc = start(served, iommu, "memfd")
    assert daemon_maps_file("edu-dma")
    proc.kill()
    proc.wait(30)
    assert served.wait_idle()
    assert not daemon_maps_file("edu-dma")


def test_exec_releases_the_mapping(served, iommu):
    proc = start(served, iommu, "memfd", "exec")
    assert daemon_maps_file("edu-dma")
    assert step(proc) == ["execd"]
    # The daemon takes the lost connection of a live process for an exec()
    # after EXEC_GRACE; the pins stay (orphaned: DMA there reads zeros).
    end = time.monotonic() + 10
    while daemon_maps_file("edu-dma") and time.monotonic() < end:
        time.sleep(0.05)
    assert not daemon_maps_file("edu-dma")
    finish(proc)
    assert served.wait_idle()


def test_a_fork_childs_exit_leaves_the_parents_mapping(served, iommu):
    """The mapping belongs to the image that pinned, not to a child."""
    code = f"""
import os, runpy, sys
sys.argv = [{str(PROGRAM)!r}, {iommu!r}, "memfd"]
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(r)
    os.read(0, 1)                     # the parent's round trip is done
    os._exit(0)
try:
    runpy.run_path(sys.argv[0])
except SystemExit:
    pass
"""
    proc = served.popen([sys.executable, "-c", code], stdin=-1)
    assert proc.stdout.readline() == "round trip ok\n", proc.stderr.read()
    assert daemon_maps_file("edu-dma")
    proc.stdin.write("x")            # the child exits
    proc.stdin.flush()
    time.sleep(0.5)
    assert daemon_maps_file("edu-dma") and files_of(served, proc.pid).count() == 1
    proc.kill()
    proc.wait(30)
