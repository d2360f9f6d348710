"""CI's share of scripts/mutants.py: the cheapest planted bugs must each make their catching test fail.

The full list (every mutant against every fast lossless/sampling test) is `python scripts/mutants.py`; this runs
`--quick` (five mutants, one targeted test each, in temporary copies of the package). It also fails when the
code under a mutant changed so much that its snippet is gone: update the snippet in scripts/mutants.py.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_mutants_are_caught():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "mutants.py"), "--quick"],
        cwd=ROOT, capture_output=True, text=True, timeout=3600,  # a hang guard, not a speed check
    )
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"\b(\d+) of \1 mutants caught", proc.stdout), proc.stdout
