"""`Process.status()`: the simulated /proc/<pid>/status carries what programs
read to decide about privileges -- the capability sets, as Linux prints them
(fs/proc/array.c task_cap(): 16 hex digits each), and Uid/Gid as real,
effective, saved and filesystem ids."""

from __future__ import annotations

import errno
import os

import pytest

import vfiosim
from vfiosim.kernel.cred import CAP_IPC_LOCK, CAP_LAST_CAP

FULL = f"{(1 << (CAP_LAST_CAP + 1)) - 1:016x}"          # 000001ffffffffff on 6.12 (CAP_LAST_CAP 40)
NONE = "0" * 16
CAP_KEYS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")


def caps(status: dict) -> tuple[str, ...]:
    return tuple(status[k] for k in CAP_KEYS)


def test_root_has_every_capability_as_linux_prints_it():
    s = vfiosim.Machine.default().spawn(uid=0).status()
    assert FULL == "000001ffffffffff"
    assert caps(s) == (NONE, FULL, FULL, FULL, NONE)
    assert int(s["CapEff"], 16) >> CAP_IPC_LOCK & 1          # how programs test for CAP_IPC_LOCK


def test_a_user_has_none_but_the_bounding_set():
    s = vfiosim.Machine.default().spawn(uid=1000, gid=1000).status()
    assert caps(s) == (NONE, NONE, NONE, FULL, NONE)


def test_setuid_away_from_root_clears_permitted_and_effective_and_moves_every_uid():
    p = vfiosim.Machine.default().spawn(uid=0, gid=50)
    p.setuid(1000)
    s = p.status()
    assert caps(s) == (NONE, NONE, NONE, FULL, NONE)
    assert s["Uid"] == (1000, 1000, 1000, 1000)               # real, effective, saved, filesystem
    assert s["Gid"] == (50, 50, 50, 50)
    with pytest.raises(OSError) as e:
        p.open("/dev/vfio/0", os.O_RDWR)                      # and the kernel agrees
    assert e.value.errno == errno.EACCES


def test_status_keeps_the_procfs_field_order_of_ids_and_caps():
    keys = list(vfiosim.Machine.default().spawn().status())
    assert keys.index("Uid") < keys.index("Gid") < keys.index("CapInh") < keys.index("CapPrm") \
        < keys.index("CapEff") < keys.index("CapBnd") < keys.index("CapAmb")
