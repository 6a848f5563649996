"""The command line with bad input: one clear message and a non-zero status,
never a traceback and nothing left behind; the machine chosen as the client
library chooses it ($VFIOSIM_MACHINE); `--json [FILE]` the same for every
command; progress without carriage returns where stderr is not a terminal."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tempfile

import pytest

import vfiosim
from vfiosim import bench, client
from vfiosim.cli import main

CLI = [sys.executable, "-m", "vfiosim"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """Temporary files of the command (fake sysfs trees) go here, to see that none is left."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


# -- files that are not there ---------------------------------------------------------------------------


@pytest.mark.parametrize("sub", ["show", "summary"])
def test_trace_commands_name_a_missing_file(capsys, sub):
    rc, out, err = run(capsys, "trace", sub, "/nonexistent")
    assert rc == 1 and out == ""
    assert err == f"vfiosim trace {sub}: /nonexistent: No such file or directory\n"


def test_trace_show_names_a_file_that_is_not_json_lines(capsys, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("these are not JSON lines\n")
    rc, _, err = run(capsys, "trace", "show", str(path))
    assert rc == 1 and err.startswith(f"vfiosim trace show: {path}:1: not a trace: the first line is not JSON")


def test_run_with_a_trace_in_a_missing_directory_says_so_and_leaves_nothing(capsys, private_tmp):
    rc, _, err = run(capsys, "run", "--trace", "/nonexistent/dir/x.jsonl", "--", "true")
    assert rc == 1
    assert err == "vfiosim run: /nonexistent/dir/x.jsonl: No such file or directory\n"
    assert list(private_tmp.iterdir()) == []               # no fake sysfs tree left


@pytest.mark.parametrize("option", ["--trace", "--socket"])
def test_serve_with_a_path_in_a_missing_directory_says_so_and_leaves_nothing(capsys, private_tmp, option):
    rc, out, err = run(capsys, "serve", option, "/nonexistent/dir/x", "--socket" if option == "--trace" else "--trace",
                       str(private_tmp / "ok"))
    assert rc == 1 and "serving" not in out
    assert err == "vfiosim serve: /nonexistent/dir/x: No such file or directory\n"
    assert [p.name for p in private_tmp.iterdir()] in ([], ["ok"])     # a trace opened first may stay, empty


def test_json_to_a_missing_directory_fails_before_any_work(capsys, monkeypatch):
    ran = []
    monkeypatch.setattr(bench, "suite", lambda quick=False: [("f", lambda: ran.append(1))])
    rc, _, err = run(capsys, "bench", "--no-progress", "--json", "/nonexistent/dir/b.json")
    assert rc == 1 and err == "vfiosim bench: /nonexistent/dir/b.json: No such file or directory\n"
    assert ran == []
    rc, _, err = run(capsys, "topology", "--json", "/nonexistent/dir/t.json")
    assert rc == 1 and err == "vfiosim topology: /nonexistent/dir/t.json: No such file or directory\n"


def test_fuzz_replay_of_a_missing_file_says_so(capsys):
    rc, _, err = run(capsys, "fuzz", "ioctl", "--replay", "/nonexistent/input")
    assert rc == 1 and err == "vfiosim fuzz: /nonexistent/input: No such file or directory\n"


def test_as_a_program_the_errors_are_messages_not_tracebacks(tmp_path):
    for argv in (["trace", "show", "/nonexistent"], ["run", "--trace", "/nonexistent/dir/x.jsonl", "--", "true"],
                 ["serve", "--socket", str(tmp_path)], ["topology", "--machine", "powrenv"]):
        proc = subprocess.run([*CLI, *argv], capture_output=True, text=True, timeout=120)
        assert proc.returncode in (1, 2), (argv, proc.stderr)
        assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, (argv, proc.stderr)


# -- choosing the machine --------------------------------------------------------------------------------


def test_a_mistyped_machine_lists_the_presets(capsys):
    rc, out, err = run(capsys, "demo", "--machine", "powrenv")
    assert rc == 2 and out == ""
    assert "unknown machine 'powrenv'" in err and "presets: powernv, powernv-virtio, pseries, x86, x86-ioat, x86-virtio" in err
    with pytest.raises(ValueError, match="presets: powernv, powernv-virtio, pseries, x86, x86-ioat, x86-virtio"):
        vfiosim.Machine.load("powrenv")


def test_the_command_honours_vfiosim_machine_kernel_and_page_size(capsys, monkeypatch):
    monkeypatch.setenv("VFIOSIM_MACHINE", "pseries")
    monkeypatch.setenv("VFIOSIM_PAGE_SIZE", "65536")
    rc, out, _ = run(capsys, "topology", "--json")
    assert rc == 0
    topo = json.loads(out)
    assert (topo["platform"], topo["page_size"]) == ("pseries", 65536)
    rc, out, _ = run(capsys, "topology", "--json", "--machine", "x86", "--page-size", "4096")   # options win
    assert rc == 0 and json.loads(out)["platform"] == "x86"
    monkeypatch.setenv("VFIOSIM_MACHINE", "powernv")
    monkeypatch.setenv("VFIOSIM_KERNEL", "3.10")
    monkeypatch.delenv("VFIOSIM_PAGE_SIZE")
    rc, out, _ = run(capsys, "topology", "--json")
    assert rc == 0 and json.loads(out)["kernel"] == "3.10"


@pytest.mark.parametrize("var,value,says", [
    ("VFIOSIM_MACHINE", "powrenv", "$VFIOSIM_MACHINE: unknown machine 'powrenv'"),
    ("VFIOSIM_KERNEL", "2.6", "$VFIOSIM_KERNEL is '2.6': not a kernel profile (6.12, 3.10)"),
    ("VFIOSIM_PAGE_SIZE", "8k", "$VFIOSIM_PAGE_SIZE is '8k': not a page size (4096, 65536)"),
])
def test_a_bad_environment_value_is_named_by_the_command_and_the_client(capsys, monkeypatch, var, value, says):
    monkeypatch.setenv(var, value)
    rc, _, err = run(capsys, "demo")
    assert rc == 2 and says in err
    with pytest.raises(ValueError) as info:
        client.SimBackend()
    assert says in str(info.value)


# -- --json [FILE] ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("json_args", [["--json"], ["--json", "-"]], ids=["bare", "dash"])
def test_json_on_standard_output_replaces_the_text(capsys, monkeypatch, json_args):
    rc, out, _ = run(capsys, "topology", *json_args)
    assert rc == 0 and json.loads(out)["machine"] == "powernv9"
    monkeypatch.setattr(bench, "suite", lambda quick=False: [("one", lambda: bench.Figure("one", 1.0, "x", "-"))])
    rc, out, err = run(capsys, "bench", "--no-progress", *json_args)
    assert rc == 0
    assert [f["name"] for f in json.loads(out)["figures"]] == ["one"]
    assert "figure" in err                                  # the table, out of the parser's way


def test_json_to_a_file_keeps_the_text_on_standard_output(capsys, tmp_path, monkeypatch):
    path = tmp_path / "t.json"
    rc, out, _ = run(capsys, "topology", "--json", str(path))
    assert rc == 0 and "IOMMU groups" in out
    assert json.loads(path.read_text())["machine"] == "powernv9"
    monkeypatch.setattr(bench, "suite", lambda quick=False: [("one", lambda: bench.Figure("one", 1.0, "x", "-"))])
    rc, out, _ = run(capsys, "bench", "--no-progress", "--json", str(tmp_path / "b.json"))
    assert rc == 0 and "one" in out and f"wrote {tmp_path / 'b.json'}" in out
    assert json.loads((tmp_path / "b.json").read_text())["figures"][0]["name"] == "one"


# -- progress --------------------------------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _figures():
    return [(n, lambda n=n: bench.Figure(n, 1.0, "x", "-")) for n in ("first", "second")]


def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(monkeypatch):
    monkeypatch.setattr(bench, "suite", lambda quick=False: _figures())
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    bench.run(out=io.StringIO())
    text = err.getvalue()
    assert "\r" not in text
    assert [line.split("]")[0] for line in text.splitlines()[:2]] == ["vfiosim bench: [1/2", "vfiosim bench: [2/2"]


def test_progress_is_a_bar_redrawn_in_place_on_a_terminal(monkeypatch):
    monkeypatch.setattr(bench, "suite", lambda quick=False: _figures())
    err = _Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    bench.run(out=io.StringIO())
    assert err.getvalue().count("\r") == 3 and "2/2 done" in err.getvalue()

