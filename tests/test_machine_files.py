"""Presets and machine files: what loads, what each machine looks like, and
the errors a bad file gives (each naming the file, the key and what was expected)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

import vfiosim
from vfiosim import MachineFileError, uapi
from vfioutil import dma_map, get_info, setup_v1

ONE_DEVICE = """\
[machine]
name = "tiny"
description = "one PHB, one edu device"
platform = "powernv"

[[phb]]
index = 0
tce_page_sizes = ["4K", "64K"]

[[device]]
bdf = "0000:01:00.0"
model = "edu"
phb = 0
iommu_group = 7
"""

TWO_PHBS = """\
[machine]
name = "two"
platform = "{platform}"

[[phb]]
index = 0

[[phb]]
index = 1

[[device]]
bdf = "0000:01:00.0"
model = "edu"
phb = 0
pe = 1
iommu_group = 0

[[device]]
bdf = "0001:01:00.0"
model = "edu"
phb = 1
pe = 1
iommu_group = 1
"""


def write(tmp_path: Path, text: str, name: str = "machine.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load_error(tmp_path: Path, text: str) -> tuple[MachineFileError, Path]:
    path = write(tmp_path, text)
    with pytest.raises(MachineFileError) as info:
        vfiosim.Machine.from_file(path)
    return info.value, path


def assert_names(exc: MachineFileError, path: Path, key: str, *expected: str) -> None:
    msg = str(exc)
    assert str(path) in msg, f"the message does not name the file: {msg}"
    assert key in msg, f"the message does not name the key {key}: {msg}"
    for text in expected:
        assert text in msg, f"the message does not say {text!r}: {msg}"
    assert exc.source == str(path)
    assert exc.key.startswith(key) or key.startswith(exc.key), (exc.key, key)


# -- presets -------------------------------------------------------------------------------------------


def test_preset_names_are_powernv_pseries_and_x86_and_the_dpdk_demo_hosts():
    assert vfiosim.preset_names() == ["powernv", "powernv-virtio", "pseries", "x86", "x86-ioat", "x86-virtio"]


def test_the_dpdk_demo_presets_hold_one_virtio_net_nic_and_the_default_machine_keeps_its_edus():
    for name, platform, group in (("powernv-virtio", "powernv", 0), ("x86-virtio", "x86", 4)):
        m = vfiosim.Machine.preset(name)
        assert m.platform == platform
        nics = [d for d in m.kernel.devices.values() if d.model == "virtio-net"]
        assert [(d.bdf, d.iommu_group.id, d.driver) for d in nics] == [("0000:01:00.0", group, "vfio-pci")]
        assert not [d for d in m.kernel.devices.values() if d.model == "edu"]
    assert sorted(d.model for d in vfiosim.Machine.default().kernel.devices.values()) == ["edu", "edu"]


def test_default_machine_is_the_powernv_preset():
    m = vfiosim.Machine.default()
    assert m.platform == "powernv"
    assert m.name == "powernv9"
    assert m.page_size == 4096
    assert m.kernel_version == "6.12"
    assert m.iommu_groups() == {0: ["0000:01:00.0"], 1: ["0001:01:00.0"]}


@pytest.mark.parametrize("name", ["powernv", "default", "powernv9"])
def test_powernv_preset_and_aliases_have_two_groups(name):
    m = vfiosim.Machine.preset(name)
    assert m.platform == "powernv"
    assert m.iommu_groups() == {0: ["0000:01:00.0"], 1: ["0001:01:00.0"]}


def test_pseries_preset_has_two_groups_on_bus_0():
    m = vfiosim.Machine.preset("pseries")
    assert m.platform == "pseries"
    assert m.name == "pseries"
    assert m.iommu_groups() == {0: ["0000:00:00.0"], 1: ["0001:00:00.0"]}


@pytest.mark.parametrize("preset,nodes", [("powernv", ["/dev/vfio/0", "/dev/vfio/1"]),
                                          ("pseries", ["/dev/vfio/0", "/dev/vfio/1"])])
def test_preset_group_nodes_open_for_root(preset, nodes):
    m = vfiosim.Machine.preset(preset)
    p = m.spawn()
    fds = [p.open(n, os.O_RDWR) for n in nodes]
    assert fds == [3, 4]


@pytest.mark.parametrize("preset", ["powernv", "pseries"])
@pytest.mark.parametrize("page_size", [4096, 65536])
def test_presets_build_with_both_page_sizes(preset, page_size):
    m = vfiosim.Machine.preset(preset, page_size=page_size)
    assert m.page_size == page_size
    assert len(m.iommu_groups()) == 2


def test_powernv_preset_builds_with_the_3_10_kernel():
    m = vfiosim.Machine.default(kernel="3.10")
    assert m.kernel_version == "3.10"
    assert m.iommu_groups() == {0: ["0000:01:00.0"], 1: ["0001:01:00.0"]}


def test_unknown_preset_is_a_value_error_listing_the_presets():
    with pytest.raises(ValueError, match="powernv.*pseries.*x86"):
        vfiosim.Machine.preset("vax")


def test_machine_load_takes_a_preset_name_or_a_path(tmp_path):
    assert vfiosim.Machine.load("pseries").platform == "pseries"
    m = vfiosim.Machine.load(str(write(tmp_path, ONE_DEVICE)))
    assert m.name == "tiny"


def test_preset_topology_lists_pes_groups_and_devices():
    topo = vfiosim.Machine.default().topology()
    assert [g["id"] for g in topo["iommu_groups"]] == [0, 1]
    assert [g["node"] for g in topo["iommu_groups"]] == ["/dev/vfio/0", "/dev/vfio/1"]
    assert [d["bdf"] for d in topo["devices"]] == ["0000:01:00.0", "0001:01:00.0"]
    assert sorted(pe["iommu_group"] for pe in topo["pes"]) == [0, 1]
    assert topo["eeh"] is True
    assert vfiosim.Machine.preset("pseries").topology()["eeh"] is False


@pytest.mark.parametrize("page_size", [0, 1024, 8192, 16384, 2 << 20])
def test_page_size_other_than_4k_or_64k_is_a_value_error(page_size):
    with pytest.raises(ValueError, match="4096 or 65536"):
        vfiosim.Machine.default(page_size=page_size)


def test_unknown_kernel_version_is_a_value_error():
    with pytest.raises(ValueError, match="6.12"):
        vfiosim.Machine.default(kernel="5.4")


def test_kernel_3_10_on_pseries_is_a_value_error_naming_kconfig():
    # 3.10's VFIO_IOMMU_SPAPR_TCE: "depends on VFIO && SPAPR_TCE_IOMMU", which
    # only PPC_POWERNV selected then: there was no VFIO in pseries guests.
    with pytest.raises(ValueError, match="Kconfig"):
        vfiosim.Machine.preset("pseries", kernel="3.10")


# -- a custom machine file ----------------------------------------------------------------------------------


def test_custom_machine_file_builds_and_its_group_node_opens(tmp_path):
    m = vfiosim.Machine.from_file(write(tmp_path, ONE_DEVICE))
    assert m.name == "tiny"
    assert m.platform == "powernv"
    assert m.iommu_groups() == {7: ["0000:01:00.0"]}
    p = m.spawn()
    g = p.open("/dev/vfio/7", os.O_RDWR)
    status = uapi.vfio_group_status(argsz=8)
    p.ioctl(g, uapi.VFIO_GROUP_GET_STATUS, status)
    assert status.flags == uapi.VFIO_GROUP_FLAGS_VIABLE
    for absent in ("/dev/vfio/0", "/dev/vfio/1"):
        with pytest.raises(OSError) as info:
            p.open(absent, os.O_RDWR)
        assert info.value.errno == errno.ENOENT


def test_custom_machine_file_group_does_dma_mapping(tmp_path):
    m = vfiosim.Machine.from_file(write(tmp_path, ONE_DEVICE))
    p = m.spawn()
    c, g = setup_v1(p, group_id=7)
    info = get_info(p, c)
    a = p.mmap(2 * m.page_size)
    p.write_memory(a, b"\1" * 2 * m.page_size)
    dma_map(p, c, a, info.dma32_window_start, 2 * m.page_size)
    assert m.pinned_pages() == 2
    p.exit()
    assert m.pinned_pages() == 0


def test_machine_file_path_may_be_a_pathlike_or_str(tmp_path):
    path = write(tmp_path, ONE_DEVICE)
    assert vfiosim.Machine.from_file(path).iommu_groups() == vfiosim.Machine.from_file(str(path)).iommu_groups()


def test_from_toml_builds_the_same_machine(tmp_path):
    m = vfiosim.Machine.from_toml(ONE_DEVICE)
    assert m.iommu_groups() == {7: ["0000:01:00.0"]}


@pytest.mark.parametrize("platform", ["powernv", "pseries"])
def test_two_phb_file_builds_on_both_platforms(platform):
    m = vfiosim.Machine.from_toml(TWO_PHBS.format(platform=platform))
    assert m.platform == platform
    assert m.iommu_groups() == {0: ["0000:01:00.0"], 1: ["0001:01:00.0"]}


def test_devices_of_one_pe_share_one_group():
    text = ONE_DEVICE + """
[[device]]
bdf = "0000:01:00.1"
model = "edu"
phb = 0
iommu_group = 7
"""
    m = vfiosim.Machine.from_toml(text)
    assert m.iommu_groups() == {7: ["0000:01:00.0", "0000:01:00.1"]}


def test_bdf_is_case_insensitive_and_stored_lower_case():
    text = ONE_DEVICE.replace('bdf = "0000:01:00.0"', 'bdf = "0000:0A:1F.7"')
    m = vfiosim.Machine.from_toml(text)
    assert m.iommu_groups() == {7: ["0000:0a:1f.7"]}


# -- bad machine files -------------------------------------------------------------------------------------


def test_nonexistent_file_is_a_machine_file_error_naming_it(tmp_path):
    path = tmp_path / "missing.toml"
    with pytest.raises(MachineFileError) as info:
        vfiosim.Machine.from_file(path)
    assert str(path) in str(info.value)
    assert "readable" in str(info.value)


def test_machine_file_error_is_a_value_error():
    assert issubclass(MachineFileError, ValueError)


def test_invalid_toml_syntax(tmp_path):
    exc, path = load_error(tmp_path, ONE_DEVICE.replace('name = "tiny"', 'name = "tiny'))
    assert_names(exc, path, "(syntax)", "valid TOML")


def test_missing_machine_table(tmp_path):
    exc, path = load_error(tmp_path, ONE_DEVICE.split("\n", 5)[5])   # drop [machine] and its keys
    assert "[machine]" not in path.read_text()
    assert_names(exc, path, "machine", "a [machine] table")


def test_unknown_platform(tmp_path):
    exc, path = load_error(tmp_path, ONE_DEVICE.replace('platform = "powernv"', 'platform = "vax"'))
    assert_names(exc, path, "machine.platform", "powernv", "pseries", "x86", "'vax'")


def test_missing_platform(tmp_path):
    exc, path = load_error(tmp_path, ONE_DEVICE.replace('platform = "powernv"\n', ""))
    assert_names(exc, path, "machine.platform", "required")


@pytest.mark.parametrize("table,key,text", [
    ("machine", "machine.colour", ONE_DEVICE.replace('platform = "powernv"', 'platform = "powernv"\ncolour = "red"')),
    ("phb", "phb[0].tce_sizes", ONE_DEVICE.replace("index = 0", 'index = 0\ntce_sizes = ["4K"]')),
    ("device", "device[0].iommu_grp", ONE_DEVICE.replace("iommu_group = 7", "iommu_group = 7\niommu_grp = 7")),
    ("top", "bus", ONE_DEVICE + "\n[bus]\nx = 1\n"),
], ids=["machine", "phb", "device", "top-level"])
def test_unknown_key(tmp_path, table, key, text):
    exc, path = load_error(tmp_path, text)
    assert_names(exc, path, key, "one of the keys", "unknown key")


@pytest.mark.parametrize("bdf", ["0000:01:00", "01:00.0", "0000:01:20.0", "0000:01:00.8", "0000:100:00.0",
                                 "zzzz:01:00.0", ""])
def test_bad_bdf(tmp_path, bdf):
    exc, path = load_error(tmp_path, ONE_DEVICE.replace('"0000:01:00.0"', f'"{bdf}"'))
    assert_names(exc, path, "device[0].bdf", "DDDD:BB:SS.F")


def test_bdf_of_the_wrong_type(tmp_path):
    exc, path = load_error(tmp_path, ONE_DEVICE.replace('"0000:01:00.0"', "1"))
    assert_names(exc, path, "device[0].bdf", "a string")


def test_device_on_an_undefined_phb(tmp_path):
    text = ONE_DEVICE.replace('bdf = "0000:01:00.0"', 'bdf = "0003:01:00.0"').replace("phb = 0", "phb = 3")
    exc, path = load_error(tmp_path, text)
    assert_names(exc, path, "device[0].phb", "[[phb]]", "3")


def test_bdf_domain_not_matching_its_phb(tmp_path):
    exc, path = load_error(tmp_path, ONE_DEVICE.replace('"0000:01:00.0"', '"0001:01:00.0"'))
    assert_names(exc, path, "device[0].bdf", "PCI domain 0000", "0001:01:00.0")


def test_duplicate_bdf(tmp_path):
    text = ONE_DEVICE + """
[[device]]
bdf = "0000:01:00.0"
model = "edu"
phb = 0
iommu_group = 7
"""
    exc, path = load_error(tmp_path, text)
    assert_names(exc, path, "device[1].bdf", "not used by another device")


def test_duplicate_bdf_differing_only_in_case(tmp_path):
    text = ONE_DEVICE.replace('"0000:01:00.0"', '"0000:0a:00.0"') + """
[[device]]
bdf = "0000:0A:00.0"
model = "edu"
phb = 0
iommu_group = 7
"""
    exc, path = load_error(tmp_path, text)
    assert_names(exc, path, "device[1].bdf", "not used by another device")


def test_duplicate_phb_index(tmp_path):
    exc, path = load_error(tmp_path, TWO_PHBS.format(platform="powernv").replace("index = 1", "index = 0"))
    assert_names(exc, path, "phb[1].index", "not used by another PHB")


@pytest.mark.parametrize("sizes,bad", [('["4K", "48K"]', "48K"), ('["4K", 12288]', "12288"),
                                       ('["4K", "2K"]', "2K")])
def test_tce_page_size_not_a_power_of_two(tmp_path, sizes, bad):
    exc, path = load_error(tmp_path, ONE_DEVICE.replace('["4K", "64K"]', sizes))
    assert_names(exc, path, "phb[0].tce_page_sizes", "a power of two", bad)


def test_ddw_page_size_not_a_power_of_two(tmp_path):
    text = TWO_PHBS.format(platform="pseries").replace("index = 1", 'index = 1\nddw_page_sizes = ["4K", "3M"]')
    exc, path = load_error(tmp_path, text)
    assert_names(exc, path, "phb[1].ddw_page_sizes", "a power of two", "3M")


def test_powernv_tce_page_sizes_without_4k(tmp_path):
    exc, path = load_error(tmp_path, ONE_DEVICE.replace('["4K", "64K"]', '["64K"]'))
    assert_names(exc, path, "phb[0].tce_page_sizes", "4K")


def test_group_shared_across_pes(tmp_path):
    text = ONE_DEVICE + """
[[device]]
bdf = "0000:02:00.0"
model = "edu"
phb = 0
pe = 2
iommu_group = 7
"""
    exc, path = load_error(tmp_path, text)
    assert_names(exc, path, "device[1].iommu_group", "device[0]", "another PE")


def test_group_shared_across_phbs(tmp_path):
    exc, path = load_error(tmp_path, TWO_PHBS.format(platform="pseries").replace("iommu_group = 1", "iommu_group = 0"))
    assert_names(exc, path, "device[1].iommu_group", "another PE")


def test_one_pe_split_across_groups(tmp_path):
    text = ONE_DEVICE + """
[[device]]
bdf = "0000:01:00.1"
model = "edu"
phb = 0
iommu_group = 8
"""
    exc, path = load_error(tmp_path, text)
    assert_names(exc, path, "device[1].iommu_group", "share one IOMMU group")


def test_no_phb(tmp_path):
    exc, path = load_error(tmp_path, '[machine]\nname = "x"\nplatform = "powernv"\n')
    assert_names(exc, path, "phb", "at least one [[phb]]")


def test_unknown_device_model(tmp_path):
    exc, path = load_error(tmp_path, ONE_DEVICE.replace('model = "edu"', 'model = "nvme"'))
    assert_names(exc, path, "device[0].model", "edu", "'nvme'")


def test_bad_size_string(tmp_path):
    exc, path = load_error(tmp_path, ONE_DEVICE.replace('platform = "powernv"', 'platform = "powernv"\nram = "lots"'))
    assert_names(exc, path, "machine.ram", "a size")


def test_from_toml_errors_name_the_source():
    with pytest.raises(MachineFileError) as info:
        vfiosim.Machine.from_toml(ONE_DEVICE.replace('"powernv"', '"sparc"'), source="inline-test")
    assert str(info.value).startswith("inline-test: machine.platform: expected")


# -- group ownership and mode ----------------------------------------------------------------------------------


def with_group_perms(mode: int | None = None, uid: int | None = None, gid: int | None = None) -> str:
    extra = ""
    if mode is not None:
        extra += f"group_mode = 0o{mode:o}\n"
    if uid is not None:
        extra += f"group_uid = {uid}\n"
    if gid is not None:
        extra += f"group_gid = {gid}\n"
    return ONE_DEVICE + extra


def open_errno(p, path: str, flags: int = os.O_RDWR) -> int:
    try:
        fd = p.open(path, flags)
    except OSError as exc:
        return exc.errno
    p.close(fd)
    return 0


def test_group_node_defaults_to_root_0600(tmp_path):
    m = vfiosim.Machine.from_file(write(tmp_path, ONE_DEVICE))
    assert open_errno(m.spawn(uid=0), "/dev/vfio/7") == 0
    assert open_errno(m.spawn(uid=1000, gid=1000), "/dev/vfio/7") == errno.EACCES


def test_group_mode_0660_with_gid_1000_admits_a_gid_1000_process(tmp_path):
    m = vfiosim.Machine.from_file(write(tmp_path, with_group_perms(mode=0o660, gid=1000)))
    assert open_errno(m.spawn(uid=1000, gid=1000), "/dev/vfio/7") == 0
    assert open_errno(m.spawn(uid=1000, gid=0), "/dev/vfio/7") == errno.EACCES
    assert open_errno(m.spawn(uid=2000, gid=2000), "/dev/vfio/7") == errno.EACCES
    assert open_errno(m.spawn(uid=0), "/dev/vfio/7") == 0        # CAP_DAC_OVERRIDE


def test_group_mode_0640_lets_the_group_read_but_not_write(tmp_path):
    m = vfiosim.Machine.from_file(write(tmp_path, with_group_perms(mode=0o640, gid=1000)))
    p = m.spawn(uid=1000, gid=1000)
    assert open_errno(p, "/dev/vfio/7", os.O_RDONLY) == 0
    assert open_errno(p, "/dev/vfio/7", os.O_RDWR) == errno.EACCES
    assert open_errno(p, "/dev/vfio/7", os.O_WRONLY) == errno.EACCES


def test_group_uid_owner_may_open_a_0600_group(tmp_path):
    m = vfiosim.Machine.from_file(write(tmp_path, with_group_perms(mode=0o600, uid=1000)))
    assert open_errno(m.spawn(uid=1000, gid=1000), "/dev/vfio/7") == 0
    assert open_errno(m.spawn(uid=1001, gid=1000), "/dev/vfio/7") == errno.EACCES


def test_group_mode_0666_lets_anybody_open(tmp_path):
    m = vfiosim.Machine.from_file(write(tmp_path, with_group_perms(mode=0o666)))
    assert open_errno(m.spawn(uid=4242, gid=4242), "/dev/vfio/7") == 0


def test_owner_bits_apply_to_the_owner_even_when_others_may_open(tmp_path):
    # generic_permission()/acl_permission_check(): the owner gets the owner
    # bits only, even if the "other" bits would allow more.
    m = vfiosim.Machine.from_file(write(tmp_path, with_group_perms(mode=0o066, uid=1000)))
    assert open_errno(m.spawn(uid=1000, gid=1000), "/dev/vfio/7") == errno.EACCES
    assert open_errno(m.spawn(uid=1001, gid=1001), "/dev/vfio/7") == 0


def test_unprivileged_group_owner_can_use_the_group_end_to_end(tmp_path):
    m = vfiosim.Machine.from_file(write(tmp_path, with_group_perms(mode=0o660, gid=1000)))
    p = m.spawn(uid=1000, gid=1000, rlimit_memlock=(4 << 30, 4 << 30))
    c, g = setup_v1(p, group_id=7)
    assert p.status()["VmLck"] > 0
    p.exit()
    assert m.pinned_pages() == 0


@pytest.mark.parametrize("key,value", [("group_mode", "0o10000"), ("group_mode", '"0660"'), ("group_uid", "-1")])
def test_bad_group_permission_values(tmp_path, key, value):
    exc, path = load_error(tmp_path, ONE_DEVICE + f"{key} = {value}\n")
    assert_names(exc, path, f"device[0].{key}", "an integer")


def test_behind_bridge_is_refused_for_a_device_that_shares_its_bus():
    """behind_bridge advertises a secondary bus reset as the device's own reset,
    which Linux uses only for a device alone on its bus (pci_parent_bus_reset)."""
    dev = '[[device]]\nbdf = "0000:01:00.{fn}"\nmodel = "edu"\nphb = 0\npe = 1\niommu_group = 0\n{extra}'
    text = ('[machine]\nname = "t"\nplatform = "powernv"\n[[phb]]\nindex = 0\n'
            + dev.format(fn=0, extra="") + dev.format(fn=1, extra="behind_bridge = true\n"))
    with pytest.raises(MachineFileError, match=r"device\[1\]\.behind_bridge.*device\[0\] \(0000:01:00.0\)"):
        vfiosim.Machine.from_toml(text)
    alone = text.replace('bdf = "0000:01:00.0"', 'bdf = "0000:02:00.0"')
    m = vfiosim.Machine.from_toml(alone)
    assert m.device("0000:01:00.1").reset_method == "bus"


@pytest.mark.parametrize("platform", ["powernv", "pseries"])
def test_an_empty_driver_is_no_driver_on_power_too(platform):
    """docs/machine-files.md: driver = "" is no driver.  The group is viable
    (no host driver owns its DMA) but has no /dev/vfio node, as on x86."""
    m = vfiosim.Machine.from_toml(TWO_PHBS.format(platform=platform).replace(
        'iommu_group = 1\n', 'iommu_group = 1\ndriver = ""\n'))
    assert m.device("0001:01:00.0").driver is None
    topo = {g["id"]: g for g in m.topology()["iommu_groups"]}
    assert topo[1]["viable"] is True and topo[1]["node"] is None
    assert topo[0]["node"] == "/dev/vfio/0"
