"""The x86 preset and platform: machine-file schema, topology, and the CLI on it."""

from __future__ import annotations

import json
import re
from importlib import resources

import pytest

import vfiosim
from vfiosim.cli import main

X86_TOML = resources.files("vfiosim.presets").joinpath("x86.toml").read_text()

MINIMAL = """
[machine]
name = "one-edu"
platform = "x86"

[[device]]
bdf = "0000:03:00.0"
model = "edu"
iommu_group = 9
"""


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# -- the preset ------------------------------------------------------------------------------------


def test_x86_preset_groups_devices_and_drivers():
    m = vfiosim.Machine.preset("x86")
    assert m.platform == "x86" and m.name == "q35" and m.page_size == 4096
    assert m.iommu_groups() == {0: ["0000:00:00.0"], 1: ["0000:00:01.0"], 2: ["0000:00:02.0"],
                                3: ["0000:00:1f.0", "0000:00:1f.2", "0000:00:1f.3"],
                                4: ["0000:01:00.0"], 5: ["0000:02:00.0"]}
    assert sorted(m.kernel.dev_nodes) == ["/dev/vfio/4", "/dev/vfio/5", "/dev/vfio/vfio"]
    drivers = {bdf: d.driver for bdf, d in m.kernel.devices.items()}
    assert drivers == {"0000:00:00.0": None, "0000:00:01.0": "pcieport", "0000:00:02.0": "pcieport",
                       "0000:00:1f.0": "lpc_ich", "0000:00:1f.2": "ahci", "0000:00:1f.3": "i801_smbus",
                       "0000:01:00.0": "vfio-pci", "0000:02:00.0": "vfio-pci"}
    assert m.device("0000:00:01.0").config.read(0x0E, 1) == 1          # a bridge header
    assert m.device("0000:00:1f.2").class_code == 0x010601
    assert m.kernel.pes == [] and m.kernel.eeh_enabled() is False
    unit = m.iommu_units[0].describe()
    assert (unit["address_width"], unit["page_sizes"]) == (39, 0x40201000)
    assert unit["reserved_regions"] == [{"start": 0xFEE00000, "end": 0xFEEFFFFF, "type": "msi"}]
    assert vfiosim.Machine.preset("q35").name == "q35"


def test_a_group_with_host_drivers_is_not_viable():
    m = vfiosim.Machine.preset("x86")
    groups = {g["id"]: g for g in m.topology()["iommu_groups"]}
    assert groups[3]["viable"] is False and groups[3]["node"] is None
    assert groups[4]["viable"] is True and groups[4]["node"] == "/dev/vfio/4"
    # The host bridge (no driver) and the root ports (pcieport manages its own
    # DMA) claim no DMA ownership; without vfio-pci they still get no node.
    assert [groups[g]["node"] for g in (0, 1, 2)] == [None, None, None]


def test_minimal_x86_machine_file_takes_the_defaults():
    m = vfiosim.Machine.from_toml(MINIMAL)
    assert m.iommu_groups() == {9: ["0000:03:00.0"]}
    unit = m.iommu_units[0].describe()
    assert (unit["address_width"], unit["snoop_control"], unit["interrupt_remapping"]) == (39, False, True)
    assert m.kernel.vfio.iommu_drivers.names() == ["vfio-iommu-type1"]


@pytest.mark.parametrize("text,key,expected", [
    (MINIMAL + "\n[[phb]]\nindex = 0\n", "phb", "no [[phb]]"),
    (MINIMAL.replace('platform = "x86"', 'platform = "powernv"') + "\n[[phb]]\nindex = 0\n[iommu]\n",
     "iommu", "x86"),
    (MINIMAL.replace('bdf = "0000:03:00.0"', 'bdf = "0001:03:00.0"'), "device[0].bdf", "domain 0000"),
    (MINIMAL.replace('model = "edu"', 'model = "pcie-root-port"\ndriver = "vfio-pci"'), "device[0].driver",
     "vfio-pci binds only"),
    (MINIMAL + "\n[iommu]\npage_sizes = [\"2M\"]\n", "iommu.page_sizes", "4K"),
    (MINIMAL + "\n[iommu]\ncolour = 1\n", "iommu.colour", "one of the keys"),
    (MINIMAL + "\n[iommu]\nreserved_regions = [{ start = 0, size = 0 }]\n", "iommu.reserved_regions[0].size",
     "non-zero"),
    (MINIMAL + "\n[iommu]\nreserved_regions = [{ start = 0, size = \"1M\", type = \"odd\" }]\n",
     "iommu.reserved_regions[0].type", "msi"),
    (MINIMAL + "\n[vfio_iommu_type1]\ndma_entry_limit = -1\n", "vfio_iommu_type1.dma_entry_limit", "integer"),
    (MINIMAL.replace('iommu_group = 9', 'iommu_group = 9\nphb = 0'), "device[0].phb", "no phb"),
])
def test_x86_machine_file_errors_name_the_key(text, key, expected):
    with pytest.raises(vfiosim.MachineFileError) as exc:
        vfiosim.Machine.from_toml(text, source="t.toml")
    assert exc.value.key == key, str(exc.value)
    assert expected in str(exc.value)


def test_host_device_models_are_for_x86_only():
    text = """
[machine]
name = "p"
platform = "powernv"
[[phb]]
index = 0
[[device]]
bdf = "0000:00:00.0"
model = "pcie-root-port"
phb = 0
iommu_group = 0
"""
    with pytest.raises(vfiosim.MachineFileError) as exc:
        vfiosim.Machine.from_toml(text)
    assert exc.value.key == "device[0].model"


# -- the CLI ----------------------------------------------------------------------------------------


def test_demo_on_x86_runs_the_type1_flow(capsys):
    rc, out, err = run(capsys, "demo", "--machine", "x86")
    assert rc == 0, out + err
    assert "ioctl(VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU)" in out
    assert "ioctl(VFIO_IOMMU_GET_INFO)" in out and "page sizes 0x40201000" in out
    assert "usable IOVA: 0x0..0xfedfffff, 0xfef00000..0x7fffffffff" in out
    assert "VFIO_IOMMU_ENABLE" not in out and "SPAPR" not in out
    assert re.search(r"ioctl\(VFIO_IOMMU_MAP_DMA, 0x100000\+0x4000, READ\)\s+0\s+VmLck\s+16 kB", out), out
    assert re.search(r"ioctl\(VFIO_IOMMU_UNMAP_DMA\)\s+0x8000 bytes unmapped\s+VmLck\s+0 kB", out), out
    assert "the destination buffer equals the source" in out
    assert "after exit, 0 pages pinned, VmLck 0 kB" in out


def test_demo_on_x86_with_64k_pages_exits_2(capsys):
    rc, _, err = run(capsys, "demo", "--machine", "x86", "--page-size", "65536")
    assert rc == 2 and "4 KiB" in err


def test_topology_of_x86_text(capsys):
    rc, out, _ = run(capsys, "topology", "--machine", "x86")
    assert rc == 0
    assert "platform x86" in out and "IOMMU drivers: vfio-iommu-type1" in out and "EEH not available" in out
    assert "Intel VT-d dmar0 (intel-iommu, caching mode)" in out
    assert "39-bit IOVA (0x0..0x7fffffffff), page sizes 4K|2M|1G" in out
    assert "reserved 0xfee00000..0xfeefffff (msi)" in out
    assert re.search(r"group 3: \(no VFIO node: bound to host drivers\), not viable, identity domain \(host\), "
                     r"devices 0000:00:1f\.0, 0000:00:1f\.2, 0000:00:1f\.3", out), out
    assert "group 4: /dev/vfio/4, viable, identity domain (host), devices 0000:01:00.0" in out
    assert "0000:00:00.0 8086:29c0 class 060000 (q35-host-bridge), driver none, group 0, reset none" in out
    assert "0000:01:00.0 1234:11e8 class 00ff00 (edu), driver vfio-pci, group 4, BAR0 0xfe000000+0x100000" in out


def test_topology_of_x86_json_matches_the_machine(capsys):
    rc, out, _ = run(capsys, "topology", "--machine", "x86", "--json")
    assert rc == 0
    assert json.loads(out) == json.loads(json.dumps(vfiosim.Machine.preset("x86").topology()))
