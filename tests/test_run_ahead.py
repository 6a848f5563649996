"""Run-ahead: after a BAR access traps, the shim's handler emulates the MOVs
that follow it too, while each accesses a device mapping, so a run of
register stores and loads costs one trap.

The sequences are in assembly (tests/c/runahead_probe.c), one per addressing
mode and instruction form; a device model here logs every access it sees, in
order, and the program prints what it loaded and the shim's trap counters.
Each test would fail without run-ahead (the counters), with a wrong address
computation or operand size (the log, the loaded values), or with run-ahead
that went past what the CPU may execute (the page-boundary and ordinary
memory cases: the program's own handler must see the fault).
"""

from __future__ import annotations

import json

import pytest

import vfiosim
from runutil import C_DIR, ThreadedDaemon, cc
from vfiosim import devices
from vfiosim.kernel.pci.device import Register

BDF = "0000:03:00.0"
DOORBELL, DOORBELLS, COUNTDOWN, ARM = 0x100, 0x104, 0x108, 0x10C


def pattern(k: int) -> int:
    return (k * 37 + 11) & 0xFF


class RunAheadTest(devices.PciDevice):
    """BAR0 (4 KiB) is memory, each access logged: 0x000-0x0ff posted
    registers, 0x100 a doorbell (snapshots 0x40-0x4f), 0x104 how many
    doorbells rang, 0x108 a countdown (each load reads it, then decrements
    it to 0) that a store to 0x10c sets; the rest undeclared (every store a
    round trip)."""

    model = "runahead-test"

    def __init__(self, bdf: str) -> None:
        super().__init__(bdf, vendor=0x1B36, device=0x00F4, class_code=0xFF0000)
        self.add_bar(0, 0x1000)
        self.declare_registers(0, Register(0x000, 0x100, write_effect=False), Register(DOORBELL, 4),
                               Register(DOORBELLS, 4, write_effect=False),
                               Register(COUNTDOWN, 4, read_effect=True), Register(ARM, 4))
        self.finish()
        self.mem = bytearray(pattern(k) for k in range(0x1000))
        self.accesses: list[tuple] = []
        self.snapshots: list[bytes] = []
        self.countdown = 0

    def mmio_read(self, bar: int, offset: int, size: int) -> int:
        self.accesses.append(("r", offset, size))
        if offset == DOORBELLS:
            return len(self.snapshots)
        if offset == COUNTDOWN:
            value, self.countdown = self.countdown, max(self.countdown - 1, 0)
            return value
        return int.from_bytes(self.mem[offset:offset + size], "little")

    def mmio_write(self, bar: int, offset: int, size: int, value: int) -> None:
        self.accesses.append(("w", offset, size, value))
        if offset == DOORBELL:
            self.snapshots.append(bytes(self.mem[0x40:0x50]))
        if offset == ARM:
            self.countdown = value
        self.mem[offset:offset + size] = value.to_bytes(size, "little")


devices.register_model("runahead-test", lambda bdf, *, dma_mask: RunAheadTest(bdf), replace=True)

MACHINE = (f'[machine]\nname = "runahead"\nplatform = "x86"\n[iommu]\nmodel = "intel-iommu"\n'
           f'[[device]]\nbdf = "{BDF}"\nmodel = "runahead-test"\niommu_group = 5\n')


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    return cc(C_DIR / "runahead_probe.c", tmp_path_factory.mktemp("runahead"), "-no-pie", "-ldl")


def run(probe, tmp_path, scenario: str, trace: str | None = None) -> tuple[dict[str, str], RunAheadTest]:
    m = vfiosim.Machine.from_toml(MACHINE)
    dev = m.device(BDF)
    d = ThreadedDaemon(m, tmp_path, trace=trace)
    try:
        proc = d.run([str(probe), scenario, BDF])
        assert d.wait_idle()
    finally:
        d.close()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    fields = dict(w.split("=", 1) for line in proc.stdout.splitlines() for w in line.split() if "=" in w)
    return fields, dev      # type: ignore[return-value]


def counts(f: dict[str, str]) -> tuple[int, int]:
    return int(f["traps"]), int(f["ahead"])


def test_a_run_of_stores_of_every_form_costs_one_trap(probe, tmp_path):
    trace = tmp_path / "t.jsonl"
    f, dev = run(probe, tmp_path, "stores", trace=str(trace))
    expected = [
        ("w", 0x00, 4, 0x11111111),            # C7 imm32
        ("w", 0x08, 8, 0xFFFFFFFFFFFFFFFE),    # REX.W C7: sign-extended
        ("w", 0x10, 2, 0x3344),                # 66 C7
        ("w", 0x12, 1, 0x55),                  # C6
        ("w", 0x18, 8, 0x1122334455667788),    # base + index*8 + disp8
        ("w", 0x20, 4, 0x55667788),            # REX.B base + disp32
        ("w", 0x24, 1, 0xA1),                  # %bh
        ("w", 0x25, 1, 0xB2),                  # %bl
        ("w", 0x28, 4, 0x99AABBCC),            # RIP-relative
        ("w", 0x2C, 2, 0xBBCC),                # %r12w
        ("w", 0x2E, 1, 0xCC),                  # %r12b
        ("w", 0x30, 8, 0x5566778899AABBCC),    # index*8 + disp32, no base
        ("w", 0x200, 4, 0xDEADBEEF),           # undeclared: a round trip, after the posted ones
    ]
    assert dev.accesses == expected
    assert counts(f) == (1, 12)
    # Each access is still an mmio record of the trace, in program order.
    recs = [json.loads(line) for line in trace.read_text().splitlines()]
    mmio = [(r["offset"], r["size"], r["value"]) for r in recs if r.get("call") == "mmio"]
    assert mmio == [(off, size, value) for _, off, size, value in expected]


def test_no_run_ahead_while_single_stepping(probe, tmp_path):
    """With EFLAGS.TF set (a debugger stepping), each access traps on its own,
    and the accesses are the same."""
    f, dev = run(probe, tmp_path, "stepped")
    assert f["stepped"] == "1"                          # SIGTRAPs came: the CPU was stepping
    assert [e[1] for e in dev.accesses] == [0x00, 0x08, 0x10, 0x12, 0x18, 0x20, 0x24, 0x25, 0x28, 0x2C, 0x2E, 0x30,
                                            0x200]
    assert counts(f) == (13, 0)


def test_a_run_of_loads_fills_each_register_as_the_cpu_would(probe, tmp_path):
    f, dev = run(probe, tmp_path, "loads")
    mem = bytes(pattern(k) for k in range(0x100))

    def le(off: int, n: int, signed: bool = False) -> int:
        return int.from_bytes(mem[off:off + n], "little", signed=signed)
    ones = (1 << 64) - 1
    expected = [
        le(0x80, 8),                                            # mov 8 bytes
        le(0x88, 1),                                            # movzbl: zero-extended to 64
        le(0x8A, 2, True) & ones,                               # movswq
        le(0x8C, 4, True) & ones,                               # movslq
        (ones & ~0xFF00) | le(0x90, 1) << 8,                    # %bh: only bits 8-15
        le(0x94, 4),                                            # RIP-relative, 32-bit: zero-extends
        (ones & ~0xFFFF) | le(0x98, 2),                         # %r10w merges
        (ones & ~0xFF) | le(0x9A, 1),                           # %r11b merges
        le(0x9B, 1, True) & 0xFFFFFFFF,                         # movsbl into %r12d
    ]
    assert [int(f[f"out{i}"], 16) for i in range(9)] == expected
    assert dev.accesses == [("r", 0x80, 8), ("r", 0x88, 1), ("r", 0x8A, 2), ("r", 0x8C, 4), ("r", 0x90, 1),
                       ("r", 0x94, 4), ("r", 0x98, 2), ("r", 0x9A, 1), ("r", 0x9B, 1)]
    assert counts(f) == (1, 8)


def test_nops_and_leas_are_stepped_over_and_anything_else_ends_the_run(probe, tmp_path):
    f, dev = run(probe, tmp_path, "interleaved")
    bar = int(f["bar"], 16)
    assert [e[1:] for e in dev.accesses] == [(0x40, 4, 1), (0x48, 4, 2), (0x4C, 4, 3), (0x50, 4, 4), (0x54, 4, 5),
                                         (0x58, 4, 6)]
    assert int(f["rdx"], 16) == bar + 0x4C                                    # LEA, then an emulated ADD
    assert int(f["rcx"], 16) == ((1 << 64) - 1) & ~0xFFFF | ((bar + 0x1234) & 0xFFFF)   # 16-bit LEA merges
    assert int(f["r8"], 16) == (bar + 0x10) & 0xFFFFFFFF                      # 32-bit LEA zero-extends
    # Traps at 0x40 (after the IMUL), 0x4c (after a store to ordinary memory), 0x54.
    assert counts(f) == (3, 3)


def test_a_run_keeps_the_order_of_posted_stores_doorbells_and_loads(probe, tmp_path):
    f, dev = run(probe, tmp_path, "doorbell")
    assert dev.accesses == [("w", 0x40, 4, 0x41), ("w", 0x44, 4, 0x42), ("w", 0x48, 8, 0x4443),
                       ("w", DOORBELL, 4, 1), ("w", 0x4C, 4, 0x46), ("r", DOORBELLS, 4), ("r", 0x4C, 4)]
    # The doorbell saw every store before it and none after it.
    assert dev.snapshots == [(0x41).to_bytes(4, "little") + (0x42).to_bytes(4, "little")
                             + (0x4443).to_bytes(8, "little")]
    assert f["doorbells"] == "1" and int(f["last"], 16) == 0x46
    assert counts(f) == (1, 6)


def test_a_store_to_ordinary_memory_after_a_run_is_made_by_the_cpu(probe, tmp_path):
    """The store to a read-only page faults to the program's own handler, at
    that instruction: the shim neither emulated nor skipped it."""
    f, dev = run(probe, tmp_path, "ordinary")
    assert f["handler"] == "1" and f["rip_ok"] == "1" and f["ro"] == "9"
    assert [e[1:] for e in dev.accesses] == [(0x60, 4, 7), (0x64, 4, 8), (0x68, 4, 10)]
    assert counts(f) == (2, 1)


def test_a_gs_relative_access_ends_a_run_and_traps_itself(probe, tmp_path):
    f, dev = run(probe, tmp_path, "gs")
    assert [e[1:] for e in dev.accesses] == [(0x70, 4, 0x31), (0x74, 4, 0x32), (0x78, 4, 0x33)]
    assert counts(f) == (2, 1)


def test_a_store_loop_is_followed_around_its_branch(probe, tmp_path):
    """3,000 stores from `mov %eax,0x80(%rdi); add $1,%rax; cmp %rsi,%rax; jl`:
    each trap runs ahead RUN_AHEAD_MAX (1,024) instructions, 256 iterations,
    so 12 traps.  The stores are posted (0x80 has no side effect), and the
    daemon keeps only the last of a batch to the same bytes: the device sees
    them in order, ending with the last value."""
    f, dev = run(probe, tmp_path, "store_loop")
    values = [e[3] for e in dev.accesses]
    assert all(e[:3] == ("w", 0x80, 4) for e in dev.accesses)
    assert values == sorted(set(values)) and values[-1] == 2999
    assert counts(f) == (12, 2988)


def test_a_polling_loop_costs_one_trap_and_reads_until_done(probe, tmp_path):
    """`mov 0x108(%rdi),%eax; pause; test %eax,%eax; jne`: each load is made
    once (a read with side effects), and the loop ends on the 0."""
    f, dev = run(probe, tmp_path, "poll")
    assert dev.accesses == [("w", ARM, 4, 5)] + [("r", COUNTDOWN, 4)] * 6
    assert dev.countdown == 0
    assert counts(f) == (1, 6)


def test_a_run_ends_after_instructions_without_a_device_access(probe, tmp_path):
    """Forty ADDs between two stores: run-ahead stops after RUN_AHEAD_IDLE
    (32) of them, the CPU does the rest, and the sum is the same."""
    f, dev = run(probe, tmp_path, "idle")
    assert [e[1:] for e in dev.accesses] == [(0x40, 4, 0x21), (0x44, 4, 0x22)]
    assert int(f["rax"]) == 1000 + 3 * 40
    assert counts(f) == (2, 0)


def test_a_jump_to_another_page_ends_the_run_at_its_target(probe, tmp_path):
    f, dev = run(probe, tmp_path, "jump_out")
    assert [e[1:] for e in dev.accesses] == [(0x48, 4, 0x23), (0x4C, 4, 0x24), (0x50, 4, 0x25)]
    assert counts(f) == (2, 1)


@pytest.mark.parametrize("second_page", ["exec", "noexec", "unmapped"])
def test_a_run_stops_at_the_page_the_cpu_executed_from(probe, tmp_path, second_page):
    """Six stores, the fourth across a page boundary.  The handler does not
    read past the faulting instruction's page; the CPU fetches the fourth
    (if the next page is not executable, the program's own handler sees that
    fault, at that instruction, and makes it executable) and it traps."""
    f, dev = run(probe, tmp_path, f"straddle-{second_page}")
    assert [e[1:] for e in dev.accesses] == [(4 * k, 4, 0x20 + k) for k in range(6)]
    assert counts(f) == (2, 4)
    if second_page == "exec":
        assert f["handler"] == "0"
    else:
        assert (f["handler"], f["rip_is_straddler"], f["addr_is_page2"]) == ("1", "1", "1")
