"""`vfiosim qemu-record --platform x86-iommufd --kernel-build DIR`: a guest that boots a
kernel built from source (scripts/build-iommufd-kernel.sh) rather than Debian's, whose
traces replay on the x86 preset with the trace's kernel configuration.  The build and
the boot are slow and stay out of the default run; this is the plumbing around them."""

from __future__ import annotations

import pytest

from vfiosim.qemu import QemuDemoUnavailable
from vfiosim.qemu.record import (PLATFORMS, bzimage_release, build_record_image, load_kernel_build,
                                 traces_in)


def fake_bzimage(version: bytes) -> bytes:
    data = bytearray(0x1000)
    data[0x202:0x206] = b"HdrS"
    data[0x20E:0x210] = (0x300).to_bytes(2, "little")      # the string at 0x300 + 0x200
    data[0x500:0x500 + len(version) + 1] = version + b"\0"
    return bytes(data)


def test_the_release_comes_from_the_bzimage_setup_header():
    assert bzimage_release(fake_bzimage(b"6.12.118 (root@host) #1 SMP PREEMPT_DYNAMIC")) == "6.12.118"
    with pytest.raises(QemuDemoUnavailable, match="not an x86 bzImage"):
        bzimage_release(b"\x7fELF" + bytes(0x400))


def test_a_kernel_build_directory_says_what_it_lacks(tmp_path):
    (tmp_path / "bzImage").write_bytes(fake_bzimage(b"6.12.118 #1"))
    with pytest.raises(QemuDemoUnavailable, match=r"no .*config, .*linux/iommufd\.h"):
        load_kernel_build(tmp_path)
    (tmp_path / "config").write_text("CONFIG_IOMMUFD=y\n")
    (tmp_path / "headers" / "include" / "linux").mkdir(parents=True)
    (tmp_path / "headers" / "include" / "linux" / "iommufd.h").write_text("/* uapi */\n")
    k = load_kernel_build(tmp_path)
    assert k.release == "6.12.118" and k.headers == tmp_path / "headers" / "include"


def test_the_iommufd_guest_needs_its_kernel_and_the_debian_ones_refuse_one(tmp_path):
    p = PLATFORMS["x86-iommufd"]
    assert p.built_kernel and p.machine == "x86" and p.modules == ()
    with pytest.raises(QemuDemoUnavailable, match="scripts/build-iommufd-kernel.sh"):
        build_record_image(p, log=lambda text: None)
    (tmp_path / "bzImage").write_bytes(fake_bzimage(b"6.12.118 #1"))
    (tmp_path / "config").write_text("CONFIG_IOMMUFD=y\n")
    (tmp_path / "headers" / "include" / "linux").mkdir(parents=True)
    (tmp_path / "headers" / "include" / "linux" / "iommufd.h").write_text("/* uapi */\n")
    with pytest.raises(QemuDemoUnavailable, match="boots Debian's kernel"):
        build_record_image(PLATFORMS["x86"], log=lambda text: None, kernel=load_kernel_build(tmp_path))


def test_the_iommufd_guest_records_the_x86_scenarios_and_the_iommufd_ones():
    names = {s.name for s in PLATFORMS["x86-iommufd"].scenarios}
    assert {s.name for s in PLATFORMS["x86"].scenarios} < names
    assert {"iommufd_edu_dma", "iommufd_families", "iommufd_edges", "iommufd_pages"} <= names


def test_traces_of_a_platform_without_a_preset_of_its_name_are_found(tmp_path):
    (tmp_path / "x86-iommufd").mkdir()
    (tmp_path / "x86-iommufd" / "a.jsonl").write_text("")
    assert list(traces_in(tmp_path)) == ["x86-iommufd"]


def test_a_kernel_goes_with_the_platform_of_its_configuration(tmp_path):
    (tmp_path / "bzImage").write_bytes(fake_bzimage(b"6.12.118 #1"))
    (tmp_path / "headers" / "include" / "linux").mkdir(parents=True)
    (tmp_path / "headers" / "include" / "linux" / "iommufd.h").write_text("/* uapi */\n")
    (tmp_path / "config").write_text("CONFIG_IOMMUFD=y\nCONFIG_VFIO_DEVICE_CDEV=y\n# CONFIG_VFIO_CONTAINER is not set\n"
                                     "CONFIG_IOMMUFD_VFIO_CONTAINER=y\n")
    k = load_kernel_build(tmp_path)
    assert k.has(PLATFORMS["x86-iommufd-compat"].kernel_options)
    assert not k.has(PLATFORMS["x86-iommufd"].kernel_options)
    with pytest.raises(QemuDemoUnavailable, match="is not a kernel for x86-iommufd: .*CONFIG_VFIO_CONTAINER=y"):
        build_record_image(PLATFORMS["x86-iommufd"], log=lambda text: None, kernel=k)
