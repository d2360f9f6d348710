"""Full-size soak of the decoder: `python scripts/soak.py --requests 1000 --threads 4`.

Runs tests/soak_harness.py (the CI test runs it at 300 requests) and prints requests per kind, mismatches, errors,
hung threads, and Python object / RSS figures between the end of the warm-up and the end of the run.
Run from the repository root: `PYTHONPATH=. python scripts/soak.py`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `tests.soak_harness`

from tests.soak_harness import soak  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--templates", type=int, default=80, help="distinct requests (each with a solo reference)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torch-threads", type=int, default=1)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.torch_threads)
    report = soak(args.requests, args.threads, args.templates, args.seed)
    print(report.summary())
    for line in (report.errors + report.mismatches)[:10]:
        print("  ", line)
    ok = not (report.errors or report.mismatches or report.hung_threads) and report.gates_free
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
