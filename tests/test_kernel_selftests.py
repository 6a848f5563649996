"""The Linux kernel's own VFIO selftests, unmodified, under `vfiosim run` (docs/selftests.md).

`vfiosim selftests` end to end: Debian's linux-source package (fetched once into
~/.cache/vfiosim/selftests; about 160 MB), its tools/testing/selftests/vfio built
with its own Makefile, every program run on each machine of selftests.RUNS.  About
two minutes once the package is cached.  When the package cannot be had (no network
to the Debian archive, no apt-get) or built (no make, no uuid-dev), the test is
skipped with the reason (.ci/run installs uuid-dev as root).
"""

from __future__ import annotations

import pytest

from vfiosim import selftests as S

pytestmark = pytest.mark.selftests


@pytest.fixture(scope="module")
def report() -> S.Report:
    try:
        return S.run_selftests()
    except S.SelftestsUnavailable as exc:
        pytest.skip(f"the kernel's VFIO selftests cannot be built here: {exc}")


def _hugetlb_passes() -> int:
    """The dma_map_unmap variants on hugetlb pages run (5 IOMMU modes each) when the host has such pages."""
    return sum(5 for kib in (2048, 1048576) if S._free_hugepages(kib))


def test_every_selftest_result_is_the_expected_one(report):
    unexpected = [f"{r.run}: {r.name}: {r.status}, expected {r.expected} ({r.detail})" for r in report.results
                  if not r.ok]
    assert not unexpected, "\n".join(unexpected)
    # Each run ran all seven programs, and each non-PASS is named with its reason.
    for run in S.RUNS:
        programs = {r.name.split(".")[0] for r in report.results if r.run == run.name}
        assert programs == {"vfio_dma_mapping_test", "vfio_dma_mapping_mmio_test", "vfio_iommufd_setup_test",
                            "vfio_pci_device_test", "vfio_pci_device_init_perf_test", "vfio_pci_driver_test",
                            "vfio_pci_sriov_uapi_test"}, run.name
    assert all(r.why for r in report.results if r.status != "PASS")


@pytest.mark.parametrize("run,passes", [("x86-iommufd", 48), ("x86-iommufd-compat", 44), ("x86-virtio-iommufd", 48),
                                       ("x86-ioat-iommufd", 82)])
def test_the_expected_number_pass(report, run, passes):
    got = sorted(r.name for r in report.results if r.run == run and r.status == "PASS")
    assert len(got) == passes + _hugetlb_passes(), got


def test_what_passes_covers_every_iommu_mode_and_both_interrupt_kinds(report):
    passed = {(r.run, r.name) for r in report.results if r.status == "PASS"}
    modes = ["vfio_type1_iommu", "vfio_type1v2_iommu", "iommufd_compat_type1", "iommufd_compat_type1v2", "iommufd"]
    for run in ("x86-iommufd", "x86-iommufd-compat", "x86-virtio-iommufd"):
        for mode in modes:
            assert (run, f"vfio_dma_mapping_test.vfio_dma_mapping_test.{mode}_anonymous.dma_map_unmap") in passed
            assert (run, f"vfio_dma_mapping_test.vfio_dma_map_limit_test.{mode}.unmap_all") in passed
            assert (run, f"vfio_pci_device_init_perf_test.vfio_pci_device_init_perf_test.{mode}.init") in passed
        for case in ("bind", "get_info_without_bind_fails", "bind_bad_iommufd_fails", "repeated_bind_fails",
                     "attach_detatch_pt", "attach_invalid_pt_fails"):
            assert (run, f"vfio_iommufd_setup_test.vfio_cdev.{case}") in passed
        for case in ("config_space_read_write", "validate_bars", "reset"):
            assert (run, f"vfio_pci_device_test.vfio_pci_device_test.{case}") in passed
    # A BAR's mmap mapped for peer-to-peer DMA through VFIO's Type1, refused by iommufd.
    for mode in modes:
        assert ("x86-iommufd", f"vfio_dma_mapping_mmio_test.vfio_dma_mapping_mmio_test.{mode}.map_bar_misaligned") \
            in passed
    # iommufd's IOVA overflow check (EOVERFLOW), in Linux 6.12 already.
    for mode in modes[2:]:
        assert ("x86-iommufd", f"vfio_dma_mapping_test.vfio_dma_map_limit_test.{mode}.overflow") in passed
    assert ("x86-iommufd-compat", "vfio_dma_mapping_test.vfio_dma_map_limit_test.vfio_type1_iommu.overflow") in passed
    # MSI on edu, MSI-X on virtio-net: each vector's eventfd fires on VFIO_DEVICE_SET_IRQS' trigger.
    assert ("x86-iommufd", "vfio_pci_device_test.vfio_pci_irq_test.msi.enable_trigger_disable") in passed
    assert ("x86-virtio-iommufd", "vfio_pci_device_test.vfio_pci_irq_test.msix.enable_trigger_disable") in passed


def test_the_driver_test_drives_the_ioat_dma_engine_in_every_iommu_mode(report):
    """vfio_pci_driver_test's ioat driver probes 8086:2021 and has the device memcpy between
    IOVAs (once, 65535 times, from and to an unmapped IOVA) and raise its MSI-X vector, in all
    five IOMMU modes; where no such device is, the program skips itself."""
    modes = ["vfio_type1_iommu", "vfio_type1v2_iommu", "iommufd_compat_type1", "iommufd_compat_type1v2", "iommufd"]
    cases = ["init_remove", "memcpy_success", "memcpy_from_unmapped_iova", "memcpy_to_unmapped_iova", "send_msi",
             "mix_and_match", "memcpy_storm"]
    got = {r.name: r.status for r in report.results if r.run == "x86-ioat-iommufd"
           and r.name.startswith("vfio_pci_driver_test.")}
    assert got == {f"vfio_pci_driver_test.vfio_pci_driver_test.{mode}.{case}": "PASS" for mode in modes
                   for case in cases}
    for run in ("x86-iommufd", "x86-iommufd-compat", "x86-virtio-iommufd"):
        assert [(r.name, r.status) for r in report.results if r.run == run
                and r.name.startswith("vfio_pci_driver_test")] == [("vfio_pci_driver_test", "SKIP")]


def test_tap_parsing_names_what_did_not_report():
    """A program that stops before its plan is done is a FAIL, not a shorter list."""
    out = "TAP version 13\n1..3\n# Starting\nok 1 a.b\n#  RUN  a.c ...\nsome assertion\n"
    assert S.parse_tap("p", out, 139) == [("p.a.b", "PASS", ""),
                                          ("p", "FAIL", "planned 3 tests, reported 1, exit status 139: "
                                                        "some assertion")]
    assert S.parse_tap("p", "1..0 # SKIP no PF\n", 4) == [("p", "SKIP", "no PF")]
    assert S.parse_tap("p", "No driver found for device X\n", 4) == [("p", "SKIP", "No driver found for device X")]
    assert S.parse_tap("p", "", 1) == [("p", "FAIL", "exit status 1: no output")]
    out = "1..2\nok 1 f.x # SKIP MSI-x: not supported\n#  RUN  f.y ...\n# f.c:9:y:Expected a (1) == b (2)\nnot ok 2 f.y\n"
    assert S.parse_tap("p", out, 1) == [("p.f.x", "SKIP", "MSI-x: not supported"),
                                        ("p.f.y", "FAIL", "f.c:9:y:Expected a (1) == b (2)")]
