"""Shared helpers for the benchmarks: timing, CPU/memory accounting, hardware
and version records, fresh-process workers and table formatting.

Only the standard library, numpy and psutil are imported at module level (torch
lazily, for the PFLlib-style baseline), so a worker can use these helpers
before it decides which framework to load.
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
    """Peak resident set size of this process so far, in MB (10^6 bytes).

    Reads VmHWM (the high-water mark of this process's own address space).
    `getrusage().ru_maxrss` is NOT used: Linux carries it over fork + exec, so
    a worker would report at least its parent's RSS.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


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
        fields = dict(line.split(":", 1) for line in text.split("\n\n")[0].splitlines()
                      if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        info["cpu_model"] = fields.get("model name", info["cpu_model"])
        info["cpu_family_model_stepping"] = "/".join(
            fields.get(k, "?") for k in ("cpu family", "model", "stepping"))
        info["cpu_flags_avx512"] = "avx512f" in fields.get("flags", "").split()
    except OSError:
        pass
    info["logical_cores"] = os.cpu_count()
    for level in (2, 3):  # per-instance cache sizes, from sysfs
        for idx in range(5):
            base = f"/sys/devices/system/cpu/cpu0/cache/index{idx}/"
            try:
                with open(base + "level") as f, open(base + "size") as g:
                    if int(f.read()) == level:
                        info[f"l{level}_cache"] = g.read().strip()
            except OSError:
                continue
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
               describe=lambda res: "", max_others: float | None = None, retries: int = 2,
               timeout_s: float = 900.0) -> list[dict]:
    """Runs `python script --worker SPEC` once per spec and repeat, in fresh processes.

    Repeats are interleaved (all specs, then all specs again), so slow drifts in
    machine load spread over every configuration. A failed run is retried (up
    to `retries` times, e.g. a transient import error while files are being
    edited); so is a run whose `others` (CPU used by other processes during
    its timings) exceeds `max_others`, keeping the quietest attempt. Returns one
    record per run: the spec (plus "repeat", also passed to the worker) merged
    with what the worker emitted (or {"error": ...}) and "attempts".
    """
    noise = lambda res: max(res.get("others") or 0.0, res.get("scan_others") or 0.0)
    runs = []
    for rep in range(repeats):
        for spec in specs:
            spec, best, attempts = {**spec, "repeat": rep}, None, 0
            while attempts <= retries:
                attempts += 1
                if wait_quiet_s:
                    wait_for_quiet(max_wait_s=wait_quiet_s)
                res = run_worker([script, "--worker", json.dumps(spec)], timeout_s=timeout_s)
                if "error" in res:
                    best = best if best and "error" not in best else res
                    time.sleep(10)
                    continue
                if best is None or "error" in best or noise(res) < noise(best):
                    best = res
                if max_others is None or noise(res) <= max_others:
                    break
            runs.append({**spec, **best, "attempts": attempts})
            text = f"ERROR {best['error'][-400:]}" if "error" in best else describe(best)
            print(f"[rep {rep + 1}/{repeats}] {spec.get('label', '')} {text}"
                  + (f"  (attempts {attempts})" if attempts > 1 else ""), flush=True)
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


# --------------------------------------------------------------------------- PyTorch baseline

def torch_mlp(features: int, hidden, classes: int):
    """A torch MLP features -> hidden... -> classes with ReLU (the package's `mlp`)."""
    from torch import nn

    layers, width = [], features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, classes))


class PfllibFedAvg:
    """FedAvg as a sequential PyTorch loop in PFLlib's style (data kept in memory).

    Like PFLlib's `serveravg` / `clientavg`: every client owns a deep copy of
    the model; each round the server sends its params (`set_parameters`:
    clone), each client trains on a shuffled `DataLoader` with a fresh
    `torch.optim.SGD` for `local_steps` batches (cycling over epochs, dropping
    the last partial batch), and the server deep-copies a client model, zeroes
    it and adds every client's params times n_i / sum n, parameter by parameter.
    All clients take part. `round()` returns the n_i-weighted mean training loss.
    """

    def __init__(self, x, y, model, *, batch_size: int, lr: float, local_steps: int):
        import copy

        import torch
        from torch.utils.data import TensorDataset

        self.global_model, self.batch_size, self.lr, self.steps = model, batch_size, lr, local_steps
        self.clients = [dict(data=TensorDataset(torch.from_numpy(xi), torch.from_numpy(yi).long()),
                             n=len(yi), model=copy.deepcopy(model)) for xi, yi in zip(x, y)]

    def _train(self, client) -> float:
        import torch
        from torch.utils.data import DataLoader

        loader = DataLoader(client["data"], batch_size=self.batch_size, shuffle=True,
                            drop_last=True)
        model, loss_fn = client["model"], torch.nn.CrossEntropyLoss()
        opt = torch.optim.SGD(model.parameters(), lr=self.lr)
        model.train()
        losses = []
        while len(losses) < self.steps:
            for x, y in loader:
                opt.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                opt.step()
                losses.append(loss.item())
                if len(losses) == self.steps:
                    break
        return float(np.mean(losses))

    def round(self) -> float:
        import copy

        for c in self.clients:  # send_models / set_parameters
            for new, old in zip(self.global_model.parameters(), c["model"].parameters()):
                old.data = new.data.clone()
        losses = [self._train(c) for c in self.clients]
        weights = np.array([c["n"] for c in self.clients], np.float64)
        weights /= weights.sum()
        self.global_model = copy.deepcopy(self.clients[0]["model"])  # aggregate_parameters
        for p in self.global_model.parameters():
            p.data.zero_()
        for w, c in zip(weights, self.clients):  # add_parameters
            for sp, cp in zip(self.global_model.parameters(), c["model"].parameters()):
                sp.data += cp.data.clone() * float(w)
        return float(np.dot(weights, losses))


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
