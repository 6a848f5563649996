"""Builds the C parts of `vfiosim run` at install time (everything else is in pyproject.toml).

The shim is an LD_PRELOAD library and the daemon's helper a ctypes library,
not Python extensions: they link only against libc, and
vfiosim.preload.library_path()/daemon_library_path() find them at run time.
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
            include_dirs=["src/vfiosim/preload"],
            depends=["src/vfiosim/preload/vfiosim_protocol.h"],
            extra_compile_args=["-O2", "-fvisibility=hidden"],
            libraries=["dl", "pthread"],
        ),
        Extension(
            "vfiosim.preload._vfiosim_daemon",
            sources=["src/vfiosim/preload/vfiosim_daemon.c"],
            include_dirs=["src/vfiosim/preload"],
            depends=["src/vfiosim/preload/vfiosim_protocol.h"],
            extra_compile_args=["-O2", "-fvisibility=hidden"],
        ),
    ],
    cmdclass={"build_ext": BuildShim},
)
