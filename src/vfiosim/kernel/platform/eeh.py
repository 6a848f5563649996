"""Enhanced Error Handling: freezing and recovering a Partitionable Endpoint.

When a PHB sees an error from a PE (on PowerNV: a DMA whose TCE is invalid
or lacks permission), it *freezes* the PE: MMIO loads return all-ones,
stores are dropped, DMA stops.  A user who owns the PE through VFIO
recovers it with VFIO_EEH_PE_OP: reset (hot or fundamental, then
deactivate, which thaws the PE) and configure; or thaws MMIO and DMA
directly.  Operations follow arch/powerpc/kernel/eeh.c (eeh_pe_set_option,
eeh_pe_get_state, eeh_pe_reset, eeh_pe_configure, eeh_pe_inject_err).
"""

from __future__ import annotations

from errno import EINVAL
from typing import Callable

from ...uapi import vfio as uapi
from ..errors import fail

# eeh_pe_set_option() options (arch/powerpc/include/asm/eeh.h)
EEH_OPT_DISABLE = 0
EEH_OPT_ENABLE = 1
EEH_OPT_THAW_MMIO = 2
EEH_OPT_THAW_DMA = 3
EEH_OPT_FREEZE_PE = 4

EEH_RESET_DEACTIVATE = 0
EEH_RESET_HOT = 1
EEH_RESET_FUNDAMENTAL = 3

EEH_ERR_TYPE_32 = 0
EEH_ERR_TYPE_64 = 1
EEH_ERR_FUNC_MIN = 0
EEH_ERR_FUNC_MAX = 19


class EehPe:
    """EEH state of one PE."""

    def __init__(self, name: str, log: Callable[[str], None]) -> None:
        self.name = name                  # "PHB#0-PE#1"
        self.log = log
        self.mmio_stopped = False
        self.dma_stopped = False
        self.reset_active = False
        self.passed = False               # owned by a user (VFIO_EEH_PE_ENABLE)
        self.freeze_count = 0
        self.reset_hook: Callable[[], None] = lambda: None

    @property
    def frozen(self) -> bool:
        return self.mmio_stopped or self.dma_stopped

    def freeze(self, reason: str) -> None:
        """The PHB isolates the PE (an ER/freeze event)."""
        if not self.frozen:
            self.freeze_count += 1
            self.log(f"EEH: Frozen {self.name} detected: {reason}")
            self.log(f"EEH: {self.name}: MMIO loads return all-ones and DMA is stopped until the PE is recovered")
        self.mmio_stopped = True
        self.dma_stopped = True

    # -- the operations of VFIO_EEH_PE_OP --------------------------------------------

    def set_option(self, option: int) -> int:
        """eeh_pe_set_option()"""
        if option == EEH_OPT_ENABLE:
            self.passed = True
            return 0
        if option == EEH_OPT_DISABLE:
            return 0
        if option == EEH_OPT_THAW_MMIO:
            self.mmio_stopped = False
            return 0
        if option == EEH_OPT_THAW_DMA:
            self.dma_stopped = False
            return 0
        if option == EEH_OPT_FREEZE_PE:
            self.mmio_stopped = self.dma_stopped = True
            return 0
        raise fail(EINVAL, f"EEH option {option} out of range")

    def get_state(self) -> int:
        """eeh_pe_get_state(): one of VFIO_EEH_PE_STATE_*."""
        if self.reset_active:
            return uapi.VFIO_EEH_PE_STATE_RESET
        dma_en, mmio_en = not self.dma_stopped, not self.mmio_stopped
        if dma_en and mmio_en:
            return uapi.VFIO_EEH_PE_STATE_NORMAL
        if not dma_en and not mmio_en:
            return uapi.VFIO_EEH_PE_STATE_STOPPED
        if not dma_en and mmio_en:
            return uapi.VFIO_EEH_PE_STATE_STOPPED_DMA
        return uapi.VFIO_EEH_PE_STATE_UNAVAIL

    def reset(self, option: int) -> int:
        """eeh_pe_reset(pe, option, include_passed=true)"""
        if option == EEH_RESET_DEACTIVATE:
            if self.reset_active:
                self.reset_active = False
                self.reset_hook()
            # eeh_pe_reenable_devices(): the PE leaves the frozen state.
            self.mmio_stopped = self.dma_stopped = False
            self.log(f"EEH: {self.name} reset deactivated, PE thawed")
            return 0
        if option in (EEH_RESET_HOT, EEH_RESET_FUNDAMENTAL):
            self.mmio_stopped = self.dma_stopped = True     # proactive freeze
            self.reset_active = True
            kind = "hot" if option == EEH_RESET_HOT else "fundamental"
            self.log(f"EEH: {self.name} {kind} reset asserted")
            return 0
        raise fail(EINVAL, f"EEH reset option {option} is not supported")

    def configure(self) -> int:
        """eeh_pe_configure(): nothing left to do since config is restored on reset."""
        return 0

    def inject_err(self, etype: int, func: int, addr: int, mask: int) -> int:
        """eeh_pe_inject_err(): the error freezes the PE as a real one would."""
        if etype not in (EEH_ERR_TYPE_32, EEH_ERR_TYPE_64):
            raise fail(EINVAL, f"EEH error type {etype} is not 32 (0) or 64 (1)")
        if not EEH_ERR_FUNC_MIN <= func <= EEH_ERR_FUNC_MAX:
            raise fail(EINVAL, f"EEH error function {func} is outside {EEH_ERR_FUNC_MIN}..{EEH_ERR_FUNC_MAX}")
        self.freeze(f"error injected by the user (type {etype}, function {func}, addr {addr:#x}, mask {mask:#x})")
        return 0
