"""DPDK's unmodified testpmd on the virtio-net NIC (docs/dpdk.md), and the pieces it needed.

The testpmd runs need Debian's ``dpdk`` package (.ci/run installs it as
root); without it they are skipped with the reason.  They take a few
seconds each (EAL registers and maps its memory page by page on sPAPR);
``-m 'not dpdk'`` deselects them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import vfiosim
from runutil import ThreadedDaemon
from vfiosim.dpdk import demo as D
from vfiosim.transport import host as H

TESTPMD = shutil.which("dpdk-testpmd")
needs_dpdk = pytest.mark.skipif(TESTPMD is None, reason="dpdk-testpmd is not installed (Debian package dpdk; "
                                                         ".ci/run installs it as root)")
MEMORY_MB = 32                 # enough for testpmd with 2048 mbufs; half the demo's registrations


# -- what DPDK needed from the transport, without DPDK --------------------------------------------------------


@pytest.mark.parametrize("preset,iommu_module", [("powernv-virtio", "vfio_iommu_spapr_tce"),
                                                 ("x86-virtio", "vfio_iommu_type1")])
def test_sys_module_shows_the_vfio_modules_dpdk_checks(tmp_path, preset, iommu_module):
    """rte_eal_check_module("vfio") and ("vfio_pci") look for /sys/module/<name>;
    EAL reads vfio's enable_unsafe_noiommu_mode.  The fake tree has the modules
    of the machine's kernel."""
    d = ThreadedDaemon(vfiosim.Machine.preset(preset), tmp_path)
    try:
        prog = ("import os\n"
                "print(sorted(m for m in ('vfio', 'vfio_pci', 'vfio_pci_core', 'vfio_iommu_type1', "
                "'vfio_iommu_spapr_tce') if os.access('/sys/module/' + m, os.F_OK)))\n"
                "print(open('/sys/module/vfio/parameters/enable_unsafe_noiommu_mode').read().strip())\n")
        out = d.run([sys.executable, "-c", prog])
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0] == repr(sorted(["vfio", "vfio_pci", "vfio_pci_core", iommu_module]))
        assert lines[1] == "N"
    finally:
        d.close()


def test_one_mapping_lookup_agrees_with_reading_all_of_proc_maps(monkeypatch):
    """HostProcess.vma_at() (PROCMAP_QUERY) finds what a scan of
    /proc/<pid>/maps finds, for every mapping; the scan is the fallback."""
    hp = H.HostProcess.open(os.getpid())
    maps = [m for m in hp.maps() if "[vsyscall]" not in m[4]]
    for start, end, prot, private, _path in maps:
        for addr in (start, end - 1):
            found = hp.vma_at(addr)
            if found != (start, end, prot, private, ""):
                # This process's own mappings move while it runs (the heap grows):
                # the scan taken again now must agree.
                now = [m for m in hp.maps() if m[0] <= addr < m[1]]
                assert now and found == (*now[0][:4], ""), hex(addr)
    hole = next(maps[i][1] for i in range(len(maps) - 1) if maps[i][1] < maps[i + 1][0])
    assert hp.vma_at(hole) is None
    monkeypatch.setattr(hp, "_query", False)
    start, end, prot, private, path = maps[0]
    assert hp.vma_at(start) == (start, end, prot, private, path)


def test_port_stats_parser_reads_testpmds_blocks():
    text = """
  ######################## NIC statistics for port 0  ########################
  RX-packets: 61024      RX-missed: 0          RX-bytes:  3905536
  RX-errors: 0
  RX-nombuf:  0
  TX-packets: 61056      TX-errors: 0          TX-bytes:  3907584

  Throughput (since last show)
  Rx-pps:        15234          Rx-bps:      7799808
  Tx-pps:        15236          Tx-bps:      7800832
  ############################################################################
"""
    [st] = D.parse_port_stats(text + "noise")
    assert (st.rx_packets, st.rx_bytes, st.tx_packets, st.tx_bytes, st.rx_pps, st.tx_pps) == \
        (61024, 3905536, 61056, 3907584, 15234, 15236)


def test_frame_description_checks_the_ipv4_header_checksum():
    ip = bytearray(bytes.fromhex("45000032000000004011") + bytes(2) + bytes([198, 18, 0, 1, 198, 18, 0, 2]))
    ip[10:12] = D.ipv4_checksum(bytes(ip)).to_bytes(2, "big")
    f = bytes(12) + b"\x08\x00" + bytes(ip) + bytes(30)
    assert D.describe_frame(f) == "Ethernet IPv4 UDP 198.18.0.1 -> 198.18.0.2, 64 bytes, IPv4 header checksum valid"
    bad = bytearray(f)
    bad[20] ^= 1
    assert "checksum WRONG" in D.describe_frame(bytes(bad))


def test_the_demo_machine_is_one_with_a_virtio_net_nic(tmp_path):
    assert D.load_machine("powernv")[0].name == "powernv9-virtio"
    assert D.load_machine("x86")[0].name == "q35-virtio"
    with pytest.raises(ValueError, match="no virtio-net device bound to vfio-pci"):
        D.load_machine("pseries")
    path = tmp_path / "nic.toml"
    path.write_text('[machine]\nname = "mine"\nplatform = "powernv"\n[[phb]]\nindex = 3\n[[device]]\n'
                    'bdf = "0003:05:00.0"\nmodel = "virtio-net"\nphb = 3\niommu_group = 9\n')
    m, bdf = D.load_machine(str(path))
    assert (m.name, bdf) == ("mine", "0003:05:00.0")


def test_the_demo_says_what_to_install_when_testpmd_is_missing(monkeypatch):
    monkeypatch.setattr(D.shutil, "which", lambda name: None)
    with pytest.raises(D.DpdkDemoUnavailable, match=r"apt-get install dpdk"):
        D.check_prerequisites(install=False)
    monkeypatch.setattr(D, "_can_install", lambda: False)
    with pytest.raises(D.DpdkDemoUnavailable, match=r"needs root and apt-get"):
        D.check_prerequisites(install=True)


def test_a_user_without_root_is_told_what_dpdk_will_lock_on_each_machine(monkeypatch, capsys):
    """Not root: DPDK locks its memory for DMA, and on sPAPR its window's TCE
    table (32 MiB for 8 GiB) too; a hard RLIMIT_MEMLOCK below that is refused up
    front with the figure, before anything starts (as the simulated kernel would
    refuse the MAP_DMA or REGISTER_MEMORY).  Checked by hand as nobody with
    Debian's default 8 MiB: x86 wants 64 MiB, PowerNV 112 MiB (docs/dpdk.md)."""
    import resource

    from vfiosim import cli
    monkeypatch.setattr(D.os, "geteuid", lambda: 4242)
    monkeypatch.setattr(resource, "getrlimit", lambda _r: (8 << 20, 8 << 20))
    assert cli.main(["dpdk-demo", "--no-install", "--machine", "x86"]) == 3
    assert "RLIMIT_MEMLOCK allows 8192 KiB (needed: 65536 KiB)" in capsys.readouterr().err
    assert cli.main(["dpdk-demo", "--no-install", "--machine", "powernv", "--memory", "32"]) == 3
    err = capsys.readouterr().err
    assert "its 32 MiB and its window's TCE table" in err and "(needed: 81920 KiB)" in err
    monkeypatch.setattr(resource, "getrlimit", lambda _r: (8 << 20, 64 << 20))
    D.check_memlock(64, spapr=False)                      # Type1: the memory alone
    with pytest.raises(D.DpdkDemoUnavailable):
        D.check_memlock(64, spapr=True)


def test_too_little_memory_for_testpmd_is_refused_with_the_floor(capsys):
    from vfiosim import cli
    assert cli.main(["dpdk-demo", "--no-install", "--memory", "16"]) == 3
    assert "--memory 16: testpmd needs at least 20 MiB" in capsys.readouterr().err


def test_dpdk_demo_exits_3_when_it_cannot_run(monkeypatch):
    from vfiosim import cli

    def unavailable(**kw):
        raise D.DpdkDemoUnavailable("dpdk-testpmd is missing")
    monkeypatch.setattr(D, "run_demo", unavailable)
    assert cli.main(["dpdk-demo", "--no-install"]) == 3


# -- testpmd ------------------------------------------------------------------------------------------------------


@needs_dpdk
@pytest.mark.dpdk
def test_testpmd_forwards_through_the_nic_on_powernv_over_spapr_v2(tmp_path):
    """EAL falls back from Type1 (ENODEV) to sPAPR v2: it removes the default
    window, creates one covering its memory, registers and maps every 4 KiB
    page; the virtio PMD binds the NIC; frames come back byte for byte; RX = TX."""
    r = D.run_demo(machine="powernv", seconds=2, workdir=str(tmp_path), memory_mb=MEMORY_MB, install=False)
    assert r.ok, "\n".join(t for ok, t in r.checks if not ok) + "\n" + r.run.output[-3000:]
    h = r.host
    pages = (MEMORY_MB << 20) // 4096
    assert h.iommu_type == 7
    assert any(f.startswith("VFIO_SET_IOMMU type=1 = -1 ENODEV") for f in h.failures)
    assert h.default_window == (0, 0x80000000) and h.removed_windows == ["0x0"]
    assert h.windows == ["0x0+0x200000000 (4096-byte pages, 1 levels)"]
    assert [run[1:] for run in h.registered_runs] == [[MEMORY_MB << 20, pages]]
    assert h.ioctls["VFIO_IOMMU_MAP_DMA"] == pages and h.map_bytes == MEMORY_MB << 20
    assert r.final.rx_packets == r.final.tx_packets > 1000
    assert r.frames["new"] == 32 and r.frames["returned"] == r.frames["sent"] - 32
    assert r.run.peak_locked >= MEMORY_MB << 20
    assert D.clean(r.run.after)
    # Every queue notification was posted (testpmd went on without waiting for the
    # device) and each is in the trace, as the device counted them.
    with open(r.trace) as f:
        stores = [rec for rec in map(json.loads, f) if rec.get("call") == "mmio" and rec["write"]]
    kicks = [rec for rec in stores if 0x3000 <= rec["offset"] < 0x4000]
    assert kicks and all(rec.get("posted") and rec["errno"] == 0 for rec in kicks)
    assert len(kicks) == r.run.machine.device(r.bdf).notifications


@needs_dpdk
@pytest.mark.dpdk
def test_testpmd_forwards_through_the_nic_on_x86_over_type1(tmp_path):
    r = D.run_demo(machine="x86", seconds=2, workdir=str(tmp_path), memory_mb=MEMORY_MB, install=False)
    assert r.ok, "\n".join(t for ok, t in r.checks if not ok) + "\n" + r.run.output[-3000:]
    h = r.host
    assert h.iommu_type == 1 and not h.windows and not h.registered_runs
    assert h.ioctls["VFIO_IOMMU_MAP_DMA"] == 1 and h.map_bytes == MEMORY_MB << 20
    assert r.final.rx_packets == r.final.tx_packets > 1000


@needs_dpdk
@pytest.mark.dpdk
@pytest.mark.parametrize("machine", ["powernv", "x86"])
def test_testpmd_killed_while_forwarding_leaves_nothing(tmp_path, machine):
    """SIGKILL in the middle of forwarding: the daemon's pidfd sees it go and
    the kernel releases its groups, registered memory, mappings and locked
    memory; the daemon's files go when the run ends."""
    m, bdf = D.load_machine(machine)
    argv = D.testpmd_argv(TESTPMD, bdf=bdf, memory_mb=MEMORY_MB)
    run = D.run_testpmd(m, argv, [("start tx_first", 1.5)], kill_after="start tx_first", timeout=120)
    assert run.exit_status == -9
    assert run.peak_locked >= MEMORY_MB << 20
    assert m.device(bdf).stats["tx_frames"] > 0, "it was killed while forwarding"
    assert D.clean(run.after), D.describe_after(run)


@needs_dpdk
@pytest.mark.dpdk
def test_vfiosim_dpdk_demo_command(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vfiosim.cli", "dpdk-demo", "--machine", "x86", "--seconds", "1",
                           "--memory", str(MEMORY_MB), "--workdir", str(tmp_path), "--no-install"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert out.startswith("vfiosim dpdk-demo: PASS")
    assert "IOMMU type: VFIO_TYPE1_IOMMU" in out and "[FAIL]" not in out
    assert Path(tmp_path / "testpmd.log").read_text().count("NIC statistics for port 0") == 3


def test_trace_summary_condenses_page_by_page_registration(tmp_path):
    """DPDK without hugepages registers its memory one page at a time: the
    summary shows one run (and the IOMMU type, the default window, what was
    removed and mapped) instead of thousands of lines."""
    import json

    from vfiosim.transport.summary import iommu_type_name, summarize_trace

    def rec(**kw):
        return json.dumps({"pid": 1, "ret": 0, "errno": 0, "err": "", **kw})
    base = 0x1000EF000
    lines = [rec(call="ioctl", cmd="VFIO_SET_IOMMU", args={"type": 1}, ret=-1, errno=19, err="ENODEV"),
             rec(call="ioctl", cmd="VFIO_SET_IOMMU", args={"type": 7}),
             rec(call="ioctl", cmd="VFIO_IOMMU_SPAPR_TCE_GET_INFO", args={"argsz": 32, "dma32_window_start": 0,
                                                                          "dma32_window_size": 0},
                 out={"dma32_window_size": 0x80000000}),
             rec(call="ioctl", cmd="VFIO_IOMMU_SPAPR_TCE_REMOVE", args={"argsz": 16, "start_addr": 0})]
    for i in range(100):
        lines.append(rec(call="ioctl", cmd="VFIO_IOMMU_SPAPR_REGISTER_MEMORY",
                         args={"argsz": 24, "flags": 0, "vaddr": base + 4096 * i, "size": 4096}))
        lines.append(rec(call="ioctl", cmd="VFIO_IOMMU_MAP_DMA", args={"argsz": 32, "flags": 3, "vaddr": base + 4096 * i,
                                                                       "iova": base + 4096 * i, "size": 4096}))
    lines.append(rec(call="ioctl", cmd="VFIO_IOMMU_SPAPR_REGISTER_MEMORY",
                     args={"argsz": 24, "flags": 0, "vaddr": 0x7F0000000000, "size": 0x10000}))
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines) + "\n")
    h = summarize_trace(str(path))
    assert h.registered_runs == [[base, 100 * 4096, 100], [0x7F0000000000, 0x10000, 1]]
    assert h.registered == [f"{base:#x}+0x64000 (100 registrations of 0x1000)", "0x7f0000000000+0x10000"]
    assert h.registered_bytes() == 100 * 4096 + 0x10000
    assert iommu_type_name(h.iommu_type) == "VFIO_SPAPR_TCE_v2_IOMMU" and h.map_bytes == 100 * 4096
    assert h.default_window == (0, 0x80000000) and h.removed_windows == ["0x0"]
