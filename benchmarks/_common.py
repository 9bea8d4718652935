"""Shared helpers for the benchmarks: timing, CPU/memory accounting, hardware
and version records, fresh-process workers and table formatting.

Only the standard library, numpy and psutil are imported here, so a worker
can use these helpers before it decides which framework to load.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from importlib import metadata

import numpy as np

RESULT_MARK = "@@RESULT "


# --------------------------------------------------------------------------- timing

class Meter:
    """Wall time, this process's CPU time and the CPU time of everything else.

    `cores` = process CPU seconds / wall seconds (2.0 = both cores busy);
    `others` = CPU used by other processes during the window, in cores (a
    noise indicator on a shared machine).
    """

    def __enter__(self):
        self._wall, self._cpu, self._sys = time.perf_counter(), time.process_time(), _busy()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu
        self.others = max(0.0, (_busy() - self._sys) - self.cpu) / max(self.wall, 1e-9)
        self.cores = self.cpu / max(self.wall, 1e-9)
        return False


def _busy() -> float:
    """System-wide busy CPU seconds (all cores)."""
    try:
        import psutil
        t = psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0)
    except ImportError:  # pragma: no cover - psutil is a dependency of the venv
        return 0.0


def time_calls(fn, n: int, block=lambda out: out):
    """Calls `fn()` n times; returns (per-call seconds, Meter over all calls, last output)."""
    times, out = [], None
    with Meter() as m:
        for _ in range(n):
            t0 = time.perf_counter()
            out = block(fn())
            times.append(time.perf_counter() - t0)
    return times, m, out


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux: ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def wait_for_quiet(max_cores: float = 0.3, max_wait_s: float = 60.0) -> float:
    """Waits (up to max_wait_s) until other processes use < max_cores; returns the last load."""
    import psutil

    deadline, load = time.time() + max_wait_s, 0.0
    while True:
        load = psutil.cpu_percent(interval=1.0) / 100.0 * (os.cpu_count() or 1)
        if load < max_cores or time.time() > deadline:
            return load


# --------------------------------------------------------------------------- machine records

def hardware() -> dict:
    """CPU model, cores, RAM and OS of this machine."""
    info = {"cpu_model": platform.processor() or "unknown", "cpu_flags_avx512": False}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                info["cpu_flags_avx512"] = "avx512f" in line.split()
    except OSError:
        pass
    info["logical_cores"] = os.cpu_count()
    try:
        import psutil
        info["ram_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    info["platform"] = platform.platform()
    return info


def versions(packages=("jax", "jaxlib", "flax", "optax", "numpy", "torch")) -> dict:
    """Installed versions (None when a package is missing), plus Python's."""
    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


# --------------------------------------------------------------------------- fresh-process workers

def emit(result: dict) -> None:
    """Worker side: prints the result as the marked last line of stdout."""
    print(RESULT_MARK + json.dumps(result), flush=True)


def run_worker(args: list[str], timeout_s: float = 900.0, env: dict | None = None) -> dict:
    """Runs `python args...` in a fresh process and returns the dict it `emit`-ted.

    On failure returns {"error": ...} with the tail of stderr instead of raising.
    """
    try:
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                              timeout=timeout_s, env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}"}


def run_matrix(script: str, specs: list[dict], repeats: int, wait_quiet_s: float = 0.0,
               describe=lambda res: "", timeout_s: float = 900.0) -> list[dict]:
    """Runs `python script --worker SPEC` once per spec and repeat, in fresh processes.

    Repeats are interleaved (all specs, then all specs again), so slow drifts in
    machine load spread over every configuration. Returns one record per run:
    the spec merged with what the worker emitted (or {"error": ...}).
    """
    runs = []
    for rep in range(repeats):
        for spec in specs:
            if wait_quiet_s:
                wait_for_quiet(max_wait_s=wait_quiet_s)
            res = run_worker([script, "--worker", json.dumps(spec)], timeout_s=timeout_s)
            runs.append({**spec, **res, "repeat": rep})
            text = f"ERROR {res['error'][-400:]}" if "error" in res else describe(res)
            print(f"[rep {rep + 1}/{repeats}] {spec.get('label', '')} {text}", flush=True)
    return runs


def aggregate(runs: list[dict], by: tuple[str, ...], fields: tuple[str, ...],
              spread: str = "round_s") -> list[dict]:
    """One row per distinct `by` key (first-seen order): median over repeats of each field.

    Also records `repeats` (successful runs), `<spread>_min_max` over the runs and
    `errors` (messages of failed runs, or None).
    """
    rows = {}
    for r in runs:
        key = tuple(r.get(k) for k in by)
        row = rows.setdefault(key, {**{k: r.get(k) for k in by}, "_ok": [], "errors": None})
        if "error" in r:
            row["errors"] = (row["errors"] or []) + [r["error"]]
        else:
            row["_ok"].append(r)
    out = []
    for row in rows.values():
        ok = row.pop("_ok")
        row["repeats"] = len(ok)
        for f in fields:
            row[f] = median([r.get(f) for r in ok])
        vals = [r[spread] for r in ok if r.get(spread) is not None]
        row[f"{spread}_min_max"] = [min(vals), max(vals)] if vals else None
        out.append(row)
    return out


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    print(f"wrote {path}")


# --------------------------------------------------------------------------- formatting

def fmt(x, digits: int = 4) -> str:
    """Compact number: '-' for None, significant digits otherwise."""
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return str(x)
    return f"{x:.{digits}g}"


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A GitHub-flavoured markdown table (numbers right-aligned)."""
    cells = [[fmt(c) for c in r] for r in rows]
    numeric = lambda i: any(isinstance(r[i], (int, float)) and not isinstance(r[i], bool)
                            for r in rows)
    align = ["---:" if numeric(i) else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in cells]
    return "\n".join(lines)
