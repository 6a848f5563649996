"""`vfiosim bench`: the quick smoke run of every benchmark (the CI's), its
table, JSON and charts.  The full suite's figures are for docs/performance.md,
never asserted here: timings on a shared machine are not test material."""

from __future__ import annotations

import json

import pytest

from vfiosim import bench
from vfiosim.cli import main


def test_quick_bench_runs_every_figure_and_writes_json_and_charts(tmp_path, capsys):
    out_json = tmp_path / "bench.json"
    plots = tmp_path / "plots"
    assert main(["bench", "--quick", "--no-progress", "--json", str(out_json), "--plot", str(plots)]) == 0
    printed = capsys.readouterr().out
    data = json.loads(out_json.read_text())
    names = [f["name"] for f in data["figures"]]
    assert len(names) == len(bench.suite(quick=True)) == 13
    for name in names:
        assert name in printed
    for f in data["figures"]:
        assert f["value"] == f["value"] and f["value"] != float("inf")     # measured, finite
        assert f["met"] is None                     # quick figures are not judged
    window = next(f for f in data["figures"] if f["name"].startswith("memory of an empty"))
    assert window["detail"]["bytes"] < 1 << 20      # the sparse table, even at 1 GiB
    pngs = sorted(p.name for p in plots.iterdir())
    assert pngs == ["DMA-scaling.png", "goals.png", "map-unmap-scaling.png"]
    for p in plots.iterdir():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_only_selects_figures_and_rejects_unknown_names(capsys):
    assert main(["bench", "--quick", "--no-progress", "--only", "ioctl"]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert len(table) == 3 and "ioctl" in table[1] and "smoke" in table[2]
    assert main(["bench", "--only", "nonsense"]) == 2
    assert "no figure 'nonsense'" in capsys.readouterr().err


def test_strict_fails_on_an_unmet_goal(monkeypatch, capsys):
    unmet = bench.Figure("always short", 0.01, "x", ">= 1", False)
    monkeypatch.setattr(bench, "suite", lambda quick=False: [("short", lambda: unmet)])
    assert main(["bench", "--no-progress", "--strict"]) == 1
    assert main(["bench", "--no-progress"]) == 0
    assert "NO" in capsys.readouterr().out


def test_plot_without_matplotlib_says_how_to_get_it(monkeypatch, tmp_path):
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit, match=r"vfiosim\[plot\]"):
        main(["bench", "--quick", "--plot", str(tmp_path)])


def test_the_run_benchmarks_smoke_run_measures_every_figure(tmp_path):
    """benchmarks/run_bench.py (issue 13's figures under `vfiosim run`) at tiny
    sizes: a C program built, run under the daemon and timed for each figure
    (a C compiler is there: the package's own install built its C)."""
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "run_bench.py"
    out_json = tmp_path / "run.json"
    done = subprocess.run([sys.executable, str(script), "--quick", "--json", str(out_json)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    figures = json.loads(out_json.read_text())["figures"]
    assert len(figures) == 13
    for f in figures:
        assert 0 < f["value"] < float("inf") and f["met"] is None, f
    traced = next(f for f in figures if f["name"].startswith("run: --trace vs untraced (4 KiB MAP_DMA"))
    # Paired rounds (3 at --quick's one repeat): each with its untraced and its traced run.
    for f in (traced, next(f for f in figures if f["name"].startswith("run: --trace vs untraced (edu"))):
        runs = [v for k, v in f["detail"].items() if k.startswith(("traced_", "untraced_"))]
        assert [len(v) for v in runs] == [3, 3] and all(x > 0 for v in runs for x in v), f


def test_the_daemon_pair_smoke_run_measures_every_layer(tmp_path):
    """benchmarks/daemon_pair.py (the daemon's share of a MAP+UNMAP pair,
    layer by layer, in one process) at a tiny size, for every IOMMU."""
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "daemon_pair.py"
    out_json = tmp_path / "daemon.json"
    done = subprocess.run([sys.executable, str(script), "--pairs", "20", "--repeat", "1", "--opcodes",
                           "--json", str(out_json)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(out_json.read_text())["results"]
    assert sorted(results) == ["spapr1", "spapr2", "type1v2"]
    for figures in results.values():
        assert len(figures) == 10 and all(0 < v < 1e9 for v in figures.values()), figures
        # A pair is two requests: each at least a few Python calls and their bytecodes.
        assert figures["serve_pair_python_calls"] >= 10 and figures["serve_pair_bytecodes"] > 20 * 10


def test_the_paired_trace_benchmark_compares_two_trees(tmp_path):
    """benchmarks/trace_paired.py (what --trace costs, untraced and traced
    runs paired) for one round, this tree against itself."""
    import subprocess
    import sys
    from pathlib import Path
    # (A C compiler is there: the package's own install built its C.)
    root = Path(__file__).resolve().parent.parent
    src = str(root / "src")
    out_json = tmp_path / "paired.json"
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "trace_paired.py"), src, src,
                           "--workload", "map", "--rounds", "1", "--json", str(out_json)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(out_json.read_text())["results"]
    for tree in ("before", "after"):
        r = results[tree]
        assert r["untraced"][0] > 0 and r["traced"][0] > 0
        assert r["median_paired_ratio"] == r["traced"][0] / r["untraced"][0]
    assert "--trace costs" in done.stdout
