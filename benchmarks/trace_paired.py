#!/usr/bin/env python3
"""What `--trace` costs, in paired runs of two trees (not a test).

run_bench.py's `trace` figure divides the best untraced run by the best
traced one, each found separately: on a loaded 2-core machine the two bests
come from different moments and the figure swings by a third.  Here every
round runs each tree untraced and then traced back to back (the trees'
order alternating), so each ratio compares runs made close together; the
median of the rounds' ratios is the steadier figure.

    python3 benchmarks/trace_paired.py BEFORE_SRC AFTER_SRC [--workload dma|map] [--rounds N] [--json FILE]

BEFORE_SRC and AFTER_SRC are `src` directories (e.g. of a `git archive` of the
older commit), put on PYTHONPATH for `python -m vfiosim.cli run`.  Workloads
are run_bench's: `dma` the edu DMA of 4 MiB on pseries (MB/s), `map` 10,000
sPAPR v2 4 KiB MAP_DMA+UNMAP_DMA pairs (ns a pair).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_bench import build  # noqa: E402

WORKLOADS = {"dma": ["dma", "4", "spapr2", "0", "0000:00:00.0"], "map": ["mapunmap", "10000", "spapr2", "0"]}


def one(exe: str, src: str, workload: str, trace: str | None) -> float:
    cmd = [sys.executable, "-m", "vfiosim.cli", "run", "--machine", "pseries"]
    if trace:
        if os.path.exists(trace):
            os.unlink(trace)
        cmd += ["--trace", trace]
    out = subprocess.run([*cmd, "--", exe, *WORKLOADS[workload]], capture_output=True, text=True, timeout=900,
                         env={**os.environ, "PYTHONPATH": src})
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stdout}{out.stderr}")
    return float(out.stdout.split()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="dma")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    trees = {"before": os.path.abspath(args.before), "after": os.path.abspath(args.after)}
    runs: dict[str, dict[str, list[float]]] = {t: {"untraced": [], "traced": [], "ratio": []} for t in trees}
    loads: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        exe = build(tmp)
        trace = os.path.join(tmp, "t.jsonl")
        for i in range(args.rounds):
            order = list(trees.items())
            for name, src in order if i % 2 == 0 else order[::-1]:
                plain = one(exe, src, args.workload, None)
                traced = one(exe, src, args.workload, trace)
                r = runs[name]
                r["untraced"].append(plain)
                r["traced"].append(traced)
                # a time ratio either way: DMA gives MB/s, the pairs ns
                r["ratio"].append(plain / traced if args.workload == "dma" else traced / plain)
            loads.append(os.getloadavg()[0])
            print(f"[{i + 1}/{args.rounds}] " + "  ".join(f"{t} {runs[t]['ratio'][-1]:.3f}" for t in trees),
                  file=sys.stderr)
    summary = {}
    for name, r in runs.items():
        summary[name] = {"median_paired_ratio": statistics.median(r["ratio"]), **r}
        spread = ("; quartiles " + ", ".join(f"{q:.3f}" for q in statistics.quantiles(r["ratio"], n=4))
                  if len(r["ratio"]) > 1 else "")
        print(f"{args.workload} {name}: --trace costs {statistics.median(r['ratio']):.3f}x untraced time "
              f"(median of {args.rounds} paired rounds{spread})")
    print(f"load average (1 min) during the runs: {min(loads):.2f} to {max(loads):.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"workload": args.workload, "unit": "MB/s" if args.workload == "dma" else "ns a pair",
                       "rounds": args.rounds, "load_average_1min": loads, "trees": {**trees},
                       "results": summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
