"""`vfiosim record` and `vfiosim replay` of iommufd programs: /dev/iommu, the VFIO
device cdev and the iommufd VFIO container (issues 17 and 18).

No kernel here has iommufd (Debian's 6.12 is built without it), so the recorder is
exercised as tests/test_record.py does: `vfiosim record --simulated x86
--kernel-config iommufd` puts the recording shim in front of `vfiosim run`'s, and
its calls reach a simulated kernel with iommufd as they would reach a real one.
The trace's header says the kernel's configuration (`kernel_config`), and the
replay builds the machine with it.  The C programs need <linux/iommufd.h> (6.2+):
they are built against Debian's 6.12 uAPI headers (tests/uapi_headers.py), and the
tests skip with the reason when those cannot be had.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import vfiosim
from runutil import C_DIR, EXAMPLES, cc
from uapi_headers import HeadersUnavailable, find_headers
from vfiosim.tracing import open_trace
from vfiosim.tracing.diff import diff
from vfiosim.tracing.record import library_path
from vfiosim.tracing.replay import machine_for, replay
from vfiosim.transport.run import run

CLI = [sys.executable, "-m", "vfiosim.cli"]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bins(tmp_path_factory):
    out = tmp_path_factory.mktemp("bin")
    built = {"type1": cc(EXAMPLES / "type1_edu_dma.c", out)}
    try:
        flags = find_headers().cflags()
    except HeadersUnavailable as exc:
        pytest.skip(f"no Linux 6.12 uAPI headers for the iommufd programs: {exc}")
    built["example"] = cc(EXAMPLES / "iommufd_edu_dma.c", out, *flags)
    built["families"] = cc(C_DIR / "iommufd_families.c", out, *flags)
    built["pages"] = cc(C_DIR / "iommufd_pages.c", out, *flags)
    built["user"] = cc(C_DIR / "iommufd_user.c", out, *flags)
    return built


def record(tmp_path: Path, machine: str, config: str, *argv: str, name: str = "rec.jsonl") -> tuple[Path, str]:
    out = tmp_path / name
    r = subprocess.run([*CLI, "record", "--simulated", machine, "--kernel-config", config, "-o", str(out), "--",
                        *argv], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return out, r.stdout


def records(path: Path) -> list[dict]:
    with open_trace(path) as t:
        return list(t)


def dirty_tracking_machine(tmp_path: Path) -> Path:
    """The x86 preset with a VT-d unit that tracks dirty pages (QEMU's has none)."""
    text = (ROOT / "src" / "vfiosim" / "presets" / "x86.toml").read_text()
    assert "\n[iommu]\n" in text
    path = tmp_path / "x86-dirty.toml"
    path.write_text(text.replace("\n[iommu]\n", "\n[iommu]\ndirty_tracking = true\n"))
    return path


def test_the_iommufd_example_is_recorded_through_its_cdev_and_replays_step_for_step(bins, tmp_path):
    trace, out = record(tmp_path, "x86", "iommufd", str(bins["example"]), "0000:01:00.0")
    assert "DMA round trip of 4096 bytes: verified" in out
    with open_trace(trace) as t:
        head = t.header
        recs = list(t)
    assert head["kernel_config"] == ["VFIO_GROUP=y", "VFIO_CONTAINER=y", "IOMMUFD=y", "VFIO_DEVICE_CDEV=y",
                                     "IOMMUFD_VFIO_CONTAINER=n"]
    assert [(r["path"], r["fd_kind"]) for r in recs if r["call"] == "open"] == \
        [("/dev/vfio/devices/vfio0", "vfio-device"), ("/dev/iommu", "iommufd")]
    by_cmd = {r["cmd"]: r for r in recs if r["call"] == "ioctl"}
    assert {"VFIO_DEVICE_BIND_IOMMUFD", "IOMMU_IOAS_ALLOC", "VFIO_DEVICE_ATTACH_IOMMUFD_PT", "IOMMU_IOAS_IOVA_RANGES",
            "IOMMU_IOAS_MAP", "VFIO_DEVICE_DETACH_IOMMUFD_PT", "IOMMU_IOAS_UNMAP"} <= set(by_cmd)
    assert by_cmd["VFIO_DEVICE_BIND_IOMMUFD"]["out"] == {"out_devid": 1}
    # The array IOVA_RANGES fills (the recorder reads it after the call), decoded.
    assert by_cmd["IOMMU_IOAS_IOVA_RANGES"]["out"]["iovas"] == [[0, 0xFEDFFFFF], [0xFEF00000, (1 << 39) - 1]]
    assert by_cmd["IOMMU_IOAS_MAP"]["mem"]["user_va"]["vma"][2] == "rw-p"
    assert by_cmd["IOMMU_IOAS_MAP"]["vmpin_kb"] == 1024
    machine, why = machine_for(head)
    assert machine.kernel.config.vfio_device_cdev and "IOMMUFD=y" in why
    with open_trace(trace) as t:
        r = replay(machine, t)
    assert r.steps == len(recs) - 1 and r.matched == r.steps, "\n".join(map(str, r.divergences))
    assert r.families["iommufd"].steps == 4 and r.families["device cdev"].steps == 3
    # Debian's configuration has none of it: the replay says so, call by call.
    with open_trace(trace) as t:
        debian = replay(vfiosim.Machine.preset("x86"), t)
    assert any(d.what == "result" and d.got == "-1 ENOENT" for d in debian.divergences)     # open(/dev/iommu)


def test_the_recording_says_what_the_daemon_saw_for_iommufd_calls(bins, tmp_path):
    """The shim knows the iommufd ioctls' kinds, sizes and buffers, not their fields:
    decoded by the reader, its bytes give what the daemon's own --trace of the very
    same calls says (which keeps the arguments, not the buffers they point to)."""
    machine = vfiosim.Machine.preset("x86", kernel_config="iommufd")
    rec, daemon = tmp_path / "rec.jsonl", tmp_path / "daemon.jsonl"
    env = {"VFIOSIM_RECORD": str(rec), "VFIOSIM_RECORD_SCENARIO": "families", "VFIOSIM_RECORD_PLATFORM": "x86",
           "VFIOSIM_RECORD_SOURCE": "simulator"}
    status = run(machine, [str(bins["families"]), "0000:01:00.0", "0000:02:00.0"], trace=str(daemon),
                 env_extra=env, preload_first=[library_path()])
    assert status == 0
    with open_trace(rec) as a, open_trace(daemon) as b:
        d = diff(a, b)
    assert d.identical, "\n".join(map(str, d.divergences))
    assert d.steps > 80


def test_every_iommufd_ioctl_and_its_error_paths_replay_step_for_step(bins, tmp_path):
    """iommufd_families.c: every /dev/iommu ioctl and the cdev's, most of them
    failing (bad sizes, flags, ids and pointers, busy objects), a group given an
    iommufd, a hot reset by device id; on a VT-d unit with dirty tracking, so that
    the dirty bitmap is read too."""
    machine_file = dirty_tracking_machine(tmp_path)
    trace, out = record(tmp_path, str(machine_file), "iommufd", str(bins["families"]), "0000:01:00.0",
                        "0000:02:00.0")
    assert "get_dirty_bitmap_on 0 0" in out and "bind_fault -1 14" in out
    recs = records(trace)
    from vfiosim.uapi import iommufd as iu
    cmds = {r["cmd"] for r in recs if r["call"] == "ioctl"}
    assert set(iu.IOCTLS) <= cmds
    failed = [r for r in recs if r.get("errno")]
    assert len(failed) > 35
    # What the argument pointed to: read after the call where the kernel wrote it,
    # before it where the kernel read it; a fault where there was no memory.
    by = {}
    for r in recs:
        if r["call"] == "ioctl":
            by.setdefault(r["cmd"], []).append(r)
    allow = by["IOMMU_IOAS_ALLOW_IOVAS"]
    assert allow[0]["args"]["iovas"] == [[0x100000, 0x1FFFFFFF]] and allow[0]["mem"]["allowed_iovas"]["vma"][2] == "r--p"
    ranges = by["IOMMU_IOAS_IOVA_RANGES"]
    assert [r["err"] for r in ranges] == ["EMSGSIZE", "", "EFAULT", "ENOENT", "EMSGSIZE", ""]
    assert ranges[2]["mem"]["allowed_iovas"]["vma"][2] == "---p"
    assert ranges[4]["out"]["iovas"] == [[0, 0xFEDFFFFF]] and ranges[4]["out"]["num_iovas"] == 2
    assert "iovas" not in ranges[3]["out"]              # a failed call wrote nothing
    hw = by["IOMMU_GET_HW_INFO"][0]["out"]
    assert hw["out_data_type"] == iu.IOMMU_HW_INFO_TYPE_INTEL_VTD and hw["out_capabilities"] == 1
    assert hw["hw_info"]["flags"] == iu.IOMMU_HW_INFO_VTD_ERRATA_772415_SPR17
    dirty = [r for r in by["IOMMU_HWPT_GET_DIRTY_BITMAP"] if not r["errno"]]
    assert dirty and dirty[0]["out"]["bitmap_head"] == ["0x0"] * 4
    assert by["IOMMU_HWPT_ALLOC"][-1]["args"]["data_in"] == "0000000000000000" "0010000000000000" "3000000000000000"
    reset = by["VFIO_DEVICE_GET_PCI_HOT_RESET_INFO"][-1]["out"]
    assert reset["devices"] == [[1, 0, 1, 0]]            # devid 1, not a group number
    with open_trace(trace) as t:
        r = replay(vfiosim.Machine.load(str(machine_file), kernel_config="iommufd"), t)
    assert r.matched == r.steps == len(recs) - 1, "\n".join(map(str, r.divergences))
    # The same program on QEMU's VT-d, which has no dirty tracking: exactly that differs.
    with open_trace(trace) as t:
        other = replay(vfiosim.Machine.preset("x86", kernel_config="iommufd"), t)
    whats = {d.what for d in other.divergences}
    assert {"out.out_capabilities", "out.hw_info", "result"} <= whats
    assert all(d.seq >= by["IOMMU_GET_HW_INFO"][0]["seq"] for d in other.divergences)


def test_the_iommufd_vfio_container_is_recorded_and_replayed_on_its_configuration(bins, tmp_path):
    """A Type1 program on /dev/vfio/vfio served by iommufd (IOMMUFD_VFIO_CONTAINER):
    the header says so, and the replay needs it -- VFIO's own Type1 answers GET_INFO
    otherwise."""
    trace, out = record(tmp_path, "x86", "iommufd-compat", str(bins["type1"]))
    assert "verified" in out
    with open_trace(trace) as t:
        head = t.header
        assert "IOMMUFD_VFIO_CONTAINER=y" in head["kernel_config"] and "VFIO_CONTAINER=n" in head["kernel_config"]
        r = replay(machine_for(head)[0], t)
    assert r.matched == r.steps > 20, "\n".join(map(str, r.divergences))
    with open_trace(trace) as t:
        vfio = replay(vfiosim.Machine.preset("x86"), t)
    assert any(d.what == "out.iova_pgsizes" for d in vfio.divergences)
    # vfiosim replay picks the configuration from the header, and can be told otherwise.
    cli = subprocess.run([*CLI, "replay", str(trace)], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0 and "IOMMUFD_VFIO_CONTAINER=y" in cli.stdout, cli.stdout + cli.stderr
    cli = subprocess.run([*CLI, "replay", str(trace), "--kernel-config", "VFIO_CONTAINER=y"], capture_output=True,
                         text=True, timeout=120)
    assert cli.returncode == 1 and "kernel configuration: VFIO_CONTAINER=n in the trace, VFIO_CONTAINER=y here" \
        in cli.stdout


def test_trace_summary_condenses_ioas_map_and_unmap_runs(bins, tmp_path):
    trace, out = record(tmp_path, "x86", "iommufd", str(bins["pages"]), "/dev/vfio/devices/vfio0", "64")
    summary = subprocess.run([*CLI, "trace", "summary", str(trace)], capture_output=True, text=True, timeout=60)
    assert summary.returncode == 0, summary.stderr
    text = summary.stdout
    assert "64 x IOMMU_IOAS_MAP of one 4 KiB page each, iova 0x100000..0x140000" in text
    assert "64 x IOMMU_IOAS_UNMAP of one 4 KiB page each, iova 0x100000..0x140000" in text
    assert "64 maps, 64 unmaps" in text and "IOAS_MAP: 64 calls, 0x40000 bytes" in text
    assert len(text.splitlines()) < 30


def test_record_refuses_a_kernel_configuration_for_a_real_kernel(tmp_path):
    r = subprocess.run([*CLI, "record", "--kernel-config", "iommufd", "-o", str(tmp_path / "x.jsonl"), "--", "true"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--simulated" in r.stderr
    r = subprocess.run([*CLI, "record", "--simulated", "pseries", "--kernel-config", "iommufd", "-o",
                        str(tmp_path / "x.jsonl"), "--", "true"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no device cdev on POWER" in r.stderr
    assert not (tmp_path / "x.jsonl").exists()


def test_a_trace_header_without_kernel_config_is_debians_build():
    """Traces recorded before the field, and other tools' traces, have no kernel_config:
    Debian's build.  A configuration vfiosim cannot build for the platform is refused
    with the reason, and the replay goes on with Debian's."""
    path = ROOT / "tests" / "data" / "conformance" / "x86" / "type1_edu_dma.jsonl"
    head = json.loads(path.read_text().splitlines()[0])
    assert "IOMMUFD=n" in head["kernel_config"]              # a real Debian kernel says so itself
    del head["kernel_config"]
    machine, why = machine_for(head)
    assert not machine.kernel.config.iommufd and why == "x86 (the preset of the trace's platform)"
    head["kernel_config"] = ["IOMMUFD=y", "VFIO_DEVICE_CDEV=y"]
    machine, why = machine_for(head, machine="pseries")      # a configuration POWER cannot have
    assert not machine.kernel.config.iommufd and "cannot build" in why and "no device cdev on POWER" in why


@pytest.mark.parametrize("config", [None, "iommufd"])
def test_without_a_kernel_config_file_the_shim_reads_the_configuration_off_dev_and_sysfs(bins, tmp_path, config):
    """On a real kernel the header's kernel_config comes from /boot/config-RELEASE, or,
    without one, from what /dev and sysfs show: /dev/iommu, /dev/vfio/devices, a
    vfio-dev device with a dev_t, the IOMMU driver modules.  `vfiosim run`'s fake tree
    shows a simulated kernel's the same way.  (It lists vfio_iommu_type1 whatever
    the configuration, so the IOMMUFD_VFIO_CONTAINER case is not tried here.)"""
    import os
    if os.path.exists(f"/boot/config-{os.uname().release}"):
        pytest.skip("this host has a kernel config file: the shim would read the host's")
    machine = vfiosim.Machine.preset("x86", kernel_config=config)
    out = tmp_path / "rec.jsonl"
    env = {"VFIOSIM_RECORD": str(out), "VFIOSIM_RECORD_PLATFORM": "x86", "VFIOSIM_RECORD_SOURCE": "simulator"}
    program = [str(bins["example"]), "0000:01:00.0"] if config else [str(bins["type1"])]
    assert run(machine, program, env_extra=env, preload_first=[library_path()]) == 0
    with open_trace(out) as t:
        head = t.header
    from vfiosim.tracing.format import kernel_config_items
    assert head["kernel_config"] == kernel_config_items(machine.kernel.config)
    assert head["kernel_config_from"].startswith("/dev and sysfs")


def test_a_user_given_the_nodes_by_chown_is_recorded_and_replayed_with_them(bins, tmp_path):
    """iommufd_user.c: root chowns /dev/iommu and the cdev to uid 1000, sets
    RLIMIT_MEMLOCK to 1 MiB and drops to 1000.  The recorder writes the chowns (and
    the credentials after the drop), and the replay performs them: without them the
    user could not open the nodes (EACCES).  Per-user accounting: no VmLck, VmPin to
    the limit, ENOMEM one page past it."""
    if os.geteuid() != 0:
        pytest.skip("giving a node to another uid and dropping to it needs root")
    trace, out = record(tmp_path, "x86", "iommufd", str(bins["user"]), "1000", "0x100000", "iommufd",
                        "/dev/vfio/devices/vfio0")
    recs = records(trace)
    assert [(r["path"], r["uid"], r["gid"], r["ret"]) for r in recs if r["call"] == "chown"] == \
        [("/dev/iommu", 1000, 1000, 0), ("/dev/vfio/devices/vfio0", 1000, 1000, 0)]
    assert [r["now"]["euid"] for r in recs if r["call"] == "setuid"] == [1000]
    maps = [(r["err"], r["vmlck_kb"], r["vmpin_kb"]) for r in recs if r.get("cmd") == "IOMMU_IOAS_MAP"]
    assert maps == [("", 0, 16), ("", 0, 1024), ("ENOMEM", 0, 1024)]
    with open_trace(trace) as t:
        machine, _ = machine_for(t.header)
        r = replay(machine, t)
    assert r.matched == r.steps == len(recs) - 1, "\n".join(map(str, r.divergences))

    without = tmp_path / "without-chown.jsonl"
    without.write_text("".join(line for line in trace.read_text().splitlines(True) if '"call": "chown"' not in line))
    with open_trace(without) as t:
        machine, _ = machine_for(t.header)
        r = replay(machine, t)
    assert any(d.what == "result" and d.got == "-1 EACCES" for d in r.divergences)
