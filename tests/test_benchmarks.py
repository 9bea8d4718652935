"""Every benchmark script runs end to end in its smoke-test mode (slow tier).

The committed numbers come from the full runs described in benchmarks/README.md;
these tests only keep the scripts working as the package evolves.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = {
    "checkpoint_cost": ["--quick"],
    "cnn_speed": ["--quick"],
    "data_scale": ["--quick"],
    "driver_overhead": ["--quick"],
    "identity": ["--quick", "--check", "benchmarks/results/identity_reference.npz"],
    "round_speed": ["--quick"],
    "k_models": ["--quick", "--seeds", "0"],
    "meta_cost": ["--quick"],
    "meta_accuracy": ["--quick"],
    "partial_personalization": ["--rounds", "2", "--eval-every", "1", "--seeds", "1",
                                "--sizes", "20", "--timing-rounds", "1"],
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SMOKE))
def test_benchmark_smoke(script, tmp_path):
    out = tmp_path / f"{script}.json"
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), *SMOKE[script],
         "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads(out.read_text())


def test_every_benchmark_script_has_a_smoke_test():
    scripts = {p.stem for p in (ROOT / "benchmarks").glob("*.py") if not p.stem.startswith("_")}
    assert scripts == set(SMOKE)
