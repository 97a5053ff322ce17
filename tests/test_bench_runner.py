"""The benchmark runner's process handling (bench/common.run_measured, bench/peers/run_all.timed_out):
progress bars read as timed lines, a late case killed with its whole process tree, the pace
of a stopped AutoRound case read from its progress bar, and other work beside a case measured."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def bench_modules():
    sys.path[:0] = [str(BENCH), str(BENCH / "peers")]
    try:
        import common
        import run_all

        yield common, run_all
    finally:
        for path in (str(BENCH), str(BENCH / "peers")):
            sys.path.remove(path)


def test_progress_bar_updates_are_separate_timed_lines(bench_modules):
    common, _ = bench_modules
    child = ("import sys, time\n"
             "for i in range(3):\n"
             "    sys.stderr.write(f'step {i}\\r'); sys.stderr.flush(); time.sleep(0.2)\n"
             "sys.stderr.write('d\\u00e9j\\u00e0\\nend\\n')\n")
    measured = common.run_measured([sys.executable, "-c", child])
    texts = [text for _, text in measured["stderr_lines"]]
    assert texts == ["step 0", "step 1", "step 2", "déjà", "end"]
    times = [at for at, _ in measured["stderr_lines"]]
    assert times[2] - times[0] >= 0.35  # stamped as they arrived, not when the pipe closed
    assert measured["returncode"] == 0 and not measured["timed_out"]


def test_a_late_case_is_killed_with_its_children(bench_modules, tmp_path):
    common, _ = bench_modules
    pid_file = tmp_path / "grandchild.pid"
    child = ("import subprocess, sys, time\n"
             "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
             f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
             "sys.stderr.write('started\\n'); sys.stderr.flush()\n"
             "time.sleep(60)\n")
    started = time.perf_counter()
    measured = common.run_measured([sys.executable, "-c", child], timeout_s=2.0)
    assert time.perf_counter() - started < 20
    assert measured["timed_out"] and measured["returncode"] == -9
    assert [text for _, text in measured["stderr_lines"]] == ["started"]
    grandchild = int(pid_file.read_text())
    for _ in range(50):  # killed: gone, or a zombie until init reaps it
        try:
            state = Path(f"/proc/{grandchild}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            break
        if state == "Z":
            break
        time.sleep(0.1)
    else:
        os.kill(grandchild, 9)
        pytest.fail("the case's child process outlived the timeout")


def test_a_stopped_autoround_case_reports_its_pace(bench_modules):
    _, run_all = bench_modules
    pattern = run_all.TOOLS["auto-round"]["progress"]
    lines = [(3.0, "Quantizing model.layers.0:   0%|          | 0/18 [00:00<?, ?it/s]"),
             (103.0, "Quantizing model.layers.1:   6%|▌         | 1/18 [01:40<28:20, 100.00s/it]"),
             (205.0, "Quantizing model.layers.2:  11%|█         | 2/18 [03:22<27:00, 101.00s/it]"),
             (207.0, "Quantizing model.layers.2:  11%|█         | 2/18 [03:24<27:00, 101.00s/it]")]
    stopped = run_all.timed_out({"stderr_lines": lines}, 600, pattern, "autoround")
    assert stopped.fields == {"stopped_after_s": 600, "blocks_done": 2, "blocks_total": 18, "block_s": 101.0,
                              "estimated_case_s": 3 + 101 * 18}
    assert "2 of 18 blocks" in str(stopped) and "0.5 h" in str(stopped)
    # no progress line finished a block: the row says only when it was stopped
    assert run_all.timed_out({"stderr_lines": lines[:1]}, 600, pattern, "autoround").fields == {"stopped_after_s": 600}


SPIN = "import time\nwhile time.process_time() < {seconds}:\n    pass\n"


def test_a_cases_own_cpu_and_other_work_beside_it_are_measured(bench_modules):
    """A case that burns 1 s of CPU itself, then one that sleeps while a process outside its tree
    burns 1.5 s: the first's CPU is its own (cpu_s), the second sees the other work."""
    common, _ = bench_modules
    own = common.run_measured([sys.executable, "-c", SPIN.format(seconds=1.0)])
    assert own["cpu_s"] >= 1.0
    beside = subprocess.Popen([sys.executable, "-c", SPIN.format(seconds=1.5)])
    try:
        idle_case = common.run_measured([sys.executable, "-c", "import time; time.sleep(2.0)"])
    finally:
        beside.wait()
    assert idle_case["cpu_s"] < 0.5
    # the spinner ran (almost) all of the 2 s beside the sleeping case: about 0.7 of a core or more
    assert idle_case["other_cpu_cores"] >= 0.5, idle_case["other_cpu_cores"]
