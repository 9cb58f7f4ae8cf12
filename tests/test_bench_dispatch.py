"""`mmpt bench NAME ...`: each bench declares its own flags; stdout carries exactly one JSON object."""
import json
import subprocess
import sys
import types

import pytest

import mmpt.bench as bench
from mmpt.cli import main
from tests.conftest import ROOT

# Every command line the benches took before each declared its own flags, as the README and docs show them.
KNOWN = [["data", "--json", "--samples", "64", "--size", "64"], ["moe", "--json"], ["loss", "--json"],
         ["accumulate"], ["step", "--json", "--shape", "b16", "--size", "8", "--steps", "2"],
         ["parity", "--steps", "4", "--seeds", "0,1", "--trunk", "dense", "--mmpt-override", "a.b=1"],
         ["imp-scale", "--cpu-smoke", "--configs", "imp_b16", "--peak-tflops", "0.05"]]


@pytest.fixture
def chatty(monkeypatch):
    """A bench whose work prints to stdout (as libraries do), registered like the shipped ones."""
    module = types.ModuleType("mmpt.bench.chatty")

    def add_arguments(parser):
        parser.add_argument("--n", type=bench.count(1), default=3)

    def main(args):
        print("library chatter")
        return {"bench": "chatty", "n": args.n}

    module.add_arguments, module.main = add_arguments, main
    module.exit_code = lambda result: 0 if result["n"] < 5 else 1
    monkeypatch.setitem(sys.modules, "mmpt.bench.chatty", module)
    monkeypatch.setitem(bench.BENCHES, "chatty", "a test bench")
    return module


@pytest.mark.parametrize("argv", KNOWN, ids=lambda a: a[0])
def test_each_bench_parses_its_own_flags(argv):
    name, rest = argv[0], argv[1:]
    args = bench.build_parser(name, bench.module_of(name)).parse_args(rest)
    assert args.json == ("--json" in rest)


def test_a_flag_another_bench_owns_is_a_one_line_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        bench.run_bench("moe", ["--samples", "4"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mmpt bench moe: error: unrecognized arguments: --samples 4" in err


def test_stdout_is_one_json_object_and_out_the_same(chatty, tmp_path, capsys):
    out = tmp_path / "sub" / "r.json"
    assert bench.run_bench("chatty", ["--json", "--n", "4", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("\n") == 1 and json.loads(captured.out) == {"bench": "chatty", "n": 4}
    assert "library chatter" in captured.err
    assert json.loads(out.read_text()) == json.loads(captured.out)


def test_cli_passes_the_rest_to_the_bench_and_takes_its_exit_code(chatty, capsys):
    assert main(["bench", "chatty", "--n", "7"]) == 1  # the bench's exit_code
    assert json.loads(capsys.readouterr().out) == {"bench": "chatty", "n": 7}  # indented without --json
    assert main(["bench", "--json", "chatty"]) == 0  # --json before the name, as the CLI always took it
    assert json.loads(capsys.readouterr().out)["n"] == 3


def test_bench_help_lists_the_bench_flags():
    proc = subprocess.run([sys.executable, "-m", "mmpt.cli", "bench", "parity", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "--mmpt-override" in proc.stdout and "--seeds" in proc.stdout


def test_the_old_vs_open_clip_script_runs_the_parity_bench():
    """Issue 22 and the older notes name data_pipelines/vs_open_clip.py; it forwards to `mmpt bench parity`."""
    script = [sys.executable, "data_pipelines/vs_open_clip.py"]
    proc = subprocess.run([*script, "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0 and "--equal-time" in proc.stdout and "--seeds" in proc.stdout
    proc = subprocess.run([*script, "--steps", "0"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "mmpt bench parity: error: argument --steps" in proc.stderr
