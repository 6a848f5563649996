"""/dev/iommu: the iommufd context, its object table and ioctl dispatch
(drivers/iommu/iommufd/main.c).

Each open of /dev/iommu is an :class:`IommufdCtx` with a table of objects
(IOAS, HWPT, device, access) named by small integer ids, allocated from 1 up
(the lowest free one).  Objects refer to each other with ``users`` counts: an
HWPT holds its IOAS, an attached device its HWPT, the VFIO driver its
device; IOMMU_DESTROY removes an object only while the table's own
reference is its last (EBUSY otherwise), and closing the file destroys
leaves first until the table is empty.

Every ioctl struct starts with its own ``size``; the kernel reads it, refuses
a size below the ioctl's first version (EINVAL), and copies the struct with
``copy_struct_from_user()``: a longer struct is accepted when the bytes it
does not know are zero (E2BIG otherwise), a shorter one is zero-extended.
Numbers below 0x80 go to the VFIO container emulation (vfio_compat.c).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from errno import EBADFD, EBUSY, EFAULT, EINVAL, ENOENT, ENOMEM, ENOTTY, EOPNOTSUPP, EPERM
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from ...uapi import iommufd as iu
from ...uapi.ioctl import _IOC_NR
from ..cred import CAP_SYS_RESOURCE
from ..errors import KernelBug, fail
from ..fs import File
from ..uaccess import copy_struct_from_user_sized, copy_to_user, get_user_u32
from . import pages as P

if TYPE_CHECKING:
    from ..kernel import Kernel
    from ..task import Task
    from .device import IommufdGroup
    from .ioas import Ioas

# enum iommufd_object_type
IOMMUFD_OBJ_NONE = IOMMUFD_OBJ_ANY = 0
IOMMUFD_OBJ_DEVICE = 1
IOMMUFD_OBJ_HWPT_PAGING = 2
IOMMUFD_OBJ_HWPT_NESTED = 3
IOMMUFD_OBJ_IOAS = 4
IOMMUFD_OBJ_ACCESS = 5
IOMMUFD_OBJ_FAULT = 6
OBJ_NAMES = {IOMMUFD_OBJ_DEVICE: "device", IOMMUFD_OBJ_HWPT_PAGING: "hwpt_paging",
             IOMMUFD_OBJ_HWPT_NESTED: "hwpt_nested", IOMMUFD_OBJ_IOAS: "ioas", IOMMUFD_OBJ_ACCESS: "access",
             IOMMUFD_OBJ_FAULT: "fault"}

XA_LIMIT_31B = (1 << 31) - 1


class IommufdObject:
    """``struct iommufd_object``: an id and a ``users`` count (the table's
    reference is one of them once the object is finalized)."""

    obj_type: ClassVar[int] = IOMMUFD_OBJ_NONE

    def __init__(self, ictx: "IommufdCtx") -> None:
        self.ictx = ictx
        self.id = 0
        self.users = 1

    @property
    def type_name(self) -> str:
        return OBJ_NAMES.get(self.obj_type, str(self.obj_type))

    def destroy(self) -> None:
        """iommufd_object_ops[type].destroy"""

    def abort(self) -> None:
        """iommufd_object_ops[type].abort (destroy unless the type says otherwise)"""
        self.destroy()

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type_name, "users": self.users}

    def __repr__(self) -> str:
        return f"<{self.type_name} {self.id}>"


class IommufdCtx:
    """``struct iommufd_ctx``"""

    def __init__(self, kernel: "Kernel", file: "IommufdFile", account_mode: int) -> None:
        self.kernel = kernel
        self.file = file
        # id -> object; None is a reserved id (XA_ZERO_ENTRY) not yet finalized.
        self.objects: dict[int, IommufdObject | None] = {}
        self.groups: dict[int, "IommufdGroup"] = {}
        self.account_mode = account_mode
        self.no_iommu_mode = False
        self.vfio_ioas: "Ioas | None" = None

    # -- the object table -------------------------------------------------------------------------------

    def object_alloc(self, obj: IommufdObject) -> None:
        """_iommufd_object_alloc(): reserve the lowest free id (XA_FLAGS_ALLOC1,
        xa_limit_31b); the object is not visible until finalized."""
        if self.kernel.faults.should_fail("kmalloc:_iommufd_object_alloc"):
            raise fail(ENOMEM, f"kzalloc of the iommufd {obj.type_name} object failed (fault injection)")
        oid = 1
        while oid in self.objects:
            oid += 1
        if oid > XA_LIMIT_31B:
            raise fail(EBUSY, "the iommufd object table is full")
        obj.id = oid
        self.objects[oid] = None

    def finalize(self, obj: IommufdObject) -> None:
        """iommufd_object_finalize()"""
        if self.objects.get(obj.id, False) is not None:
            raise KernelBug(f"finalizing {obj!r}, whose id is not reserved")
        self.objects[obj.id] = obj

    def abort(self, obj: IommufdObject) -> None:
        """iommufd_object_abort(): undo the allocation of a never finalized object."""
        if self.objects.pop(obj.id, False) is not None:
            raise KernelBug(f"aborting {obj!r}, which was finalized")

    def abort_and_destroy(self, obj: IommufdObject) -> None:
        """iommufd_object_abort_and_destroy()"""
        obj.abort()
        self.abort(obj)

    def get_object(self, oid: int, obj_type: int = IOMMUFD_OBJ_ANY) -> IommufdObject:
        """iommufd_get_object(): ENOENT for no object, a reserved id, or another type."""
        obj = self.objects.get(oid)
        if obj is None or (obj_type != IOMMUFD_OBJ_ANY and obj.obj_type != obj_type):
            what = OBJ_NAMES.get(obj_type, "object")
            found = f"a {obj.type_name}" if obj is not None else "nothing"
            raise fail(ENOENT, f"iommufd id {oid} is {found}, not a {what}")
        obj.users += 1
        return obj

    def put_object(self, obj: IommufdObject) -> None:
        """iommufd_put_object()"""
        obj.users -= 1

    def object_remove(self, to_destroy: IommufdObject | None, oid: int) -> None:
        """iommufd_object_remove(): only when the table holds the last reference."""
        obj = self.objects.get(oid)
        if to_destroy is not None:
            # The caller's reference is put here.
            to_destroy.users -= 1
            if obj is not to_destroy:
                raise KernelBug(f"iommufd_object_remove: id {oid} is not {to_destroy!r}")
        elif obj is None:
            raise fail(ENOENT, f"iommufd id {oid} names no object")
        if obj.users != 1:
            raise fail(EBUSY, f"the {obj.type_name} {oid} is in use ({obj.users - 1} reference(s) besides the "
                              f"table's: {self._users_of(obj)})")
        assert obj is not None
        target: IommufdObject = obj
        target.users = 0
        del self.objects[oid]
        if self.vfio_ioas is target:
            self.vfio_ioas = None
        target.destroy()

    def destroy_user(self, obj: IommufdObject) -> None:
        """iommufd_object_destroy_user(): a kernel user (the VFIO driver) that
        holds a reference destroys the object."""
        try:
            self.object_remove(obj, obj.id)
        except Exception as exc:
            self.kernel.log.warn(f"WARNING: iommufd_object_destroy_user: {obj!r}: {exc}")

    def put_and_try_destroy(self, obj: IommufdObject) -> None:
        """iommufd_object_put_and_try_destroy(): an automatic HWPT goes with
        its last device."""
        obj.users -= 1
        if obj.users == 1 and self.objects.get(obj.id) is obj:
            obj.users = 0
            del self.objects[obj.id]
            if self.vfio_ioas is obj:
                self.vfio_ioas = None
            obj.destroy()

    def _users_of(self, obj: IommufdObject) -> str:
        holders = [o for o in self.objects.values() if o is not None and obj in _refs(o)]
        return ", ".join(repr(o) for o in holders) or "held by a kernel user"

    def release(self) -> None:
        """iommufd_fops_release(): destroy leaves (users == 1) until none is left."""
        while self.objects:
            destroyed = 0
            for oid in sorted(self.objects):
                obj = self.objects.get(oid)
                if obj is None or obj.users != 1:
                    continue
                destroyed += 1
                obj.users = 0
                del self.objects[oid]
                obj.destroy()
            if not destroyed:
                raise KernelBug(f"iommufd release cannot make progress: {self.objects}")
        if self.groups:
            raise KernelBug(f"iommufd released with groups {sorted(self.groups)}")

    def describe(self) -> dict[str, Any]:
        return {"account_mode": P.ACCOUNT_MODE_NAMES[self.account_mode],
                "vfio_ioas": self.vfio_ioas.id if self.vfio_ioas is not None else None,
                "objects": [o.describe() for _, o in sorted(self.objects.items()) if o is not None]}


def _refs(obj: IommufdObject) -> list[IommufdObject]:
    """The objects ``obj`` holds a reference on (for messages)."""
    out = []
    for name in ("ioas", "hwpt"):
        ref = getattr(obj, name, None)
        if isinstance(ref, IommufdObject):
            out.append(ref)
    return out


@dataclass
class Ucmd:
    """``struct iommufd_ucmd``"""

    ictx: IommufdCtx
    current: "Task"
    ubuffer: int
    user_size: int
    cmd: Any

    def respond(self, cmd_len: int | None = None) -> None:
        """iommufd_ucmd_respond(): copy back min(user_size, cmd_len) bytes."""
        n = ctypes.sizeof(self.cmd) if cmd_len is None else cmd_len
        copy_to_user(self.current, self.ubuffer, bytes(self.cmd)[:min(self.user_size, n)])


@dataclass(frozen=True)
class IoctlOp:
    ioctl_num: int
    cls: type[ctypes.Structure]
    last: str
    execute: Callable[[Ucmd], int]

    @property
    def min_size(self) -> int:
        return iu.offsetofend(self.cls, self.last)


def _ops() -> dict[int, IoctlOp]:
    """iommufd_ioctl_ops[], indexed by _IOC_NR - IOMMUFD_CMD_BASE."""
    from . import device, hw_pagetable, ioas, vfio_compat
    ops = [
        IoctlOp(iu.IOMMU_DESTROY, iu.iommu_destroy, "id", iommufd_destroy),
        IoctlOp(iu.IOMMU_FAULT_QUEUE_ALLOC, iu.iommu_fault_alloc, "out_fault_fd", hw_pagetable.iommufd_fault_alloc),
        IoctlOp(iu.IOMMU_GET_HW_INFO, iu.iommu_hw_info, "__reserved", device.iommufd_get_hw_info),
        IoctlOp(iu.IOMMU_HWPT_ALLOC, iu.iommu_hwpt_alloc, "__reserved", hw_pagetable.iommufd_hwpt_alloc),
        IoctlOp(iu.IOMMU_HWPT_GET_DIRTY_BITMAP, iu.iommu_hwpt_get_dirty_bitmap, "data",
                hw_pagetable.iommufd_hwpt_get_dirty_bitmap),
        IoctlOp(iu.IOMMU_HWPT_INVALIDATE, iu.iommu_hwpt_invalidate, "__reserved",
                hw_pagetable.iommufd_hwpt_invalidate),
        IoctlOp(iu.IOMMU_HWPT_SET_DIRTY_TRACKING, iu.iommu_hwpt_set_dirty_tracking, "__reserved",
                hw_pagetable.iommufd_hwpt_set_dirty_tracking),
        IoctlOp(iu.IOMMU_IOAS_ALLOC, iu.iommu_ioas_alloc, "out_ioas_id", ioas.iommufd_ioas_alloc_ioctl),
        IoctlOp(iu.IOMMU_IOAS_ALLOW_IOVAS, iu.iommu_ioas_allow_iovas, "allowed_iovas", ioas.iommufd_ioas_allow_iovas),
        IoctlOp(iu.IOMMU_IOAS_COPY, iu.iommu_ioas_copy, "src_iova", ioas.iommufd_ioas_copy),
        IoctlOp(iu.IOMMU_IOAS_IOVA_RANGES, iu.iommu_ioas_iova_ranges, "out_iova_alignment",
                ioas.iommufd_ioas_iova_ranges),
        IoctlOp(iu.IOMMU_IOAS_MAP, iu.iommu_ioas_map, "iova", ioas.iommufd_ioas_map),
        IoctlOp(iu.IOMMU_IOAS_UNMAP, iu.iommu_ioas_unmap, "length", ioas.iommufd_ioas_unmap),
        IoctlOp(iu.IOMMU_OPTION, iu.iommu_option, "val64", iommufd_option),
        IoctlOp(iu.IOMMU_VFIO_IOAS, iu.iommu_vfio_ioas, "__reserved", vfio_compat.iommufd_vfio_ioas),
    ]
    return {_IOC_NR(op.ioctl_num) - iu.IOMMUFD_CMD_BASE: op for op in ops}


_OPS: dict[int, IoctlOp] = {}


def iommufd_destroy(ucmd: Ucmd) -> int:
    ucmd.ictx.object_remove(None, ucmd.cmd.id)
    return 0


def iommufd_option(ucmd: Ucmd) -> int:
    """iommufd_option(): RLIMIT_MODE is the context's, HUGE_PAGES an IOAS's;
    val64 is copied back on success."""
    from .ioas import iommufd_ioas_option
    cmd = ucmd.cmd
    if getattr(cmd, "__reserved"):
        raise fail(EOPNOTSUPP, "IOMMU_OPTION: __reserved must be 0")
    if cmd.option_id == iu.IOMMU_OPTION_RLIMIT_MODE:
        _option_rlimit_mode(cmd, ucmd.ictx, ucmd.current)
    elif cmd.option_id == iu.IOMMU_OPTION_HUGE_PAGES:
        iommufd_ioas_option(ucmd)
    else:
        raise fail(EOPNOTSUPP, f"IOMMU_OPTION: unknown option {cmd.option_id}")
    copy_to_user(ucmd.current, ucmd.ubuffer + iu.iommu_option.val64.offset, int(cmd.val64).to_bytes(8, "little"))
    return 0


def _option_rlimit_mode(cmd: Any, ictx: IommufdCtx, current: "Task") -> None:
    """iommufd_option_rlimit_mode(): 0 charges the user, 1 the mm (as VFIO);
    set only with CAP_SYS_RESOURCE and while the context has no object."""
    if cmd.object_id:
        raise fail(EOPNOTSUPP, "IOMMU_OPTION_RLIMIT_MODE is global: object_id must be 0")
    if cmd.op == iu.IOMMU_OPTION_OP_GET:
        cmd.val64 = int(ictx.account_mode == P.IOPT_PAGES_ACCOUNT_MM)
        return
    if cmd.op == iu.IOMMU_OPTION_OP_SET:
        if not current.capable(CAP_SYS_RESOURCE):
            raise fail(EPERM, "IOMMU_OPTION_RLIMIT_MODE: setting it needs CAP_SYS_RESOURCE")
        if ictx.objects:
            raise fail(EBUSY, f"IOMMU_OPTION_RLIMIT_MODE: the iommufd already has {len(ictx.objects)} object(s); "
                              f"set the mode before creating any")
        if cmd.val64 == 0:
            ictx.account_mode = P.IOPT_PAGES_ACCOUNT_USER
        elif cmd.val64 == 1:
            ictx.account_mode = P.IOPT_PAGES_ACCOUNT_MM
        else:
            raise fail(EINVAL, f"IOMMU_OPTION_RLIMIT_MODE: {cmd.val64} is neither 0 (user) nor 1 (mm)")
        return
    raise fail(EOPNOTSUPP, f"IOMMU_OPTION: op {cmd.op} is neither SET (0) nor GET (1)")


class IommufdFile(File):
    """An open /dev/iommu (or /dev/vfio/vfio with IOMMUFD_VFIO_CONTAINER)."""

    kind = "iommufd"
    positional = False

    def __init__(self, kernel: "Kernel", path: str, f_flags: int, vfio_compat: bool) -> None:
        super().__init__(path, f_flags)
        # iommufd_fops_open(): /dev/vfio/vfio keeps VFIO's per-mm accounting.
        mode = P.IOPT_PAGES_ACCOUNT_MM if vfio_compat else P.IOPT_PAGES_ACCOUNT_USER
        self.ictx = IommufdCtx(kernel, self, mode)
        self.vfio_compat = vfio_compat
        if vfio_compat and not kernel.iommufd_compat_announced:
            kernel.iommufd_compat_announced = True
            kernel.log.info("iommufd: IOMMUFD is providing /dev/vfio/vfio, not VFIO.")

    def ioctl(self, current: "Task", cmd: int, arg: int) -> int:
        """iommufd_fops_ioctl()"""
        global _OPS
        nr = _IOC_NR(cmd)
        if not _OPS:
            _OPS = _ops()
        if nr < iu.IOMMUFD_CMD_BASE or nr - iu.IOMMUFD_CMD_BASE >= len(_OPS):
            from .vfio_compat import iommufd_vfio_ioctl
            return iommufd_vfio_ioctl(self.ictx, current, cmd, arg)
        user_size = get_user_u32(current, arg)
        op = _OPS[nr - iu.IOMMUFD_CMD_BASE]
        if op.ioctl_num != cmd:
            # -ENOIOCTLCMD, which vfs_ioctl() turns into ENOTTY.
            raise fail(ENOTTY, f"{cmd:#x} is not an iommufd ioctl (number {nr:#x} is {iu.ioctl_name(op.ioctl_num)})")
        name = iu.ioctl_name(cmd)
        if user_size < op.min_size:
            raise fail(EINVAL, f"{name}: size {user_size} < {op.min_size}, the size of its first version")
        struct = copy_struct_from_user_sized(current, arg, op.cls, user_size, name or "")
        return op.execute(Ucmd(self.ictx, current, arg, user_size, struct))

    def release(self, current: "Task") -> None:
        self.ictx.release()


def iommufd_ctx_from_file(file: File) -> IommufdCtx:
    """iommufd_ctx_from_file(): a reference on the context (its file)."""
    if not isinstance(file, IommufdFile):
        raise fail(EBADFD, f"{file.name} ({file.kind}) is not an iommufd")
    file.get()
    return file.ictx


def iommufd_ctx_from_fd(current: "Task", fd: int) -> IommufdCtx:
    """iommufd_ctx_from_fd(): EBADF for no file, EBADFD for another kind."""
    file = current.files.get(fd)
    return iommufd_ctx_from_file(file)


def iommufd_ctx_put(ictx: IommufdCtx, current: "Task") -> None:
    """iommufd_ctx_put(): fput() of the context's file."""
    ictx.file.put(current)


def _efault(reason: str) -> None:
    raise fail(EFAULT, reason)
