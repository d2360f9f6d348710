"""scripts/free_drafting_bound.py (the README's "most the head could add" figures) still runs and reports them."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "free_drafting_bound.py"


def test_the_script_reports_tau_costs_and_both_ratios():
    command = [sys.executable, str(SCRIPT), "--dataset", "builtin-en", "--limit", "1", "--max-new-tokens", "8"]
    result = subprocess.run(command, capture_output=True, text=True, check=False, cwd=SCRIPT.parents[1])
    assert result.returncode == 0, result.stderr[-2000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("builtin-en, 1 prompts"))
    as_run, free_e2e, free_decode = (float(x) for x in re.findall(r"([0-9.]+)x", line))
    assert 0 < as_run <= free_e2e  # taking the head's drafting time away can only make the hybrid faster
    assert free_decode > 0
