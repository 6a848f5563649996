"""The Linux kernel's own VFIO selftests, unmodified, under `vfiosim run` (docs/selftests.md).

``tools/testing/selftests/vfio/`` (vfio_dma_mapping_test, vfio_iommufd_setup_test,
vfio_pci_device_test, ...) are programs we did not write: kselftest-harness C
programs that set a device up in each IOMMU mode (Type1, Type1v2, iommufd's
compat container in both, the iommufd cdev) and print TAP.  This module

* fetches Debian's ``linux-source-X.Y`` package (architecture ``all``, from
  ``sid``, where the newest kernel is) once into ``$XDG_CACHE_HOME/vfiosim/selftests``
  with a private apt state (``qemu.image.GuestApt``: the Release file's signature,
  then the Packages index's SHA256 of the .deb, checked by apt and again here);
* extracts only what the selftests' Makefile reads (the selftests, kselftest's
  headers, ``tools/include``, the uAPI headers: newer than the system's
  linux-libc-dev, so they are passed with ``KHDR_INCLUDES``, as ``make headers``
  would);
* builds them with their own Makefile, their sources untouched; where the
  package's sources use something the package lacks, the build supplies it
  from outside their tree and says so (``COMPAT``);
* runs every binary under ``vfiosim run`` on each machine of ``RUNS`` against
  its vfio-pci devices, and compares each TAP result with ``EXPECTED``: a test
  that cannot pass here is named there with the reason.
"""

from __future__ import annotations

import fcntl
import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, TextIO

from .cachedir import user_cache

SOURCE_PACKAGE = "linux-source-7.2"      # the selftests EXPECTED was written against
SUITE = "sid"
SELFTESTS = "tools/testing/selftests"
# What `make -C tools/testing/selftests/vfio` reads (lib.mk includes scripts/subarch.include).
EXTRACT = [f"{SELFTESTS}/vfio", f"{SELFTESTS}/lib.mk", f"{SELFTESTS}/kselftest.h",
           f"{SELFTESTS}/kselftest_harness.h", "scripts/subarch.include", "tools/include",
           "tools/arch/x86/include", "include/uapi", "arch/x86/include/uapi",
           # what symbolic links in them point to: tools/include/linux/pci_ids.h, the
           # ioat and dsa drivers' registers and hw.h
           "include/linux/pci_ids.h", "drivers/dma/ioat/hw.h", "drivers/dma/ioat/registers.h",
           "drivers/dma/idxd/registers.h"]
TIMEOUT = 120.0                          # seconds per test binary

Log = Callable[[str], None]


def _quiet(text: str) -> None:
    pass


class SelftestsUnavailable(RuntimeError):
    """The selftests cannot be fetched or built here; the message says what is missing."""


def cache_dir() -> Path:
    return user_cache("selftests", override="VFIOSIM_SELFTESTS_CACHE")


def _run(argv: list[str], *, log: Log = _quiet, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    log("$ " + " ".join(argv))
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"})
    if proc.returncode != 0:
        raise SelftestsUnavailable(f"`{' '.join(argv)}` failed with exit status {proc.returncode}: "
                                   f"{(proc.stderr or proc.stdout).strip()[-800:]}")
    return proc


# -- the source package ---------------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_package(package: str = SOURCE_PACKAGE, *, download: bool = True, log: Log = _quiet) -> Path:
    """The package's .deb in the cache, downloaded once from Debian ``SUITE``."""
    debs = cache_dir() / "debs"
    manifest = debs / "manifest.json"
    known: dict[str, dict[str, str]] = json.loads(manifest.read_text()) if manifest.exists() else {}
    if package in known and (debs / known[package]["file"]).exists():
        return debs / str(known[package]["file"])
    if not download:
        raise SelftestsUnavailable(f"{package} is not in {debs} and this run may not download it")
    for tool in ("apt-get", "apt-cache", "dpkg"):
        if shutil.which(tool) is None:
            raise SelftestsUnavailable(f"{package} is not cached in {debs} and there is no {tool} to fetch it")
    from .qemu.image import GuestApt, QemuDemoUnavailable
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True).stdout.strip()
    apt = GuestApt(cache_dir() / "apt", log, arch or "amd64", suites=[SUITE])
    try:
        apt.setup()
        apt.update()
    except QemuDemoUnavailable as exc:
        raise SelftestsUnavailable(str(exc)) from None
    show = apt.run("apt-cache", "show", "--no-all-versions", package, check=False)
    fields = dict(re.findall(r"^(Version|Filename|SHA256): (\S+)$", show.stdout, re.M))
    if show.returncode != 0 or "SHA256" not in fields:
        newest = sorted(re.findall(r"^(linux-source-\d+\.\d+)\s", apt.run("apt-cache", "pkgnames", "linux-source-",
                                                                          check=False).stdout + "\n", re.M))
        raise SelftestsUnavailable(f"Debian {SUITE} has no {package} (it has {', '.join(newest) or 'none'}): "
                                   f"name one with --package; the expected results were written for "
                                   f"{SOURCE_PACKAGE}")
    debs.mkdir(parents=True, exist_ok=True)
    log(f"downloading {package} {fields['Version']} ({fields['Filename']}) from Debian {SUITE}")
    with tempfile.TemporaryDirectory(dir=debs) as tmp:
        apt.run("apt-get", "download", "-q", f"{package}={fields['Version']}", cwd=Path(tmp))
        got = [n for n in os.listdir(tmp) if n.endswith(".deb")]
        if len(got) != 1:
            raise SelftestsUnavailable(f"apt-get download left {got}, expected one {package} .deb")
        digest = _sha256(Path(tmp) / got[0])
        if digest != fields["SHA256"]:
            raise SelftestsUnavailable(f"{got[0]}: SHA256 {digest} is not the Packages index's {fields['SHA256']}")
        os.replace(Path(tmp) / got[0], debs / got[0])
    known[package] = {"file": got[0], "version": fields["Version"], "sha256": digest}
    manifest.write_text(json.dumps(known, indent=2) + "\n")
    log(f"cached {got[0]} (SHA256 {digest}, as the signed index says)")
    return debs / got[0]


def extract_sources(deb: Path, *, log: Log = _quiet) -> Path:
    """The files of ``EXTRACT`` from the .deb's kernel tarball, once per .deb."""
    out = cache_dir() / "src" / deb.stem
    if (out / ".complete").exists():
        return out
    log(f"extracting the selftests from {deb.name}")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        _run(["dpkg-deb", "-x", str(deb), tmp], log=log)
        tarballs = sorted(Path(tmp, "usr", "src").glob("linux-source-*.tar.*"))
        if len(tarballs) != 1:
            raise SelftestsUnavailable(f"{deb.name} holds {len(tarballs)} kernel tarballs in /usr/src, not one")
        top = tarballs[0].name.split(".tar.")[0]
        _run(["tar", "-xf", str(tarballs[0]), "-C", str(out), "--strip-components=1",
              *[f"{top}/{m}" for m in EXTRACT]], log=log)
    dangling = [str(p.relative_to(out)) for p in out.rglob("*") if p.is_symlink() and not p.exists()]
    if dangling:
        raise SelftestsUnavailable(f"{deb.name}: these links point outside what vfiosim extracts (add their "
                                   f"targets to selftests.EXTRACT): {', '.join(sorted(dangling))}")
    (out / ".complete").touch()
    return out


# -- the build ------------------------------------------------------------------------------------------------

# What the package's selftests use but its tree lacks, supplied from outside it
# (what, why), and only when the tree really lacks it.
CALLOC_ASSERT = ("calloc_assert()",
                 "lib/vfio_pci_device.c calls calloc_assert(), which upstream defines in "
                 "lib/include/libvfio/assert.h; this package's assert.h does not (a partial stable "
                 "backport), so the build force-includes a definition: calloc() that fails the test "
                 "on NULL, as upstream's does")


def _compat(src: Path, build: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """EXTRA_CFLAGS and the list of what was supplied."""
    vfio = src / SELFTESTS / "vfio"
    flags: list[str] = []
    applied: list[tuple[str, str]] = []
    headers = "".join(p.read_text(errors="replace") for p in (vfio / "lib" / "include").rglob("*.h"))
    users = "".join(p.read_text(errors="replace") for p in (vfio / "lib").rglob("*.c"))
    if "calloc_assert(" in users and "define calloc_assert" not in headers:
        compat = build / "compat"
        compat.mkdir(parents=True, exist_ok=True)
        (compat / "calloc_assert.h").write_text(
            "/* vfiosim: the package's libvfio uses calloc_assert() without defining it. */\n"
            "#include <stdlib.h>\n"
            "#define calloc_assert(nmemb, size) ({ void *__vfiosim_p = calloc((nmemb), (size)); "
            "VFIO_ASSERT_NOT_NULL(__vfiosim_p); __vfiosim_p; })\n")
        flags += ["-include", str(compat / "calloc_assert.h")]
        applied.append(CALLOC_ASSERT)
    return flags, applied


@dataclass
class Build:
    package: str
    source: Path
    directory: Path
    programs: list[str]
    compat: list[tuple[str, str]]


def build(package: str = SOURCE_PACKAGE, *, download: bool = True, log: Log = _quiet) -> Build:
    """Fetch (once), extract (once) and make the selftests (make itself skips what is built)."""
    for tool in ("make", os.environ.get("CC", "gcc")):
        if shutil.which(tool) is None:
            raise SelftestsUnavailable(f"building the selftests needs {tool}")
    if not Path("/usr/include/uuid/uuid.h").exists():
        raise SelftestsUnavailable("libvfio links libuuid: install its headers (Debian package uuid-dev)")
    cache_dir().mkdir(parents=True, exist_ok=True)
    with open(cache_dir() / "lock", "w") as lock:        # one fetch, extraction and make at a time
        fcntl.flock(lock, fcntl.LOCK_EX)
        src = extract_sources(fetch_package(package, download=download, log=log), log=log)
        out = cache_dir() / "build" / src.name
        out.mkdir(parents=True, exist_ok=True)
        flags, applied = _compat(src, out)
        vfio = src / SELFTESTS / "vfio"
        uapi = f"-isystem {src / 'include/uapi'} -isystem {src / 'arch/x86/include/uapi'}"
        _run(["make", "-s", "-C", str(vfio), f"-j{os.cpu_count() or 1}", f"OUTPUT={out}", f"KHDR_INCLUDES={uapi}",
              f"EXTRA_CFLAGS={' '.join(flags)}"], log=log)
    programs = re.findall(r"^TEST_GEN_PROGS \+= (\S+)$", (vfio / "Makefile").read_text(), re.M)
    missing = [p for p in programs if not (out / p).exists()]
    if missing:
        raise SelftestsUnavailable(f"make left no {', '.join(missing)} in {out}")
    return Build(package, src, out, programs, applied)


# -- the machines and what is expected on them ----------------------------------------------------------------

@dataclass(frozen=True)
class Run:
    name: str
    machine: str
    kernel_config: str
    about: str


RUNS = [
    Run("x86-iommufd", "x86", "iommufd",
        "q35 + VT-d, two edu devices; IOMMUFD and VFIO_DEVICE_CDEV built in beside VFIO_CONTAINER, so "
        "/dev/vfio/vfio is VFIO's Type1 and /dev/iommu and the cdev exist: all five IOMMU modes"),
    Run("x86-iommufd-compat", "x86", "iommufd-compat",
        "the same with IOMMUFD_VFIO_CONTAINER: /dev/vfio/vfio is iommufd's Type1 emulation"),
    Run("x86-virtio-iommufd", "x86-virtio", "iommufd",
        "q35 + VT-d with a virtio-net NIC (MSI-X, no MSI) instead of edu (MSI, no MSI-X)"),
    Run("x86-ioat-iommufd", "x86-ioat", "iommufd",
        "q35 + VT-d with an Intel I/OAT DMA engine (8086:2021, MSI-X, no MSI), which the selftests' "
        "ioat driver drives: vfio_pci_driver_test runs"),
]

# (run, test pattern, status, why).  The first rule that matches a test's name
# (program.case, fnmatch) decides what is expected; a test no rule names must PASS.
NEWER_TYPE1 = ("the test expects EOVERFLOW from Type1's MAP_DMA of an IOVA range that wraps, as later kernels "
               "answer (this package's drivers/vfio/vfio_iommu_type1.c: vfio_dma_do_map() checks with "
               "check_add_overflow() -> -EOVERFLOW); the simulated kernel is Linux 6.12, whose "
               "vfio_dma_do_map() returns -EINVAL for `iova + size - 1 < iova`, as a Debian 6.12 host would")
COMPAT_PFNMAP = ("the test takes mode vfio_type1* to mean VFIO's own Type1, which maps a BAR's VM_PFNMAP "
                 "mmap (follow_fault_pfn); with IOMMUFD_VFIO_CONTAINER /dev/vfio/vfio is iommufd's "
                 "emulation, which pins user pages and cannot (pin_user_pages() -> EFAULT); the test "
                 "itself notes iommufd compat support 'once it lands'")
NO_DRIVER = ("the test needs a device with a selftests driver (lib/drivers: Intel IOAT or DSA, which can "
             "memcpy and raise an MSI on command); this machine has neither (x86-ioat-iommufd has an IOAT)")
NO_SRIOV = ("needs an SR-IOV physical function (sriov_totalvfs, sriov_numvfs, virtfn links, VF tokens); "
            "vfiosim models no SR-IOV")
EXPECTED: list[tuple[str, str, str, str]] = [
    ("*", "vfio_dma_mapping_test.*_hugetlb_2mb.*", "hugetlb:2048", ""),
    ("*", "vfio_dma_mapping_test.*_hugetlb_1gb.*", "hugetlb:1048576", ""),
    ("x86-iommufd", "vfio_dma_mapping_test.vfio_dma_map_limit_test.vfio_type1*_iommu.overflow", "FAIL", NEWER_TYPE1),
    ("x86-virtio-iommufd", "vfio_dma_mapping_test.vfio_dma_map_limit_test.vfio_type1*_iommu.overflow", "FAIL",
     NEWER_TYPE1),
    ("x86-ioat-iommufd", "vfio_dma_mapping_test.vfio_dma_map_limit_test.vfio_type1*_iommu.overflow", "FAIL",
     NEWER_TYPE1),
    ("x86-iommufd-compat", "vfio_dma_mapping_mmio_test.*.vfio_type1*_iommu.*", "FAIL", COMPAT_PFNMAP),
    ("x86-iommufd*", "vfio_pci_device_test.vfio_pci_irq_test.msix.*", "SKIP", "edu has no MSI-X capability"),
    ("x86-virtio-iommufd", "vfio_pci_device_test.vfio_pci_irq_test.msi.*", "SKIP",
     "virtio-net (virtio 1.x) has MSI-X, no MSI capability"),
    ("x86-ioat-iommufd", "vfio_pci_device_test.vfio_pci_irq_test.msi.*", "SKIP",
     "the IOAT channel signals through MSI-X; it has no MSI capability"),
    ("x86-ioat-iommufd", "vfio_pci_device_test.vfio_pci_device_test.reset", "SKIP",
     "the IOAT is a root-complex integrated endpoint on bus 0 with no FLR: no reset method, so "
     "VFIO_DEVICE_INFO has no VFIO_DEVICE_FLAGS_RESET and the test skips itself"),
    ("x86-iommufd*", "vfio_pci_driver_test", "SKIP", NO_DRIVER),
    ("x86-virtio-iommufd", "vfio_pci_driver_test", "SKIP", NO_DRIVER),
    ("*", "vfio_pci_sriov_uapi_test", "SKIP", NO_SRIOV),
]


def _free_hugepages(kib: int) -> int:
    try:
        return int(Path(f"/sys/kernel/mm/hugepages/hugepages-{kib}kB/free_hugepages").read_text())
    except (OSError, ValueError):
        return 0


def expected(run: str, name: str) -> tuple[str, str]:
    """(status, why) the selftest ``name`` (program.case) should have in ``run``."""
    for r, pattern, status, why in EXPECTED:
        if fnmatch.fnmatchcase(run, r) and fnmatch.fnmatchcase(name, pattern):
            if status.startswith("hugetlb:"):
                kib = int(status.split(":")[1])
                if _free_hugepages(kib):
                    return "PASS", ""
                return "SKIP", (f"the host has no free {kib // 1024} MiB hugetlb page: the test's "
                                f"mmap(MAP_HUGETLB) fails and it skips itself (given some, as root "
                                f"`echo {1 if kib > 2048 else 4} > /sys/kernel/mm/hugepages/hugepages-{kib}kB/"
                                f"nr_hugepages`, vfiosim maps them)")
            return status, why
    return "PASS", ""


# -- running them ---------------------------------------------------------------------------------------------

@dataclass
class Result:
    run: str
    name: str                 # program.case, or the program when it ran no case
    status: str               # PASS, FAIL, SKIP
    detail: str               # the SKIP reason or the failed assertion, from the program's output
    expected: str
    why: str

    @property
    def ok(self) -> bool:
        return self.status == self.expected


@dataclass
class Report:
    package: str
    compat: list[tuple[str, str]]
    runs: list[dict[str, str]]
    results: list[Result] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.results) and all(r.ok for r in self.results)

    def to_json(self) -> dict[str, object]:
        return {"package": self.package, "compat": [{"what": w, "why": y} for w, y in self.compat],
                "runs": self.runs, "ok": self.ok, "results": [{**asdict(r), "ok": r.ok} for r in self.results]}


_TAP = re.compile(r"^(ok|not ok) \d+ (\S+)(?: # SKIP ?(.*))?$")


def parse_tap(program: str, output: str, returncode: int) -> list[tuple[str, str, str]]:
    """(name, status, detail) of each case the kselftest harness reported; a program
    that reported none is one result: SKIP with its last words when it exited with
    KSFT_SKIP (4), else FAIL."""
    cases: list[tuple[str, str, str]] = []
    detail: list[str] = []
    for line in output.splitlines():
        if line.startswith("#  RUN "):
            detail = []
            continue
        m = _TAP.match(line)
        if m:
            ok, case, skip = m.groups()
            status = "SKIP" if skip is not None else ("PASS" if ok == "ok" else "FAIL")
            text = (skip or "").strip() if status == "SKIP" else \
                "; ".join(d for d in detail if "Expected" in d or "Assertion" in d or "Observed" in d
                          or "errno" in d) if status == "FAIL" else ""
            cases.append((f"{program}.{case}", status, text))
            continue
        if line.strip():
            detail.append(line.strip().lstrip("# ").strip())
    if cases:
        plan = re.search(r"^1\.\.(\d+)$", output, re.M)
        if plan and int(plan.group(1)) > len(cases):
            words = [line.strip() for line in output.splitlines() if line.strip()]
            cases.append((program, "FAIL", f"planned {plan.group(1)} tests, reported {len(cases)}, exit status "
                                           f"{returncode}: {words[-1] if words else 'no output'}"))
        return cases
    plan = re.search(r"^1\.\.0 # SKIP (.*)$", output, re.M)
    words = [line.strip() for line in output.splitlines() if line.strip()]
    if returncode == 4 or plan:
        return [(program, "SKIP", plan.group(1) if plan else (words[-1] if words else "exit status 4 (KSFT_SKIP)"))]
    return [(program, "FAIL", f"exit status {returncode}: {words[-1] if words else 'no output'}")]


def vfio_bdfs(run: Run) -> list[str]:
    """The run's machine's devices bound to vfio-pci (what `vfiosim topology` lists)."""
    from .machine import Machine
    from .topology import describe
    m = Machine.preset(run.machine, kernel_config=run.kernel_config)
    return [d["bdf"] for d in describe(m)["devices"] if d["driver"] == "vfio-pci"]


def run_program(b: Build, run: Run, program: str, bdfs: list[str], *, log: Log = _quiet,
                timeout: float = TIMEOUT) -> tuple[str, int]:
    """One selftest binary under `vfiosim run` with the machine's vfio-pci BDFs as its
    arguments (each test takes the first; vfio_pci_device_init_perf_test takes all)."""
    argv = [sys.executable, "-m", "vfiosim", "run", "--machine", run.machine, "--kernel-config", run.kernel_config,
            "--", str(b.directory / program), *bdfs]
    log("$ " + " ".join(argv[1:]))
    try:
        proc = subprocess.run(argv, cwd=b.directory, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout, env={k: v for k, v in os.environ.items()
                                                    if not k.startswith("VFIOSIM_")})
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return out + f"\nvfiosim selftests: {program} did not end within {timeout:.0f} s\n", -1
    return proc.stdout.replace(f"{b.source}/", ""), proc.returncode


def run_selftests(package: str = SOURCE_PACKAGE, *, runs: list[str] | None = None, only: list[str] | None = None,
                  download: bool = True, log: Log = _quiet, output: Path | None = None) -> Report:
    """Build the selftests and run each on each machine of ``runs`` (default: all of RUNS)."""
    b = build(package, download=download, log=log)
    chosen = [r for r in RUNS if runs is None or r.name in runs]
    unknown = set(runs or ()) - {r.name for r in RUNS}
    if unknown:
        raise ValueError(f"unknown run {', '.join(sorted(unknown))}: one of {', '.join(r.name for r in RUNS)}")
    report = Report(package, b.compat, [])
    for run in chosen:
        bdfs = vfio_bdfs(run)
        report.runs.append({"name": run.name, "machine": run.machine, "kernel_config": run.kernel_config,
                            "devices": " ".join(bdfs), "about": run.about})
        for program in b.programs:
            if only and not any(fnmatch.fnmatchcase(program, o) for o in only):
                continue
            text, rc = run_program(b, run, program, bdfs, log=log)
            if output is not None:
                output.mkdir(parents=True, exist_ok=True)
                (output / f"{run.name}.{program}.log").write_text(text)
            for name, status, detail in parse_tap(program, text, rc):
                want, why = expected(run.name, name)
                report.results.append(Result(run.name, name, status, detail, want, why))
            log(f"{run.name}: {program}: " + ", ".join(
                f"{n} {s}" for s in ("PASS", "FAIL", "SKIP")
                if (n := sum(1 for r in report.results if r.run == run.name and r.name.split('.')[0] == program
                             and r.status == s))))
    return report


def print_report(report: Report, out: TextIO) -> None:
    """Per run and program, each case's result; what is not PASS gets what the test
    said and a numbered note saying why (each note printed once, after its run)."""
    w = out.write
    w(f"Linux VFIO selftests from Debian's {report.package}, unmodified, under `vfiosim run`\n")
    for what, why in report.compat:
        w(f"  build: supplied {what}: {why}\n")
    for run in report.runs:
        rows = [r for r in report.results if r.run == run["name"]]
        counts = {s: sum(1 for r in rows if r.status == s) for s in ("PASS", "FAIL", "SKIP")}
        w(f"\n{run['name']}: --machine {run['machine']} --kernel-config {run['kernel_config']}, "
          f"devices {run['devices']}\n  {run['about']}\n")
        notes: list[str] = []
        program = None
        for r in rows:
            prog, _, case = r.name.partition(".")
            if prog != program:
                program = prog
                w(f"  {prog}\n")
            line = f"    {r.status:4}  {case or '(the whole program)'}"
            if r.why:
                if r.why not in notes:
                    notes.append(r.why)
                line += f"  [{notes.index(r.why) + 1}]"
            if r.status == "FAIL" and r.detail:
                line += f"  ({r.detail})"
            if not r.ok:
                line += f"   <-- UNEXPECTED, expected {r.expected}" + (f" ({r.detail})" if r.status != "FAIL" and
                                                                       r.detail else "")
            w(line + "\n")
        for i, note in enumerate(notes, 1):
            w(f"  [{i}] {note}\n")
        w(f"  {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped\n")
    bad = [r for r in report.results if not r.ok]
    w("\n" + ("every result is the expected one\n" if report.ok else
              f"{len(bad)} unexpected result(s): " + ", ".join(f"{r.run}: {r.name} {r.status}" for r in bad) + "\n"))
