"""`vfiosim run` under crashes and hostile users.

* A program SIGKILLed at random points of a VFIO workload (containers,
  groups, device fds, DMA mappings, an eventfd for INTx, a forked child)
  leaves nothing behind on the machine: no task, no pin, no locked memory,
  no open group, no IOMMU domain.
* SIGKILL of ``vfiosim run`` (or ``serve``) itself: its programs get EIO at
  their next call instead of hanging, and nothing of it stays on the host:
  no fake sysfs tree or socket in the temporary directory, nothing in
  /dev/shm.
* Permissions are the machine file's: a program that dropped root is
  refused a root-only group (EACCES) and may open one the file gives it.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import vfiosim
from runutil import C_DIR, ThreadedDaemon, cc

CLI = [sys.executable, "-m", "vfiosim.cli"]


@pytest.fixture(scope="module")
def churn(tmp_path_factory):
    return cc(C_DIR / "churn.c", tmp_path_factory.mktemp("bin"))


def machine_is_clean(m: vfiosim.Machine) -> None:
    k = m.kernel
    assert not k.tasks, sorted(k.tasks)
    assert m.pinned_pages() == 0
    for g in k.vfio.groups.values():
        assert g.opened_file is None and g.container is None, g.id
        assert not g.iommu_group.dma_owner_claimed()
    assert all(d.kind != "paging" for unit in m.iommu_units for d in unit.domains)
    assert not m.oopses, m.oopses[0]


@pytest.mark.parametrize("platform,iommu,group", [("pseries", "spapr", "0"), ("x86", "type1", "4")])
def test_a_program_killed_at_random_points_leaves_nothing_behind(churn, tmp_path, platform, iommu, group):
    m = vfiosim.Machine.preset(platform)
    bdf = m.iommu_groups()[int(group)][0]
    d = ThreadedDaemon(m, tmp_path)
    rng = random.Random(f"{platform}-kill")
    busiest = 0
    try:
        for attempt in range(5):
            proc = d.popen([str(churn), iommu, group, bdf])
            rounds = rng.randint(1, 6)
            # Wait for some rounds, then kill it in the middle of whatever it does.
            for _ in range(rounds):
                line = proc.stdout.readline()
                assert line.startswith("round"), line + proc.stderr.read()
                busiest = max(busiest, m.pinned_pages())
            time.sleep(rng.uniform(0, 0.02))
            proc.kill()
            proc.wait(10)
            assert d.wait_idle(), f"attempt {attempt}: the daemon still has tasks"
            machine_is_clean(m)
        assert busiest >= 8 * 16, "the workload never had its DMA mappings in place"
    finally:
        d.close()


def _tmp_state(tmp: Path) -> set[str]:
    return {p.name for p in tmp.iterdir()}


def _shm() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except OSError:
        return set()


@pytest.mark.parametrize("mode", ["run", "serve"])
def test_sigkill_of_vfiosim_gives_programs_eio_and_leaves_nothing_on_the_host(tmp_path, mode):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp))
    shm_before = _shm()
    program = r"""
import errno, fcntl, os, sys, time
c = os.open("/dev/vfio/vfio", os.O_RDWR)
print("ready", flush=True)
sys.stdin.readline()
t0 = time.monotonic()
try:
    fcntl.ioctl(c, 0x3B64)                    # VFIO_GET_API_VERSION
    print("ioctl=ok", flush=True)
except OSError as e:
    print(f"ioctl={errno.errorcode[e.errno]} after={time.monotonic() - t0:.1f}", flush=True)
"""
    if mode == "run":
        vfiosim_proc = subprocess.Popen([*CLI, "run", "--", sys.executable, "-c", program], env=env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        prog_io = vfiosim_proc
    else:
        sock = str(tmp_path / "m.sock")
        vfiosim_proc = subprocess.Popen([*CLI, "serve", "--socket", sock], env=env, stdout=subprocess.PIPE,
                                        text=True)
        assert "serving" in vfiosim_proc.stdout.readline()
        prog_io = subprocess.Popen([*CLI, "run", "--connect", sock, "--", sys.executable, "-c", program], env=env,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert prog_io.stdout.readline() == "ready\n"
        assert any(name.startswith("vfiosim-root-") for name in _tmp_state(tmp))
        vfiosim_proc.kill()                                  # SIGKILL: no finally, no atexit
        vfiosim_proc.wait(10)
        prog_io.stdin.write("go\n")
        prog_io.stdin.flush()
        out = prog_io.stdout.readline()
        assert out.startswith("ioctl=EIO"), out
        # The reaper cleans up after the dead daemon.
        deadline = time.monotonic() + 10
        while _tmp_state(tmp) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _tmp_state(tmp) == set(), _tmp_state(tmp)
        if mode == "serve":
            assert not os.path.exists(tmp_path / "m.sock")
        assert _shm() - shm_before == set()
    finally:
        for p in (vfiosim_proc, prog_io):
            if p.poll() is None:
                p.kill()
            p.wait(10)


def test_a_normal_end_also_leaves_nothing(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp))
    proc = subprocess.run([*CLI, "run", "--", sys.executable, "-c", "import os; os.open('/dev/vfio/vfio', 2)"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    deadline = time.monotonic() + 10
    while _tmp_state(tmp) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _tmp_state(tmp) == set()


DROP_AND_OPEN = r"""
import errno, os, sys
c = os.open("/dev/vfio/vfio", os.O_RDWR)        # connects to the daemon while still root
os.setgroups([])
os.setresgid(65534, 65534, 65534)
os.setresuid(65534, 65534, 65534)
for path in sys.argv[1:]:
    try:
        os.close(os.open(path, os.O_RDWR))
        print(f"{path}=ok")
    except OSError as e:
        print(f"{path}={errno.errorcode[e.errno]}")
"""


def test_permissions_of_dev_vfio_are_the_machine_files_under_run(tmp_path):
    """A program that drops root (as a VMM launched by a privileged helper
    does): the simulated kernel checks each later open against the node's
    owner and mode from the machine file, with the program's new credentials."""
    if os.geteuid() != 0:
        pytest.skip("needs root to start a program that drops to another uid")
    text = (Path(vfiosim.__file__).parent / "presets" / "pseries.toml").read_text()
    # Group 1 belongs to uid 65534; group 0 stays root's (mode 0600).
    marker = 'bdf = "0001:00:00.0"'
    assert marker in text
    f = tmp_path / "m.toml"
    f.write_text(text.replace(marker, marker + "\ngroup_uid = 65534", 1))
    proc = subprocess.run([*CLI, "run", "--machine", str(f), "--", sys.executable, "-c", DROP_AND_OPEN,
                           "/dev/vfio/0", "/dev/vfio/1", "/dev/vfio/vfio"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["/dev/vfio/0=EACCES", "/dev/vfio/1=ok", "/dev/vfio/vfio=ok"], proc.stdout


CHOWN_THEN_DROP = r"""
import errno, json, os, stat, sys
out = {}
os.chown("/dev/vfio/1", 65534, 65534)                 # as QEMU -runas and libvirt do before dropping root
os.chmod("/dev/vfio/1", 0o660)
st = os.stat("/dev/vfio/1")
out["owner"] = [st.st_uid, st.st_gid, oct(stat.S_IMODE(st.st_mode)), stat.S_ISCHR(st.st_mode)]
c = os.open("/dev/vfio/vfio", os.O_RDWR)             # connects while still root
os.setgroups([])
os.setresgid(65534, 65534, 65534)
os.setresuid(65534, 65534, 65534)
def attempt(fn, *args):
    try:
        r = fn(*args)
        return "ok" if r is None or isinstance(r, int) else r
    except OSError as e:
        return errno.errorcode[e.errno]
out["tree"] = len(os.listdir("/sys/bus/pci/devices")) > 0 and open("/sys/bus/pci/devices/0001:00:00.0/vendor").read().strip()
out["groups"] = sorted(os.listdir("/sys/kernel/iommu_groups"))
g = os.open("/dev/vfio/1", os.O_RDWR)
fst = os.fstat(g)
out["fstat"] = [fst.st_uid, oct(stat.S_IMODE(fst.st_mode))]
out["open0"] = attempt(os.open, "/dev/vfio/0", os.O_RDWR)
out["chown0"] = attempt(os.chown, "/dev/vfio/0", 65534, -1)
out["chmod1"] = attempt(os.chmod, "/dev/vfio/1", 0o600)
out["fchmod1"] = attempt(os.fchmod, g, 0o640)
out["chown1_to_root"] = attempt(os.chown, "/dev/vfio/1", 0, -1)
out["mode1"] = oct(stat.S_IMODE(os.stat("/dev/vfio/1").st_mode))
print(json.dumps(out))
"""


def test_chown_and_chmod_of_dev_vfio_nodes_work_as_on_linux_and_the_tree_stays_readable(tmp_path):
    """A privileged launcher chowns a group node to the user it then drops to
    (QEMU's -runas, libvirt): the simulated kernel enforces the new owner, the
    node shows it, and the fake sysfs tree stays readable after the drop."""
    if os.geteuid() != 0:
        pytest.skip("needs root to start a program that drops to another uid")
    proc = subprocess.run([*CLI, "run", "--machine", "pseries", "--", sys.executable, "-c", CHOWN_THEN_DROP],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    import json
    out = json.loads(proc.stdout)
    assert out["owner"] == [65534, 65534, "0o660", True]
    assert out["tree"] == "0x1234" and out["groups"] == ["0", "1"]
    assert out["fstat"] == [65534, "0o660"]
    assert out["open0"] == "EACCES"                  # root's group, mode 0600
    assert out["chown0"] == "EPERM"                  # only CAP_CHOWN gives a node away
    assert out["chmod1"] == "ok" and out["fchmod1"] == "ok"     # the owner may chmod
    assert out["chown1_to_root"] == "EPERM"
    assert out["mode1"] == "0o640"


def test_closing_the_daemon_wakes_a_sleeping_serving_thread(tmp_path, monkeypatch):
    """close() ends each connection by waking its serving thread on the word it
    sleeps on (wake_seq), not by waiting for the thread's idle wake-up: with
    that made ten minutes long, every serving thread is gone once close()
    returns (it joins them for 5 s)."""
    from vfiosim.transport import daemon as D
    monkeypatch.setattr(D, "WAIT_MS", 600_000)
    d = ThreadedDaemon(vfiosim.Machine.preset("pseries"), tmp_path)
    # A shell that opens the container through the shim, then blocks on stdin.
    proc = d.popen(["sh", "-c", "exec 3</dev/vfio/vfio && echo opened && read x"], stdin=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == "opened", proc.stderr.read()
        end = time.monotonic() + 10
        while not any(s.thread is not None and s.channel is not None for s in d.daemon.sessions):
            assert time.monotonic() < end, "the shell's connection never got its channel"
            time.sleep(0.02)
        time.sleep(0.2)                         # its serving thread goes to sleep, after spinning
        threads = [s.thread for s in d.daemon.sessions if s.thread is not None]
        d.close()
        assert threads and not any(t.is_alive() for t in threads)
    finally:
        proc.kill()
        proc.wait()
