"""pytest plugin: test userspace drivers on simulated machines, without hardware.

Installed with vfiosim (entry point ``pytest11``); a project without the
installed package loads it with ``-p vfiosim.pytest_plugin``.  Fixtures:

``vfio_machine``
    A fresh :class:`vfiosim.Machine` for each test.  Which one: the
    ``vfio_machine`` marker (``@pytest.mark.vfio_machine("pseries",
    page_size=65536, kernel="6.12")``), else indirect parametrization
    (``@pytest.mark.parametrize("vfio_machine", ["powernv", "pseries"],
    indirect=True)``), else ``--vfio-machine`` / ``$VFIOSIM_MACHINE``, else
    the default machine (``powernv``).  Names are presets or machine files.

``vfio_process``
    A process on that machine (root, RLIMIT_MEMLOCK 8 MiB unless the
    ``vfio_process(uid=..., rlimit_memlock=(soft, hard))`` marker says
    otherwise).  While the test runs it is the client's default backend, so
    ``vfiosim.client.Container()`` and ``open_device()`` without a backend
    use it.  It exits after the test.

``vfio_backend``
    The :class:`vfiosim.client.SimBackend` of ``vfio_process``.

``vfio_iommu_mode``
    A test that asks for it runs once in every IOMMU mode of an x86 host
    (:data:`IOMMU_MODES`), or in those the ``vfio_iommu_modes("type1v2",
    "iommufd")`` marker or ``--vfio-iommu-mode=NAME[,NAME]`` names.  Each mode
    is a kernel configuration of the machine and the interface the client
    uses by default (``client.use_iommu``):

    ==========================  ===========================================  =====================
    mode                        kernel configuration (vfio_machine)          client ``iommu=``
    ==========================  ===========================================  =====================
    ``type1``                   Debian's 6.12 (no iommufd)                   ``"type1"``
    ``type1v2``                 Debian's 6.12 (no iommufd)                   ``"type1v2"``
    ``iommufd_compat_type1``    IOMMUFD, VFIO_DEVICE_CDEV,                   ``"type1"``
                                IOMMUFD_VFIO_CONTAINER: iommufd serves
                                /dev/vfio/vfio
    ``iommufd_compat_type1v2``  the same                                     ``"type1v2"``
    ``iommufd``                 IOMMUFD, VFIO_DEVICE_CDEV                    ``"iommufd"`` (/dev/iommu and
                                                                             the device cdev)
    ==========================  ===========================================  =====================

    The machine is ``x86`` unless a ``vfio_machine`` marker or parameter
    names another (which must be an x86 machine: the modes are Type1's and
    iommufd's, and POWER has neither).  The fixture's value is the
    :class:`IommuMode`.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Iterator

import pytest

from .client.backend import MACHINE_ENV, SimBackend, use_backend
from .client.container import use_iommu
from .kernel.config import POWER_PLATFORMS, KernelConfigError
from .machine import Machine, Process

__all__ = ["vfio_machine", "vfio_process", "vfio_backend", "vfio_iommu_mode", "IommuMode", "IOMMU_MODES"]


@dataclass(frozen=True)
class IommuMode:
    """One way a program on an x86 host reaches the IOMMU."""

    name: str
    kernel_config: tuple[str, ...]      #: the machine's kernel options (``Machine(kernel_config=...)``)
    iommu: str                          #: what the client's ``iommu=None`` means

    @property
    def iommufd_kernel(self) -> bool:
        """Whether the kernel is built with CONFIG_IOMMUFD."""
        return "IOMMUFD" in self.kernel_config

    def __str__(self) -> str:
        return self.name


_COMPAT = ("IOMMUFD", "VFIO_DEVICE_CDEV", "IOMMUFD_VFIO_CONTAINER")
#: every mode, in the order a test runs them
IOMMU_MODES: dict[str, IommuMode] = {m.name: m for m in (
    IommuMode("type1", (), "type1"),
    IommuMode("type1v2", (), "type1v2"),
    IommuMode("iommufd_compat_type1", _COMPAT, "type1"),
    IommuMode("iommufd_compat_type1v2", _COMPAT, "type1v2"),
    IommuMode("iommufd", ("IOMMUFD", "VFIO_DEVICE_CDEV"), "iommufd"),
)}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("vfiosim", "simulated VFIO machines")
    group.addoption("--vfio-machine", default=None, metavar="NAME|FILE",
                    help=f"machine of the vfio_machine fixture when no marker says (default: ${MACHINE_ENV} or powernv)")
    group.addoption("--vfio-iommu-mode", default=None, metavar="NAME[,NAME]",
                    help=f"IOMMU modes the tests using vfio_iommu_mode run in (default: all of "
                         f"{', '.join(IOMMU_MODES)})")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "vfio_machine(name='powernv', page_size=4096, kernel='6.12'): the simulated "
                                       "machine of the vfio_machine fixture (a preset name or a machine file)")
    config.addinivalue_line("markers", "vfio_process(uid=0, rlimit_memlock=(8 << 20, 8 << 20)): the process of the "
                                       "vfio_process fixture")
    config.addinivalue_line("markers", "vfio_iommu_modes(*names): the IOMMU modes a test using the vfio_iommu_mode "
                                       f"fixture runs in (default: all of {', '.join(IOMMU_MODES)})")


def _mode_names(names: Any, where: str) -> list[str]:
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    out = []
    for n in names:
        key = str(n).strip().lower().replace("-", "_")
        if key not in IOMMU_MODES:
            raise pytest.UsageError(f"{where}: unknown IOMMU mode {n!r}; modes: {', '.join(IOMMU_MODES)}")
        out.append(key)
    return out


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``vfio_iommu_mode`` over the modes (marker, then option)."""
    if "vfio_iommu_mode" not in metafunc.fixturenames:
        return
    names = list(IOMMU_MODES)
    marker = metafunc.definition.get_closest_marker("vfio_iommu_modes")
    if marker is not None and marker.args:
        names = _mode_names(marker.args, f"{metafunc.definition.nodeid}: vfio_iommu_modes")
    option = metafunc.config.getoption("--vfio-iommu-mode")
    if option:
        allowed = _mode_names(option, "--vfio-iommu-mode")
        names = [n for n in names if n in allowed]
    metafunc.parametrize("vfio_iommu_mode", [IOMMU_MODES[n] for n in names], ids=names, indirect=True)


def _iommu_mode(request: pytest.FixtureRequest) -> IommuMode | None:
    if "vfio_iommu_mode" not in request.fixturenames:
        return None
    mode = request.getfixturevalue("vfio_iommu_mode")
    assert isinstance(mode, IommuMode)
    return mode


def _machine_args(request: pytest.FixtureRequest,
                  mode: IommuMode | None = None) -> tuple[str, dict[str, Any], str | None]:
    marker = request.node.get_closest_marker("vfio_machine")
    kwargs: dict[str, Any] = {}
    name: str | None = None
    source: str | None = None
    if marker is not None:
        name = marker.args[0] if marker.args else marker.kwargs.get("name")
        kwargs = {k: v for k, v in marker.kwargs.items() if k != "name"}
    param = getattr(request, "param", None)
    if param is not None:
        if isinstance(param, dict):
            kwargs = {**kwargs, **{k: v for k, v in param.items() if k != "name"}}
            name = param.get("name", name)
        else:
            name = str(param)
    if name is None:
        if mode is not None:
            name = "x86"
        elif request.config.getoption("--vfio-machine") is not None:
            name, source = request.config.getoption("--vfio-machine"), "--vfio-machine"
        elif os.environ.get(MACHINE_ENV):
            name, source = os.environ[MACHINE_ENV], f"${MACHINE_ENV}"
        else:
            name = "powernv"
    if mode is not None and mode.kernel_config:
        extra = kwargs.get("kernel_config") or []
        if isinstance(extra, str):
            extra = [i for i in extra.split(",") if i.strip()]
        kwargs["kernel_config"] = [*mode.kernel_config, *extra]
    return name, kwargs, source


@pytest.fixture
def vfio_iommu_mode(request: pytest.FixtureRequest) -> IommuMode:
    """The IOMMU mode of this run of the test (see the module doc)."""
    param = getattr(request, "param", None)
    if isinstance(param, IommuMode):
        return param
    if isinstance(param, str):
        return IOMMU_MODES[_mode_names([param], "vfio_iommu_mode")[0]]
    raise pytest.UsageError("vfio_iommu_mode is parametrized by the plugin; do not request it indirectly without a "
                            "mode")


@pytest.fixture
def vfio_machine(request: pytest.FixtureRequest) -> Machine:
    """A fresh simulated machine (see the module doc for how it is chosen)."""
    mode = _iommu_mode(request)
    name, kwargs, source = _machine_args(request, mode)
    try:
        m = Machine.load(name, **kwargs)
    except KernelConfigError as exc:
        if mode is None:
            raise
        pytest.skip(f"IOMMU mode {mode.name} needs an x86 machine: {exc}")
    except ValueError as exc:
        if source is not None:                  # say where the name came from
            exc.args = (f"{source}: {exc}",)
        raise
    if mode is not None and m.platform in POWER_PLATFORMS:
        pytest.skip(f"IOMMU mode {mode.name} needs an x86 machine; {name} is {m.platform}")
    return m


@pytest.fixture
def vfio_process(request: pytest.FixtureRequest, vfio_machine: Machine) -> Iterator[Process]:
    """A process on ``vfio_machine``, the client's default backend during the test."""
    marker = request.node.get_closest_marker("vfio_process")
    kwargs: dict[str, Any] = dict(marker.kwargs) if marker is not None else {}
    kwargs.setdefault("name", request.node.name[:15])
    p = vfio_machine.spawn(**kwargs)
    mode = _iommu_mode(request)
    with ExitStack() as stack:
        stack.enter_context(use_backend(SimBackend(p)))
        if mode is not None:
            stack.enter_context(use_iommu(mode.iommu))
        yield p
    p.exit()


@pytest.fixture
def vfio_backend(vfio_process: Process) -> SimBackend:
    """The client backend of ``vfio_process``."""
    from .client.backend import get_backend
    b = get_backend()
    assert isinstance(b, SimBackend) and b.process is vfio_process
    return b
