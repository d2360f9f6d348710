"""scripts/gpu_profile.py, which scripts/gpu_check.sh runs on a lent GPU machine, still runs: its CPU dry run.

A device machine is lent rarely and for minutes, so a script that broke since the last session would waste the
loan; the dry run builds the tiny shape on the CPU and must write every figure the GPU run reports.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_profile.py"
METHODS = ("vanilla", "ngram", "eagle", "hybrid")


def test_the_dry_run_writes_verification_costs_drafting_costs_and_loop_overheads(tmp_path):
    out = tmp_path / "gpu_profile.json"
    command = [sys.executable, str(SCRIPT), "--shape", "tiny", "--device", "cpu", "--dtype", "float32",
               "--context", "64", "--new-tokens", "16", "--repeats", "3", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, check=False, cwd=SCRIPT.parents[1])
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    profile = report["profile"]
    assert profile["tokens"][0] == 1 and profile["relative_cost"][0] == 1.0
    assert len(profile["tokens"]) == len(profile["relative_cost"]) > 4
    assert set(profile["draft_costs"]["eagle"]) == {"fixed", "per_level"}
    for method in METHODS:
        loop = report["loop"][method]
        assert loop["tokens"] == 16 and loop["steps"] >= 1
        assert loop["ms_per_step"] >= loop["verify_ms_per_step"] > 0
    assert report["loop"]["vanilla"]["steps"] == 16  # one forward per token without drafts
