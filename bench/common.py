"""Helpers shared by the benchmarks: process-tree memory sampling and result rows."""
from __future__ import annotations

import codecs
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def _tree_pids(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                parent = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry))
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(children.get(pid, []))
    return pids


def _busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy since boot (all cores; /proc/stat's first line
    without idle and iowait)."""
    with open("/proc/stat") as handle:
        fields = [int(v) for v in handle.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _cpu_s(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_measured(command: list[str], env: dict[str, str] | None = None, interval: float = 0.1, echo=None,
                 timeout_s: float | None = None) -> dict:
    """Run `command`, sampling the summed RSS of its whole process tree every `interval` s.
    After `timeout_s` seconds its whole process tree is killed (SIGKILL) and `timed_out` is True.

    stderr is read line by line as it arrives (passed to `echo` when given) and every line and
    memory sample is time-stamped, so a phase delimited by log lines can be cut out afterwards
    (bench/peers/measure.py's layerquant_phases). Returns wall_s, cpu_s (the tree's CPU time),
    other_cpu_cores (the mean number of cores that other work on the machine kept busy meanwhile:
    a time measured beside other work is not an idle one), peak tree RSS, the main process's own
    peak, return code, stdout, stderr (whole), stderr_lines as (seconds since start, text) and
    samples as (seconds since start, tree MB)."""
    start = time.perf_counter()
    # other work on the machine while the case runs: the machine's busy CPU time minus the case's
    # own (its waited-for process tree) and this runner's (the sampling threads)
    busy_before, own_before, tree_before = _busy_cpu_s(), _cpu_s(resource.RUSAGE_SELF), _cpu_s(resource.RUSAGE_CHILDREN)
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
    samples: list[tuple[float, float]] = []
    main_peak = [0.0]
    lines: list[tuple[float, str]] = []
    out: list[str] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append((time.perf_counter() - start, sum(_rss_mb(p) for p in _tree_pids(process.pid))))
            main_peak[0] = max(main_peak[0], _rss_mb(process.pid))
            time.sleep(interval)

    def drain_stdout() -> None:
        out.append(process.stdout.read())

    timed_out = threading.Event()

    def kill_tree_when_late() -> None:
        if not done.wait(timeout_s):
            timed_out.set()
            for pid in reversed(_tree_pids(process.pid)):  # children first: none is left orphaned and running
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    threads = [threading.Thread(target=sample, daemon=True), threading.Thread(target=drain_stdout, daemon=True)]
    if timeout_s is not None:
        threads.append(threading.Thread(target=kill_tree_when_late, daemon=True))
    for thread in threads:
        thread.start()
    # tqdm progress bars end their updates with \r: split on it too, so each update is a line with its time
    for line in _lines(process.stderr):
        lines.append((time.perf_counter() - start, line))
        if echo is not None:
            echo(line)
    process.wait()
    done.set()
    for thread in threads:
        thread.join()
    wall_s = time.perf_counter() - start
    tree_cpu_s = _cpu_s(resource.RUSAGE_CHILDREN) - tree_before
    other_cpu_s = _busy_cpu_s() - busy_before - tree_cpu_s - (_cpu_s(resource.RUSAGE_SELF) - own_before)
    return {"wall_s": round(wall_s, 2), "cpu_s": round(tree_cpu_s, 2), "other_cpu_cores": round(max(other_cpu_s, 0.0) / wall_s, 2),
            "peak_rss_mb": round(max((mb for _, mb in samples), default=0.0), 1),
            "peak_rss_main_mb": round(main_peak[0], 1), "returncode": process.returncode, "stdout": "".join(out),
            "stderr": "".join(text + "\n" for _, text in lines), "stderr_lines": lines, "samples": samples,
            "timed_out": timed_out.is_set()}


def _lines(stream):
    """The text lines of a text-mode pipe as they arrive (whatever is available, not a whole
    buffer's worth), split at \n and at \r; empty ones dropped."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = ""
    while chunk := stream.buffer.read1(65536):
        *complete, pending = re.split(r"\r\n|\r|\n", pending + decoder.decode(chunk))
        yield from (line for line in complete if line)
    pending += decoder.decode(b"", final=True)
    if pending:
        yield pending


def machine() -> str:
    from layerquant.report import machine_description

    return machine_description()


def settle(max_load: float | None, max_wait_s: float = 240.0) -> float:
    """Wait until the 1-minute load average is below `max_load` (at most `max_wait_s`), so a
    timed case does not start in the tail of the previous one's load; returns the seconds
    waited (0 without a threshold). The row still records the load it started at."""
    if max_load is None:
        return 0.0
    started = time.monotonic()
    while os.getloadavg()[0] >= max_load and time.monotonic() - started < max_wait_s:
        time.sleep(5)
    return round(time.monotonic() - started, 1)


# what a layerquant store folder holds (infra/store.py, infra/lease.py): nothing else is ever deleted
STORE_ENTRIES = {"cas", "runs", "leases"}


def empty_store(folder: str | os.PathLike[str]) -> None:
    """Delete a layerquant store so that a benchmark measures a cold run; refuses a folder that
    holds anything a store does not (a mistyped --store must not cost a user their files)."""
    path = Path(folder).expanduser()
    if not path.exists():
        return
    foreign = sorted(p.name for p in path.iterdir()) if path.is_dir() else [path.name]
    foreign = [name for name in foreign if name not in STORE_ENTRIES]
    if foreign:
        raise SystemExit(f"{path} is not a layerquant store (it holds {', '.join(foreign[:5])}): refusing to empty it; "
                         "pass a --store folder that only layerquant uses")
    shutil.rmtree(path)


def commit() -> str:
    """The checkout's commit (with "+dirty" when files differ from it): which code a row measured."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def conditions() -> dict:
    """What a row's timing depends on besides the code: the 1-minute load average when the case
    starts (other work on the cores) and the kernel's transparent-huge-pages mode (the same
    case took 400 s one day and 228 s the next)."""
    try:
        thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().split("[", 1)[1].split("]", 1)[0]
    except (OSError, IndexError):
        thp = "unknown"
    return {"loadavg_1min_at_start": round(os.getloadavg()[0], 2), "transparent_hugepages": thp}


def write_rows(name: str, rows: list[dict]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(rows, indent=2) + "\n")
    return path


def load_rows(name: str) -> list[dict]:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else []


def run_layerquant_case(case: str, flags: list[str], store: str, out_root: str, env: dict[str, str] | None = None) -> dict:
    """One `layerquant quantize` in its own process (peak RSS of its whole tree, Prefect's
    temporary server included); returns its report plus the measured wall time and memory."""
    import sys

    out = Path(out_root) / case
    command = [sys.executable, "-m", "layerquant.cli", "quantize", *flags, "--store", store, "--out", str(out), "--overwrite"]
    measured = run_measured(command, env=env)
    if measured["returncode"] != 0:
        raise RuntimeError(f"{case} failed ({measured['returncode']}): {measured['stderr'][-2000:]}")
    report = json.loads((out / "report.json").read_text())
    return {"report": report, "wall_s": measured["wall_s"], "peak_rss_mb": measured["peak_rss_mb"]}
