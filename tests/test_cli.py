"""The `vfiosim` command: demo and topology, in-process and as a real program."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import vfiosim
import vfiosim.demo  # noqa: F401  (imported up front, as any program embedding vfiosim may have done)
from vfiosim.cli import main

SRC = Path(__file__).resolve().parent.parent / "src"

# The demo's steps, in order (the kernel documentation's sPAPR flow plus the edu round trip).
DEMO_STEPS = [
    'open("/dev/vfio/vfio", O_RDWR)',
    "ioctl(VFIO_GET_API_VERSION)",
    "ioctl(VFIO_CHECK_EXTENSION, VFIO_SPAPR_TCE_IOMMU)",
    'open("/dev/vfio/0", O_RDWR)',
    "ioctl(VFIO_GROUP_GET_STATUS)",
    "ioctl(VFIO_GROUP_SET_CONTAINER)",
    "ioctl(VFIO_SET_IOMMU, VFIO_SPAPR_TCE_IOMMU)",
    "ioctl(VFIO_IOMMU_SPAPR_TCE_GET_INFO)",
    "ioctl(VFIO_IOMMU_ENABLE)",
    "mmap(",
    "mmap(",
    "ioctl(VFIO_IOMMU_MAP_DMA, iova",
    "ioctl(VFIO_IOMMU_MAP_DMA, iova",
    "ioctl(VFIO_GROUP_GET_DEVICE_FD",
    "ioctl(VFIO_DEVICE_GET_INFO)",
    "ioctl(VFIO_DEVICE_GET_REGION_INFO, BAR0)",
    "pread(config, 4, 0)",
    "pwrite(config COMMAND |= BUS_MASTER)",
    "pread(BAR0 0x00: identification)",
    "pread(BAR0 0x04: liveness of 0x12345678)",
    "eventfd(0, 0)",
    "ioctl(VFIO_DEVICE_SET_IRQS, MSI -> eventfd)",
    "edu DMA #0",
    "edu DMA #1",
    "edu DMA #2",
    "edu DMA #3",
    "read(eventfd): interrupts delivered",
    "ioctl(VFIO_IOMMU_UNMAP_DMA)",
    "ioctl(VFIO_IOMMU_DISABLE)",
    "close(device)",
    "close(group)",
    "close(container)",
]

STEP_LINE = re.compile(r"^\s+(\d+)\s\s(.*?)\s{2,}(.*?)\s+VmLck\s+(\d+) kB$")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def demo_steps(out: str) -> list[tuple[int, str, str, int]]:
    steps = []
    for line in out.splitlines():
        m = STEP_LINE.match(line)
        if m:
            steps.append((int(m.group(1)), m.group(2), m.group(3), int(m.group(4))))
    return steps


def test_demo_exits_0_and_prints_every_step_and_ok(capsys):
    rc, out, err = run(capsys, "demo")
    assert rc == 0, out + err
    steps = demo_steps(out)
    assert [n for n, *_ in steps] == list(range(1, len(DEMO_STEPS) + 1))
    for (n, label, result, _), expected in zip(steps, DEMO_STEPS):
        assert label.startswith(expected), f"step {n} is {label!r}, expected {expected!r}"
        assert "FAILED" not in result, f"step {n} {label}: {result}"
    assert "the destination buffer equals the source" in out
    assert "OK" in out
    assert "FAILED" not in out
    assert "MISMATCH" not in out
    assert "after exit, 0 pages pinned, VmLck 0 kB" in out


def test_demo_output_goes_to_the_current_sys_stdout():
    # `vfiosim demo` prints to whatever sys.stdout is when it runs, so that a
    # program (or test) that redirects stdout gets the demo's output.
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["demo"])
    assert rc == 0
    assert "ioctl(VFIO_IOMMU_ENABLE)" in buf.getvalue()
    assert "OK" in buf.getvalue()


def test_demo_reports_the_locked_memory_of_enable_and_its_refund(capsys):
    rc, out, _ = run(capsys, "demo")
    assert rc == 0
    vmlck = {label: kb for _, label, _, kb in demo_steps(out)}
    assert vmlck["ioctl(VFIO_GET_API_VERSION)"] == 0
    # tce_iommu_enable() charges the 32-bit window: 2 GiB on powernv9 (m32_pci_base = 2G).
    assert vmlck["ioctl(VFIO_IOMMU_ENABLE)"] == 2 << 20
    assert vmlck["close(container)"] == 0


def test_demo_prints_device_ids_and_the_dma_window(capsys):
    rc, out, _ = run(capsys, "demo")
    assert rc == 0
    assert "vendor 1234 device 11e8" in out
    assert "window 0x0+0x80000000" in out
    assert "0000:01:00.0" in out


@pytest.mark.parametrize("argv", [
    ["demo", "--machine", "pseries"],
    ["demo", "--page-size", "65536"],
    ["demo", "--kernel", "3.10"],
    ["demo", "--machine", "pseries", "--page-size", "65536"],
    ["demo", "--transfers", "1"],
], ids=["pseries", "64K", "3.10", "pseries-64K", "one-transfer"])
def test_demo_variants_exit_0(capsys, argv):
    rc, out, err = run(capsys, *argv)
    assert rc == 0, out + err
    assert "OK" in out
    assert "FAILED" not in out
    assert "after exit, 0 pages pinned" in out


def test_demo_on_pseries_uses_its_device_and_1g_window(capsys):
    rc, out, _ = run(capsys, "demo", "--machine", "pseries")
    assert rc == 0
    assert "0000:00:00.0" in out
    assert "window 0x0+0x40000000" in out


def test_demo_on_64k_pages_says_so(capsys):
    rc, out, _ = run(capsys, "demo", "--page-size", "65536")
    assert rc == 0
    assert "64 KiB pages" in out


def test_demo_with_the_3_10_kernel_says_so(capsys):
    rc, out, _ = run(capsys, "demo", "--kernel", "3.10")
    assert rc == 0
    assert "Linux 3.10 profile" in out


def test_demo_with_a_machine_file(capsys, tmp_path):
    path = tmp_path / "m.toml"
    path.write_text("""\
[machine]
name = "tiny"
description = "tiny test machine"
platform = "powernv"

[[phb]]
index = 0

[[device]]
bdf = "0000:01:00.0"
model = "edu"
phb = 0
iommu_group = 5
""")
    rc, out, err = run(capsys, "demo", "--machine", str(path))
    assert rc == 0, out + err
    assert "tiny test machine" in out
    assert 'open("/dev/vfio/5", O_RDWR)' in out


def test_topology_json_lists_pes_groups_and_devices(capsys):
    rc, out, _ = run(capsys, "topology", "--json")
    assert rc == 0
    topo = json.loads(out)
    assert topo["machine"] == "powernv9"
    assert topo["platform"] == "powernv"
    assert topo["kernel"] == "6.12"
    assert topo["page_size"] == 4096
    assert [(g["id"], g["devices"], g["node"]) for g in topo["iommu_groups"]] == [
        (0, ["0000:01:00.0"], "/dev/vfio/0"), (1, ["0001:01:00.0"], "/dev/vfio/1")]
    assert sorted((pe["iommu_group"], tuple(pe["devices"]), pe["phb"]["index"]) for pe in topo["pes"]) == [
        (0, ("0000:01:00.0",), 0), (1, ("0001:01:00.0",), 1)]
    assert [(d["bdf"], d["model"], d["driver"], d["iommu_group"]) for d in topo["devices"]] == [
        ("0000:01:00.0", "edu", "vfio-pci", 0), ("0001:01:00.0", "edu", "vfio-pci", 1)]
    assert all(d["vendor"] == 0x1234 and d["device"] == 0x11E8 for d in topo["devices"])


@pytest.mark.parametrize("config", ["iommufd", "iommufd-compat", "IOMMUFD"])
def test_demo_on_x86_kernels_with_iommufd(capsys, config):
    """The Type1 flow of the demo, on /dev/vfio/vfio served by VFIO or by
    iommufd's emulation (iommufd-compat)."""
    rc, out, err = run(capsys, "demo", "--machine", "x86", "--kernel-config", config)
    assert rc == 0, out + err
    assert "OK" in out and "after exit, 0 pages pinned" in out


def test_kernel_config_shows_in_the_topology(capsys):
    rc, out, _ = run(capsys, "topology", "--machine", "x86", "--kernel-config", "IOMMUFD,VFIO_DEVICE_CDEV")
    assert rc == 0
    assert "kernel config: CONFIG_VFIO_GROUP=y, CONFIG_VFIO_CONTAINER=y, CONFIG_IOMMUFD=y, " \
           "CONFIG_VFIO_DEVICE_CDEV=y, # CONFIG_IOMMUFD_VFIO_CONTAINER is not set" in out
    assert "nodes: /dev/iommu, /dev/vfio/vfio, /dev/vfio/devices/" in out
    assert "vfio0: 0000:01:00.0, group 4, cdev /dev/vfio/devices/vfio0" in out
    rc, out, _ = run(capsys, "topology", "--machine", "x86")             # Debian's: no iommufd, no cdev
    assert "# CONFIG_IOMMUFD is not set" in out and "nodes: /dev/vfio/vfio\n" in out
    assert "vfio0: 0000:01:00.0, group 4, cdev none" in out
    rc, out, err = run(capsys, "topology", "--machine", "pseries", "--kernel-config", "iommufd")
    assert rc == 2 and "no device cdev on POWER" in err
    rc, out, err = run(capsys, "topology", "--kernel-config", "IOMMUFD=maybe")
    assert rc == 2 and "IOMMUFD is a bool option" in err


def test_topology_shows_iommufd_contexts():
    import iommufdutil
    m = vfiosim.Machine.preset("x86", kernel_config="iommufd")
    p = m.spawn()
    fd, ioas, dfd, devid = iommufdutil.cdev_setup(p)
    iommufdutil.attach(p, dfd, ioas)
    buf = p.mmap(1 << 16)
    iommufdutil.ioas_map(p, fd, ioas, buf, 1 << 16, 0x100000)
    topo = m.topology()
    (ctx,) = topo["iommufd"]
    assert ctx["path"] == "/dev/iommu" and ctx["fds"] == [{"pid": p.pid, "fd": fd}]
    assert ctx["account_mode"] == "user"           # (root's pages are not charged: CAP_IPC_LOCK)
    assert [(o["id"], o["type"]) for o in ctx["objects"]] == [(1, "ioas"), (2, "device"), (3, "hwpt_paging")]
    assert ctx["objects"][0]["areas"] == [{"iova": 0x100000, "length": 1 << 16, "prot": 7, "user_va": buf,
                                          "pinned": True}]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        from vfiosim import cli
        cli._print_iommufd(topo)
    assert f"iommufd /dev/iommu (pid {p.pid} fd {fd}): accounting user" in out.getvalue()
    assert f"IOVA 0x100000+0x10000 <- {buf:#x}, pinned" in out.getvalue()


def test_topology_json_matches_machine_topology(capsys):
    rc, out, _ = run(capsys, "topology", "--json", "--machine", "pseries", "--page-size", "65536")
    assert rc == 0
    expected = vfiosim.Machine.preset("pseries", page_size=65536).topology()
    # JSON turns the integer BAR indexes into strings; compare through JSON.
    assert json.loads(out) == json.loads(json.dumps(expected))


def test_topology_with_a_nonexistent_machine_file_exits_2_naming_it(capsys):
    rc, out, err = run(capsys, "topology", "--machine", "/nonexistent.toml")
    assert rc == 2
    assert "/nonexistent.toml" in err
    assert out == ""


def test_topology_with_a_bad_machine_file_exits_2_naming_file_and_key(capsys, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[machine]\nname = "bad"\nplatform = "vax"\n')
    rc, out, err = run(capsys, "topology", "--machine", str(path))
    assert rc == 2
    assert str(path) in err
    assert "machine.platform" in err
    assert out == ""


def test_topology_pseries_text_lists_both_groups(capsys):
    rc, out, _ = run(capsys, "topology", "--machine", "pseries")
    assert rc == 0
    assert "IOMMU groups" in out
    assert re.search(r"group 0: /dev/vfio/0, viable, devices 0000:00:00\.0", out), out
    assert re.search(r"group 1: /dev/vfio/1, viable, devices 0001:00:00\.0", out), out
    assert "EEH not available" in out


def test_topology_powernv_text_lists_both_groups_and_eeh(capsys):
    rc, out, _ = run(capsys, "topology")
    assert rc == 0
    assert re.search(r"group 0: /dev/vfio/0, viable, devices 0000:01:00\.0", out), out
    assert re.search(r"group 1: /dev/vfio/1, viable, devices 0001:01:00\.0", out), out
    assert "EEH available" in out


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["demo", "--page-size", "8192"],
                                  ["demo", "--kernel", "2.6"]],
                         ids=["no-command", "unknown-command", "bad-page-size", "bad-kernel"])
def test_bad_command_lines_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage: vfiosim" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"vfiosim {vfiosim.__version__}"


def test_kernel_3_10_on_pseries_exits_2_naming_kconfig(capsys):
    rc, out, err = run(capsys, "demo", "--machine", "pseries", "--kernel", "3.10")
    assert rc == 2
    assert "Kconfig" in err


def _installed_command() -> list[str] | None:
    """The console script of the vfiosim under test: beside this Python (a
    virtual environment's bin/, on PATH or not), else on PATH."""
    beside = Path(sys.executable).parent / "vfiosim"
    if beside.exists():
        return [str(beside)]
    exe = shutil.which("vfiosim")
    return [exe] if exe is not None else None


def _src_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


@pytest.mark.parametrize("how", ["script", "python -m vfiosim"])
def test_command_runs_as_a_program(how):
    """The console script if installed (else `python -m vfiosim` from src), and `python -m vfiosim`."""
    env = _src_env()
    cmd = _installed_command() if how == "script" else None
    if cmd is None:
        cmd = [sys.executable, "-m", "vfiosim"]
    topo = subprocess.run(cmd + ["topology", "--json", "--machine", "pseries"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert topo.returncode == 0, topo.stderr
    data = json.loads(topo.stdout)
    assert [g["id"] for g in data["iommu_groups"]] == [0, 1]
    demo = subprocess.run(cmd + ["demo"], env=env, capture_output=True, text=True, timeout=120)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "OK" in demo.stdout
    bad = subprocess.run(cmd + ["topology", "--machine", "/nonexistent.toml"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2
    assert "/nonexistent.toml" in bad.stderr
    assert "Traceback" not in bad.stderr
