"""User-written device models: registration, machine files, the bus-master
interface they DMA through, and the command line's --device-module."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import vfiosim
from vfiosim import devices
from vfiosim.cli import main

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "copier_device.py"


class Probe(devices.PciDevice):
    """A device that only DMAs when told to, for testing the interface."""

    model = "probe"

    def __init__(self, bdf: str, *, dma_mask: int) -> None:
        super().__init__(bdf, vendor=0x1B36, device=0x00F1, class_code=0xFF0000)
        self.add_bar(0, 4096)
        self.dma_mask = dma_mask


@pytest.fixture
def probe_model():
    devices.register_model("probe", lambda bdf, *, dma_mask: Probe(bdf, dma_mask=dma_mask))
    yield
    devices.unregister_model("probe")


def machine_with(model: str, platform: str = "powernv") -> vfiosim.Machine:
    if platform == "x86":
        text = f"""
[machine]
name = "t"
platform = "x86"
[iommu]
model = "intel-iommu"
[[device]]
bdf = "0000:03:00.0"
model = "{model}"
iommu_group = 5
"""
    else:
        text = f"""
[machine]
name = "t"
platform = "{platform}"
[[phb]]
index = 0
[[device]]
bdf = "0000:01:00.0"
model = "{model}"
phb = 0
pe = 1
iommu_group = 0
"""
    return vfiosim.Machine.from_toml(text)


def test_registration_rules():
    f = lambda bdf, *, dma_mask: Probe(bdf, dma_mask=dma_mask)    # noqa: E731
    with pytest.raises(ValueError, match="built in"):
        devices.register_model("edu", f)
    with pytest.raises(ValueError, match="built in"):
        devices.register_model("pcie-root-port", f)               # an x86 host device's name
    with pytest.raises(ValueError, match="lower-case"):
        devices.register_model("Bad Name", f)
    with pytest.raises(TypeError, match="callable"):
        devices.register_model("probe", 42)                        # type: ignore[arg-type]
    devices.register_model("probe", f)
    try:
        with pytest.raises(ValueError, match="already registered"):
            devices.register_model("probe", f)
        devices.register_model("probe", f, replace=True)
        assert "probe" in devices.model_names()
    finally:
        devices.unregister_model("probe")
    assert "probe" not in devices.model_names()
    with pytest.raises(KeyError):
        devices.unregister_model("probe")


def test_unknown_model_names_the_way_to_register_one():
    with pytest.raises(vfiosim.MachineFileError, match=r"device\[0\]\.model.*register_model.*--device-module"):
        machine_with("nosuch")


@pytest.mark.parametrize("platform", ["powernv", "pseries", "x86"])
def test_a_registered_model_is_a_vfio_pci_device_that_dmas_through_the_iommu(probe_model, platform):
    m = machine_with("probe", platform)
    bdf = "0000:03:00.0" if platform == "x86" else "0000:01:00.0"
    dev = m.device(bdf)
    assert isinstance(dev, Probe) and dev.bdf == bdf
    gid = next(g for g, bdfs in m.iommu_groups().items() if bdf in bdfs)
    from vfiosim import client
    backend = client.SimBackend(m)
    with client.open_device(bdf, backend) as d:
        assert d.config.read16(0x00) == 0x1B36 and d.config.read16(0x02) == 0x00F1
        d.enable_bus_master()
        buf = d.container.dma_alloc(64 << 10)
        buf.array()[:] = np.arange(64 << 10) % 253
        out = np.zeros(64 << 10, dtype=np.uint8)
        dev.bus_master.dma_read_into(buf.iova, out)               # the public interface, in bulk
        assert np.array_equal(out, buf.array())
        dev.bus_master.dma_write(buf.iova + 100, b"\x07" * 1000)
        assert bytes(buf.array()[100:1100]) == b"\x07" * 1000
        with pytest.raises(devices.DmaError):
            dev.bus_master.dma_read(buf.iova + (64 << 10), 4096)  # past the mapping
    assert gid in m.iommu_groups()


def test_a_factory_must_build_a_device_at_the_address_asked():
    devices.register_model("liar", lambda bdf, *, dma_mask: Probe("0000:09:00.0", dma_mask=dma_mask))
    devices.register_model("notadevice", lambda bdf, *, dma_mask: object())
    try:
        with pytest.raises(ValueError, match="'liar' built a device at 0000:09:00.0"):
            machine_with("liar")
        with pytest.raises(TypeError, match="'notadevice' returned object"):
            machine_with("notadevice")
    finally:
        devices.unregister_model("liar")
        devices.unregister_model("notadevice")


def test_reset_returns_a_model_to_its_power_on_config(probe_model):
    m = machine_with("probe")
    dev = m.device("0000:01:00.0")
    dev.config_write(0x04, 2, 0x6)
    dev.reset()
    assert dev.config_read(0x04, 2) == 0          # finish() was taken for the model by the machine


def test_copier_example_runs_and_verifies():
    out = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT / "src")})
    assert out.returncode == 0, out.stderr
    assert "through the IOMMU: verified" in out.stdout
    assert "froze the PE" in out.stdout and "EEH: Frozen PHB#0-PE#1" in out.stdout


def test_cli_device_module_loads_a_model_for_a_machine_file(capsys):
    toml = str(ROOT / "examples" / "copier.toml")
    try:
        assert main(["topology", "--machine", toml, "--device-module", str(EXAMPLE)]) == 0
        text = capsys.readouterr().out
        assert "0000:02:00.0 1b36:00f0 class 088000 (copier), driver vfio-pci" in text
        assert text.count("PHB4 PHB#0") == 1          # two PEs under one PHB heading
    finally:
        if "copier" in devices.model_names():
            devices.unregister_model("copier")
    assert main(["topology", "--machine", toml]) == 2
    assert "register_model" in capsys.readouterr().err
    assert main(["topology", "--device-module", "no_such_module_xyz"]) == 2
    assert "no_such_module_xyz" in capsys.readouterr().err
