"""vfiosim against real Linux VFIO: the conformance traces (docs/conformance.md).

tests/data/conformance/<platform>/*.jsonl were recorded by `vfiosim qemu-record`:
the project's scenario programs run under the recording shim in QEMU guests whose
Linux 6.12 drives QEMU's emulated edu devices through its own VFIO (pseries: the sPAPR
TCE driver over the hypervisor's tables; powernv9: the same driver over Linux's own
PHB4 IODA2 tables, with EEH; x86 q35: Type1 over an emulated VT-d; x86-iommufd: the
same q35 guest booting Debian's 6.12 source built with iommufd, /dev/iommu and the
VFIO device cdev, which Debian's own build leaves out).  Every CI run
replays them on the matching simulated machine: every step must answer as the real
kernel did, and docs/conformance.md's table must be what the replay counts.
Re-recording them needs the guests: `python3 -m pytest -m qemu_record` (left out of
the default run).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import vfiosim
from vfiosim.qemu.record import PLATFORMS, conformance, record_platform, traces_in
from vfiosim.qemu import QemuDemoUnavailable
from vfiosim.tracing import open_trace
from vfiosim.tracing.replay import replay

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data" / "conformance"          # this checkout's, whether vfiosim is installed or not


@pytest.fixture(scope="module")
def result():
    return conformance(traces_in(DATA))


def test_the_traces_are_real_kernels_on_the_machines_of_the_presets():
    found = traces_in(DATA)
    assert set(found) == {"pseries", "powernv", "x86", "x86-iommufd", "x86-iommufd-compat"}
    for platform, paths in found.items():
        assert {p.stem for p in paths} == {s.name for s in PLATFORMS[platform].scenarios}
        for path in paths:
            with open_trace(path) as t:
                h = t.header
            assert h["source"] == "kernel" and h["recorder"].startswith("vfiosim record")
            assert h["system"]["kernel"].startswith("6.12") and h["system"]["platform"] == PLATFORMS[platform].machine
            assert "vfio_pci" in h["iommu"]["modules"]
            if platform == "x86-iommufd":
                # Built from Debian's source with iommufd and the cdev, VFIO's own container kept.
                assert h["system"]["kernel"] == "6.12.118" and "iommufd" in h["iommu"]["modules"]
                assert h["kernel_config"] == ["VFIO_GROUP=y", "VFIO_CONTAINER=y", "IOMMUFD=y",
                                              "VFIO_DEVICE_CDEV=y", "IOMMUFD_VFIO_CONTAINER=n"]
            elif platform == "x86-iommufd-compat":
                # ... and with iommufd's container instead of VFIO's (no vfio_iommu_type1).
                assert h["system"]["kernel"] == "6.12.118" and "vfio_iommu_type1" not in h["iommu"]["modules"]
                assert h["kernel_config"] == ["VFIO_GROUP=y", "VFIO_CONTAINER=n", "IOMMUFD=y",
                                              "VFIO_DEVICE_CDEV=y", "IOMMUFD_VFIO_CONTAINER=y"]
            else:
                # Debian's build, read from the kernel's own .config: no iommufd.
                assert h["kernel_config"] == ["VFIO_GROUP=y", "VFIO_CONTAINER=y", "IOMMUFD=n", "VFIO_DEVICE_CDEV=n",
                                              "IOMMUFD_VFIO_CONTAINER=n"]
            assert h["kernel_config_from"] == f"/boot/config-{h['system']['kernel']}"
            edus = {d["bdf"]: d["iommu_group"] for d in h["devices"] if d["device"] == "0x11e8"}
            if platform == "pseries":
                assert edus == {"0000:00:00.0": 0, "0001:00:00.0": 1}
                assert {(w["start"], w["size"], w["iommu_group"]) for w in h["windows"]} == \
                    {(0, 1 << 30, 0), (0, 1 << 30, 1)}
            elif platform == "powernv":
                assert edus == {"0000:01:00.0": 0, "0001:01:00.0": 1}      # behind the PHB4s' root ports
                assert h["windows"] == []                  # no ibm,dma-window: Linux makes its own tables
                assert {u["name"] for u in h["iommu"]["units"]} >= {"iommu-phb0000", "iommu-phb0001"}
            else:
                assert edus == {"0000:01:00.0": 4, "0000:02:00.0": 5}
                assert h["iommu"]["units"][0]["address_width"] == 39


def test_every_step_recorded_on_real_kernels_replays_as_recorded(result):
    for platform in ("pseries", "powernv", "x86", "x86-iommufd", "x86-iommufd-compat"):
        kernel = [f"[{s}] {d}" for s, d in result.divergences[platform] if d.label == "kernel"]
        assert not kernel, "\n".join(kernel)
        assert result.labels[platform]["environment"] == 0
        matched, total = result.totals[platform]
        assert matched == total > 350
    cells = result.cells
    # Every family the scenarios exercise is there, with enough steps to mean something.
    for platform in ("pseries", "powernv"):
        for fam in ("container", "group", "IOMMU (sPAPR)", "EEH", "device info", "region access", "interrupts",
                    "ioeventfd", "device features", "reset"):
            assert cells[platform][fam][1] >= 8, (platform, fam)
    for fam in ("container", "group", "IOMMU (Type1)", "device info", "region access", "interrupts",
                "ioeventfd", "device features", "reset"):
        assert cells["x86"][fam][1] >= 8, fam
        for built in ("x86-iommufd", "x86-iommufd-compat"):
            assert cells[built][fam][1] >= 8, (built, fam)
    for built in ("x86-iommufd", "x86-iommufd-compat"):
        assert cells[built]["iommufd"][1] > 150 and cells[built]["device cdev"][1] >= 20
    assert all(cells[p]["process"][1] >= 7 for p in cells)      # forks, an exec, limits, credentials


def test_what_differs_is_the_device_model_and_the_firmware(result):
    """The comparison is not vacuous: QEMU's edu is big-endian in a pseries guest and
    answers 1- and 2-byte reads with 0; SLOF and SeaBIOS leave their mark in config
    space.  Each is labelled, with its reason (docs/conformance.md)."""
    machine = {p: [d for _, d in result.divergences[p] if d.label == "machine"] for p in result.divergences}
    assert any(d.expected == "010000ed" and d.got == "ed000001" for d in machine["pseries"])
    assert all(d.why for p in machine for d in machine[p])
    assert {d.what for p in machine for d in machine[p]} == {"data"}


def test_the_same_traces_on_another_machine_diverge_where_the_machines_differ():
    path = DATA / "pseries" / "walker-v1.jsonl"
    with open_trace(path) as t:
        r = replay(vfiosim.Machine.default(), t)           # PowerNV: a 2 GiB default window, other groups
    assert r.counts["kernel"] > 10
    assert any(d.what == "out.dma32_window_size" for d in r.divergences)
    # And the other way round: PowerNV's real EEH answers where pseries' guest has none.
    with open_trace(DATA / "powernv" / "walker-v1.jsonl") as t:
        r = replay(vfiosim.Machine.preset("pseries"), t, keep=100000)
    assert any(d.what == "out.dma32_window_size" and d.expected == 1 << 31 for d in r.divergences)
    assert any("VFIO_EEH_PE_OP" in d.step and d.expected == "0" and d.got == "-1 ENODEV" for d in r.divergences)


def test_powernv_is_bare_metal_eeh_and_its_own_tce_tables():
    """What the PowerNV guest showed that the pseries one could not: EEH works
    (pseries guests get ENODEV), the default window is the PHB's 2 GiB below its
    32-bit MMIO window, a DMA window's TCE table is charged to locked_vm."""
    with open_trace(DATA / "powernv" / "walker-v1.jsonl") as t:
        eeh = [r for r in t if r.get("cmd") == "VFIO_EEH_PE_OP"]
    assert eeh and sum(r["ret"] == 0 for r in eeh) >= 5
    with open_trace(DATA / "pseries" / "walker-v1.jsonl") as t:
        assert all(r["err"] == "ENODEV" for r in t if r.get("cmd") == "VFIO_EEH_PE_OP")
    with open_trace(DATA / "powernv" / "walker-v2.jsonl") as t:
        info = [r for r in t if r.get("cmd") == "VFIO_IOMMU_SPAPR_TCE_GET_INFO" and not r["errno"]
                and "ddw" in r["out"]]
    assert info[0]["out"]["dma32_window_size"] == 1 << 31 and info[0]["out"]["ddw"]["pgsizes"] == 0x40211000


def test_fork_and_exec_on_real_kernels_replay_as_recorded(result):
    """vfio_processes.c: a child of the process that preregistered memory is refused
    by sPAPR (the container belongs to the mm that bound it: EPERM), an exec'd image
    too; Type1 lets either map, charging its own mm.  The replay forks and execs
    where the recording did."""
    for platform in ("pseries", "powernv", "x86"):
        with open_trace(DATA / platform / "processes.jsonl") as t:
            recs = list(t)
        pids = list(dict.fromkeys(r["pid"] for r in recs if r["call"] != "exit"))
        assert len(pids) == 3, platform                      # the parent, a child, an exec'd child
        assert sum(r["call"] == "fork" for r in recs) == 2 and sum(r["call"] == "exec" for r in recs) == 1
        child = [r for r in recs if r["pid"] == pids[1] and r["call"] == "ioctl"]
        mapping = [r for r in child if r["cmd"] in ("VFIO_IOMMU_MAP_DMA", "VFIO_IOMMU_SPAPR_REGISTER_MEMORY")]
        if platform == "x86":
            assert all(r["errno"] == 0 for r in mapping)
        else:
            assert mapping and all(r["err"] == "EPERM" for r in mapping)
        assert any(r["call"] == "setuid" for r in recs) and any(r.get("errno") == 12 for r in recs)
    kernel = [d for p in ("pseries", "powernv", "x86") for s, d in result.divergences[p]
              if s == "processes" and d.label == "kernel"]
    assert not kernel


def test_docs_conformance_table_is_what_the_replay_counts(result):
    text = (ROOT / "docs" / "conformance.md").read_text()
    m = re.search(r"<!-- conformance table -->\n(.*?)<!-- end -->", text, re.S)
    assert m, "docs/conformance.md lost its table markers"
    assert m.group(1).strip() == result.table().strip(), \
        "docs/conformance.md's table is stale; `vfiosim conformance --table-only` prints the current one"


def test_a_kernel_with_iommufd_shows_what_the_model_was_read_from_the_source():
    """x86-iommufd: Linux 6.12.118 with iommufd, the first real one.  What was only
    read from the source before: IOMMU_GET_HW_INFO gives the VT-d unit's registers as
    sysfs shows them (QEMU under TCG: no EIM), a reserved range (the MSI window) is
    EADDRINUSE whichever comes first, the allowed range or the device, and a replace
    onto an IOAS with a mapping there fails leaving the device where it was."""
    with open_trace(DATA / "x86-iommufd" / "iommufd_families.jsonl") as t:
        unit = t.header["iommu"]["units"][0]
        hw = [r for r in t if r.get("cmd") == "IOMMU_GET_HW_INFO" and not r["errno"]][0]["out"]["hw_info"]
    assert (hw["cap_reg"], hw["ecap_reg"]) == (int(unit["cap"], 16), int(unit["ecap"], 16)) == (0xd2008c22260286,
                                                                                             0xf00f4a)
    vtd = vfiosim.Machine.preset("x86", kernel_config="iommufd").iommu_units[0]
    assert (vtd.cap_reg, vtd.ecap_reg) == (hw["cap_reg"], hw["ecap_reg"])
    with open_trace(DATA / "x86-iommufd" / "iommufd_edges.jsonl") as t:
        recs = [r for r in t if r.get("call") == "ioctl"]
    attach = [r for r in recs if r["cmd"] == "VFIO_DEVICE_ATTACH_IOMMUFD_PT"]
    assert [r["err"] for r in attach] == ["EADDRINUSE", "EADDRINUSE", "", "EADDRINUSE", "", ""]
    automatic = [r["out"]["iova"] for r in recs if r["cmd"] == "IOMMU_IOAS_MAP" and not r["errno"]
                 and not r["args"]["flags"] & 1]
    # Aligned like the user address, as far as a huge page (THP, as Debian builds it).
    assert automatic == [0x400000, 0x1000, 0x110000]


def test_iommufds_vfio_container_on_a_real_kernel_is_not_vfios():
    """x86-iommufd-compat: the Type1 scenarios on /dev/vfio/vfio served by iommufd
    (IOMMUFD_VFIO_CONTAINER).  They replay as recorded on that configuration, and on
    VFIO's own Type1 they do not: the differences upstream documents are real."""
    path = DATA / "x86-iommufd-compat" / "walker-type1v2.jsonl"
    with open_trace(path) as t:
        r = replay(vfiosim.Machine.preset("x86", kernel_config="iommufd"), t, keep=100000)
    assert r.counts["kernel"] > 10
    with open_trace(path) as t:
        assert replay(vfiosim.Machine.preset("x86", kernel_config="iommufd-compat"), t).counts["kernel"] == 0


def _accounting(path: Path) -> list[tuple[str, str, int, int]]:
    """(call or ioctl, errno name, VmLck kB, VmPin kB) of each map and unmap."""
    with open_trace(path) as t:
        return [(r["cmd"], r["err"], r["vmlck_kb"], r["vmpin_kb"]) for r in t
                if r.get("cmd", "").endswith(("MAP", "UNMAP", "MAP_DMA", "UNMAP_DMA"))]


@pytest.mark.parametrize("platform", ["x86-iommufd", "x86-iommufd-compat"])
def test_locked_memory_as_a_user_charges_where_the_kernel_source_says(platform):
    """iommufd_user.c with RLIMIT_MEMLOCK 1 MiB on Linux 6.12.118.  As uid 1000 without
    capabilities: iommufd's default mode charges user->locked_vm (incr_user_locked_vm,
    so no VmLck) and counts VmPin (do_update_pinned); up to the limit maps, a page
    past it is ENOMEM; RLIMIT_MODE needs CAP_SYS_RESOURCE (iommufd_option_rlimit_mode
    checks it before EBUSY).  As root without CAP_IPC_LOCK, the per-mm mode charges
    VmLck too (update_mm_locked_vm).  Through /dev/vfio/vfio: Type1 charges VmLck only,
    iommufd's container both.  The replay answers every step as the kernel did."""
    d = DATA / platform
    limited = [("IOMMU_IOAS_MAP", "", 16), ("IOMMU_IOAS_MAP", "", 1024), ("IOMMU_IOAS_MAP", "ENOMEM", 1024),
               ("IOMMU_IOAS_UNMAP", "", 1008), ("IOMMU_IOAS_UNMAP", "", 0)]
    assert _accounting(d / "iommufd_user.jsonl") == [(c, e, 0, kb) for c, e, kb in limited]
    assert _accounting(d / "iommufd_mm.jsonl") == [(c, e, kb, kb) for c, e, kb in limited]
    type1 = [(c.replace("IOMMU_IOAS", "VFIO_IOMMU") + "_DMA", e, kb) for c, e, kb in limited]
    compat = platform.endswith("compat")
    assert _accounting(d / "container_user.jsonl") == [(c, e, kb, kb if compat else 0) for c, e, kb in type1]
    with open_trace(d / "iommufd_user.jsonl") as t:
        steps = list(t)
    assert [r["now"]["cap_eff"] for r in steps if r["call"] == "setuid"] == ["0000000000000000"]
    assert [r["err"] for r in steps if r.get("cmd") == "IOMMU_OPTION"] == ["", "EPERM", "", "EPERM"]
    with open_trace(d / "iommufd_mm.jsonl") as t:
        assert [r["err"] for r in t if r.get("cmd") == "IOMMU_OPTION"] == ["", "", "", "EBUSY"]
    for scenario in ("iommufd_user", "iommufd_mm", "container_user"):
        with open_trace(d / f"{scenario}.jsonl") as t:
            r = replay(vfiosim.Machine.preset("x86", kernel_config="iommufd-compat" if compat else "iommufd"), t)
        assert r.counts == {label: 0 for label in r.counts} and r.matched == r.steps > 15, (scenario, r.counts)


@pytest.mark.parametrize("platform", ["x86-iommufd", "x86-iommufd-compat"])
def test_the_per_user_charge_is_shared_by_processes_and_a_lowered_limit_refuses(platform):
    """iommufd_shared.c on Linux 6.12.118, RLIMIT_MEMLOCK 1 MiB, two processes of uid
    1000 each with its own /dev/iommu and device.  iommufd charges user->locked_vm,
    one count for the user, against the limit of the task that maps (pages.c,
    incr_user_locked_vm()): the child's page past 1 MiB fails while the parent holds
    its half and maps once the parent has unmapped; VmPin stays per process.  A limit
    lowered below what is pinned refuses the next map; after the unmap the new limit
    holds.  The replay answers every step as the kernel did."""
    with open_trace(DATA / platform / "iommufd_shared.jsonl") as t:
        steps = list(t)
    parent = steps[0]["pid"]
    maps = [("parent" if r["pid"] == parent else "child", r["cmd"], r["err"], r["vmpin_kb"]) for r in steps
            if r.get("cmd") in ("IOMMU_IOAS_MAP", "IOMMU_IOAS_UNMAP")]
    assert maps == [("parent", "IOMMU_IOAS_MAP", "", 512), ("child", "IOMMU_IOAS_MAP", "", 512),
                    ("child", "IOMMU_IOAS_MAP", "ENOMEM", 512), ("parent", "IOMMU_IOAS_UNMAP", "", 0),
                    ("child", "IOMMU_IOAS_MAP", "", 516), ("child", "IOMMU_IOAS_UNMAP", "", 0),
                    ("parent", "IOMMU_IOAS_MAP", "", 256), ("parent", "IOMMU_IOAS_MAP", "ENOMEM", 256),
                    ("parent", "IOMMU_IOAS_UNMAP", "", 0), ("parent", "IOMMU_IOAS_MAP", "", 128),
                    ("parent", "IOMMU_IOAS_MAP", "ENOMEM", 128), ("parent", "IOMMU_IOAS_UNMAP", "", 0)]
    assert all(r["vmlck_kb"] == 0 for r in steps if "vmlck_kb" in r)
    compat = platform.endswith("compat")
    with open_trace(DATA / platform / "iommufd_shared.jsonl") as t:
        r = replay(vfiosim.Machine.preset("x86", kernel_config="iommufd-compat" if compat else "iommufd"), t)
    assert r.counts == {label: 0 for label in r.counts} and r.matched == r.steps > 25, r.counts


@pytest.mark.qemu_record
@pytest.mark.parametrize("platform", ["pseries", "powernv", "x86"])
def test_recording_again_in_the_guests_gives_traces_that_replay_as_recorded(tmp_path, platform):
    try:
        run = record_platform(platform, tmp_path / platform, workdir=tmp_path / "work", install=False, timeout=1200)
    except QemuDemoUnavailable as exc:
        pytest.skip(f"the {platform} guest cannot run here: {exc}")
    assert run.ok, run.reason + "\n" + "\n".join(run.guest)
    assert {p.stem for p in run.traces} == {p.stem for p in (DATA / platform).glob("*.jsonl")}
    c = conformance({platform: run.traces})
    kernel = [f"[{s}] {d}" for s, d in c.divergences[platform] if d.label == "kernel"]
    assert not kernel, "\n".join(kernel)
    assert c.totals[platform][0] == c.totals[platform][1] > 350
