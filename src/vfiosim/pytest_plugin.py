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
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import pytest

from .client.backend import MACHINE_ENV, SimBackend, use_backend
from .machine import Machine, Process

__all__ = ["vfio_machine", "vfio_process", "vfio_backend"]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("vfiosim", "simulated VFIO machines")
    group.addoption("--vfio-machine", default=None, metavar="NAME|FILE",
                    help=f"machine of the vfio_machine fixture when no marker says (default: ${MACHINE_ENV} or powernv)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "vfio_machine(name='powernv', page_size=4096, kernel='6.12'): the simulated "
                                       "machine of the vfio_machine fixture (a preset name or a machine file)")
    config.addinivalue_line("markers", "vfio_process(uid=0, rlimit_memlock=(8 << 20, 8 << 20)): the process of the "
                                       "vfio_process fixture")


def _machine_args(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any], str | None]:
    marker = request.node.get_closest_marker("vfio_machine")
    kwargs: dict[str, Any] = {}
    name: str | None = None
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
        name = request.config.getoption("--vfio-machine")
        if name is not None:
            return name, kwargs, "--vfio-machine"
        if os.environ.get(MACHINE_ENV):
            return os.environ[MACHINE_ENV], kwargs, f"${MACHINE_ENV}"
        name = "powernv"
    return name, kwargs, None


@pytest.fixture
def vfio_machine(request: pytest.FixtureRequest) -> Machine:
    """A fresh simulated machine (see the module doc for how it is chosen)."""
    name, kwargs, source = _machine_args(request)
    try:
        return Machine.load(name, **kwargs)
    except ValueError as exc:
        if source is not None:                  # say where the name came from
            exc.args = (f"{source}: {exc}",)
        raise


@pytest.fixture
def vfio_process(request: pytest.FixtureRequest, vfio_machine: Machine) -> Iterator[Process]:
    """A process on ``vfio_machine``, the client's default backend during the test."""
    marker = request.node.get_closest_marker("vfio_process")
    kwargs: dict[str, Any] = dict(marker.kwargs) if marker is not None else {}
    kwargs.setdefault("name", request.node.name[:15])
    p = vfio_machine.spawn(**kwargs)
    with use_backend(SimBackend(p)):
        yield p
    p.exit()


@pytest.fixture
def vfio_backend(vfio_process: Process) -> SimBackend:
    """The client backend of ``vfio_process``."""
    from .client.backend import get_backend
    b = get_backend()
    assert isinstance(b, SimBackend) and b.process is vfio_process
    return b
