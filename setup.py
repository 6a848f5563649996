"""Install-time steps that pyproject.toml cannot declare (everything else is there):

* the C parts of `vfiosim run` and `vfiosim record`, built as extensions: the
  run shim and the daemon's helper library (which share
  preload/vfiosim_protocol.h) and the recording shim.  They link only against
  libc and are not Python extensions: vfiosim.preload.library_path(),
  daemon_library_path() and vfiosim.tracing.record find them at run time;
* the fuzzers' seed corpus and regression inputs (fuzz/corpus, fuzz/regressions
  of the repository), copied into the package as vfiosim/fuzz_inputs/ so that
  `vfiosim fuzz` installed from a wheel starts from them too (vfiosim.fuzz.fuzz_root);
* the C examples (examples/*.c), copied into vfiosim/qemu/guest/examples/: the
  guests of `vfiosim qemu-demo --platform x86` and `vfiosim qemu-record` run them.
"""

import os
import shutil

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
FUZZ_INPUTS = ("corpus", "regressions")


class BuildShim(build_ext):
    def get_export_symbols(self, ext):  # not a Python module: no PyInit_ symbol
        return []


class BuildPyWithCopies(build_py):
    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "vfiosim", "fuzz_inputs")
        for name in FUZZ_INPUTS:
            source = os.path.join(HERE, "fuzz", name)
            if os.path.isdir(source):
                shutil.copytree(source, os.path.join(target, name), dirs_exist_ok=True)
        examples = os.path.join(HERE, "examples")
        if os.path.isdir(examples):
            target = os.path.join(self.build_lib, "vfiosim", "qemu", "guest", "examples")
            os.makedirs(target, exist_ok=True)
            for name in sorted(os.listdir(examples)):
                if name.endswith(".c"):
                    shutil.copy2(os.path.join(examples, name), target)


setup(
    ext_modules=[
        Extension(
            "vfiosim.preload._vfiosim_preload",
            sources=["src/vfiosim/preload/vfiosim_preload.c"],
            include_dirs=["src/vfiosim/preload"],
            depends=["src/vfiosim/preload/vfiosim_protocol.h", "src/vfiosim/preload/x86_alu.h"],
            extra_compile_args=["-O2", "-fvisibility=hidden"],
            libraries=["dl", "pthread"],
        ),
        Extension(
            "vfiosim.preload._vfiosim_daemon",
            sources=["src/vfiosim/preload/vfiosim_daemon.c"],
            include_dirs=["src/vfiosim/preload"],
            depends=["src/vfiosim/preload/vfiosim_protocol.h", "src/vfiosim/preload/vfiosim_procmap.h"],
            extra_compile_args=["-O2", "-fvisibility=hidden"],
        ),
        # virtio-net's native burst path (kernel/pci/virtio_native.py; optional: the
        # device runs its Python path without it).
        Extension(
            "vfiosim.kernel.pci._vring",
            sources=["src/vfiosim/kernel/pci/_vring.c"],
            extra_compile_args=["-O2", "-fvisibility=hidden"],
            optional=True,
        ),
        # The one-entry operations of TCE tables (kernel/iommu/tce.py; optional: a
        # Python base does the same without it).
        Extension(
            "vfiosim.kernel.iommu._tce",
            sources=["src/vfiosim/kernel/iommu/_tce.c"],
            include_dirs=["src/vfiosim/include"],
            depends=["src/vfiosim/include/vfiosim_ndarray.h"],
            extra_compile_args=["-O2", "-fvisibility=hidden"],
            optional=True,
        ),
        # The usual one-page pin of a real process's memory (transport/host.py's
        # HostMM.pin_fast(); optional: a Python function does the same without it).
        Extension(
            "vfiosim.transport._pin",
            sources=["src/vfiosim/transport/_pin.c"],
            include_dirs=["src/vfiosim/include", "src/vfiosim/preload"],
            depends=["src/vfiosim/include/vfiosim_ndarray.h", "src/vfiosim/preload/vfiosim_procmap.h"],
            extra_compile_args=["-O2", "-fvisibility=hidden"],
            optional=True,
        ),
        # `vfiosim record`'s pass-through recording shim (vfiosim.tracing.record).
        Extension(
            "vfiosim.tracing._vfiosim_record",
            sources=["src/vfiosim/tracing/vfiosim_record.c"],
            extra_compile_args=["-O2", "-fvisibility=hidden"],
            libraries=["dl", "pthread"],
        ),
    ],
    cmdclass={"build_ext": BuildShim, "build_py": BuildPyWithCopies},
)
