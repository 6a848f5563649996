"""The pytest plugin (vfiosim.pytest_plugin), run in throwaway test sessions with pytester."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import vfiosim

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = ["-p", "vfiosim.pytest_plugin"]


def test_machine_fixture_follows_marker_param_option_and_default(pytester):
    pytester.makepyfile("""
        import pytest

        def test_default(vfio_machine):
            assert vfio_machine.platform == "powernv" and vfio_machine.page_size == 4096

        @pytest.mark.vfio_machine("pseries", page_size=65536)
        def test_marker(vfio_machine):
            assert vfio_machine.platform == "pseries" and vfio_machine.page_size == 65536

        @pytest.mark.vfio_machine(kernel="3.10")
        def test_marker_kwargs(vfio_machine):
            assert vfio_machine.kernel_version == "3.10"

        @pytest.mark.parametrize("vfio_machine", ["powernv", {"name": "pseries", "page_size": 65536}],
                                 indirect=True)
        def test_param(vfio_machine):
            assert vfio_machine.platform in ("powernv", "pseries")

        machines = []

        def test_fresh_a(vfio_machine):
            machines.append(vfio_machine)

        def test_fresh_b(vfio_machine):
            machines.append(vfio_machine)
            assert machines[0] is not machines[1]
    """)
    result = pytester.runpytest(*PLUGIN)
    result.assert_outcomes(passed=7)


def test_option_and_environment_choose_the_machine(pytester, monkeypatch):
    pytester.makepyfile("""
        def test_it(vfio_machine):
            assert vfio_machine.platform == "pseries"
    """)
    pytester.runpytest(*PLUGIN, "--vfio-machine", "pseries").assert_outcomes(passed=1)
    monkeypatch.setenv("VFIOSIM_MACHINE", "pseries")
    pytester.runpytest(*PLUGIN).assert_outcomes(passed=1)


def test_a_mistyped_machine_is_named_with_where_it_came_from_and_the_presets(pytester, monkeypatch):
    pytester.makepyfile("def test_it(vfio_machine):\n    pass\n")
    monkeypatch.setenv("VFIOSIM_MACHINE", "powrenv")
    result = pytester.runpytest(*PLUGIN)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*$VFIOSIM_MACHINE: unknown machine 'powrenv'*presets: powernv, powernv-virtio, pseries, x86, x86-ioat, x86-virtio*"])
    result = pytester.runpytest(*PLUGIN, "--vfio-machine", "pseriess")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*--vfio-machine: unknown machine 'pseriess'*presets: powernv, powernv-virtio, pseries, x86, x86-ioat, x86-virtio*"])


def test_process_is_the_default_backend_and_exits(pytester):
    pytester.makepyfile("""
        import pytest
        from vfiosim import client

        seen = []

        @pytest.mark.vfio_process(uid=1000, rlimit_memlock=(1 << 20, 1 << 20))
        def test_user(vfio_process, vfio_backend):
            assert vfio_process.getuid() == 1000 and vfio_process.getrlimit(8) == (1 << 20, 1 << 20)
            assert client.get_backend() is vfio_backend
            seen.append(vfio_process)

        def test_after():
            assert not seen[0].alive                          # the process exited after its test
            assert client.backend._default is None            # the default backend was restored

        def test_driver_code_needs_no_backend(vfio_machine, vfio_process):
            with client.open_device("1234:11e8") as dev:
                dev.bar(0).write32(4, 0)
                assert dev.bar(0).read32(4) == 0xFFFFFFFF
            assert vfio_machine.pinned_pages() == 0
    """)
    pytester.runpytest(*PLUGIN).assert_outcomes(passed=3)


def test_markers_are_registered(pytester):
    pytester.makepyfile("""
        import pytest

        @pytest.mark.vfio_machine("pseries")
        def test_it(vfio_machine):
            pass
    """)
    result = pytester.runpytest(*PLUGIN, "--strict-markers")
    result.assert_outcomes(passed=1)
    markers = pytester.runpytest(*PLUGIN, "--markers")
    markers.stdout.fnmatch_lines(["*vfio_machine(name='powernv'*", "*vfio_process(uid=0*"])


def test_the_tutorials_test_file_passes(pytester):
    """The test file of docs/tutorial.md section 8, as a user would run it."""
    text = (ROOT / "docs" / "tutorial.md").read_text()
    block = re.search(r"^```python file=test_edu.py\n(.*?)^```", text, re.S | re.M)
    assert block is not None
    code = block.group(1)
    if "x86" not in vfiosim.preset_names():
        code = code.replace(', "x86"]', "]")
    pytester.makepyfile(test_edu=code)
    result = pytester.runpytest(*PLUGIN)
    result.assert_outcomes(passed=4 if '"x86"' in code else 3)    # 3 (or 2) machines, and the 64K test


def test_the_entry_point_is_declared():
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.entry-points.pytest11]", 1)[1].split("[", 1)[0]
    assert '"vfiosim.pytest_plugin" = "vfiosim.pytest_plugin"' in section
    assert "-p vfiosim.pytest_plugin" in text                 # this project's own tests use it


@pytest.mark.vfio_machine("pseries")
def test_this_suite_has_the_plugin(vfio_machine, vfio_process):
    assert vfio_machine.platform == "pseries" and vfio_process.machine is vfio_machine


def test_a_test_runs_in_every_iommu_mode(pytester):
    pytester.makepyfile("""
        import numpy as np
        import pytest
        from vfiosim import client

        seen = {}

        def test_edu_dma(vfio_iommu_mode, vfio_machine, vfio_process):
            with client.open_device("1234:11e8") as dev:
                c = dev.container
                seen[vfio_iommu_mode.name] = (c.iommufd, client.iommu_name(c.iommu_type),
                                              vfio_machine.kernel.dev_nodes.get("/dev/iommu") is not None,
                                              dev.cdev)
                bar = dev.bar(0)
                dev.enable_bus_master()
                src = c.dma_alloc(4096, max_iova=(1 << 28) - 1)
                dst = c.dma_alloc(4096, max_iova=(1 << 28) - 1)
                src.array()[:] = np.arange(4096) % 251
                for reg, value in ((0x80, src.iova), (0x88, 0x40000), (0x90, 4096), (0x98, 1),
                                   (0x80, 0x40000), (0x88, dst.iova), (0x90, 4096), (0x98, 3)):
                    bar.write64(reg, value)
                assert np.array_equal(dst.array(), src.array())
            assert vfio_machine.pinned_pages() == 0

        @pytest.mark.vfio_iommu_modes("type1v2", "iommufd")
        def test_some(vfio_iommu_mode):
            seen.setdefault("some", []).append(vfio_iommu_mode.name)

        def test_after():
            assert seen["type1"] == (False, "type1", False, None)
            assert seen["type1v2"] == (False, "type1v2", False, None)
            assert seen["iommufd_compat_type1"] == (False, "type1", True, None)
            assert seen["iommufd_compat_type1v2"] == (False, "type1v2", True, None)
            assert seen["iommufd"] == (True, "iommufd", True, "/dev/vfio/devices/vfio0")
            assert seen["some"] == ["type1v2", "iommufd"]
            assert client.default_iommu() is None             # restored after each test
    """)
    result = pytester.runpytest(*PLUGIN, "-v")
    result.assert_outcomes(passed=8)
    result.stdout.fnmatch_lines(["*test_edu_dma?iommufd_compat_type1v2? PASSED*"])
    # The option narrows every test's modes.
    only = pytester.runpytest(*PLUGIN, "--vfio-iommu-mode=iommufd", "-k", "test_some or test_edu")
    only.assert_outcomes(passed=2)
    bad = pytester.runpytest(*PLUGIN, "--vfio-iommu-mode=type3")
    assert bad.ret != 0 and "unknown IOMMU mode 'type3'" in str(bad.stderr) + str(bad.stdout)


def test_iommu_modes_need_an_x86_machine(pytester):
    pytester.makepyfile("""
        import pytest

        @pytest.mark.vfio_machine("powernv")
        @pytest.mark.vfio_iommu_modes("iommufd")
        def test_it(vfio_iommu_mode, vfio_machine):
            pass
    """)
    result = pytester.runpytest(*PLUGIN, "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*IOMMU mode iommufd needs an x86 machine: VFIO_DEVICE_CDEV depends on*"])
