"""Builds the C preload shims (`vfiosim run`'s and `vfiosim record`'s) at install time (everything else is in pyproject.toml).

The shim is an LD_PRELOAD library, not a Python extension: it links only
against libc, and vfiosim.preload.library_path() finds it at run time.
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildShim(build_ext):
    def get_export_symbols(self, ext):  # not a Python module: no PyInit_ symbol
        return []


setup(
    ext_modules=[
        Extension(
            "vfiosim.preload._vfiosim_preload",
            sources=["src/vfiosim/preload/vfiosim_preload.c"],
            extra_compile_args=["-O2", "-fvisibility=hidden"],
            libraries=["dl", "pthread"],
        ),
        # `vfiosim record`'s pass-through recording shim (vfiosim.tracing.record).
        Extension(
            "vfiosim.tracing._vfiosim_record",
            sources=["src/vfiosim/tracing/vfiosim_record.c"],
            extra_compile_args=["-O2", "-fvisibility=hidden"],
            libraries=["dl", "pthread"],
        ),
    ],
    cmdclass={"build_ext": BuildShim},
)
