"""CI-sized soak (300 short requests, 4 threads): nothing hangs, every output equals its solo reference, memory flat.

`python scripts/soak.py` runs the full size (>= 1,000 requests) and prints the same figures.
"""

from __future__ import annotations

from tests.soak_harness import soak

OBJECT_SLACK = 2_000  # lazily created caches and interned objects; a leak per request would exceed it many times
RSS_SLACK_MB = 64.0  # allocator high-water noise on a shared machine


def test_soak():
    report = soak(requests=300, threads=4, templates=40)
    print(report.summary())
    assert report.hung_threads == 0, "requests hung"
    assert report.errors == [], report.errors[:3]
    assert report.mismatches == [], report.mismatches[:3]
    assert report.gates_free
    assert report.objects[1] - report.objects[0] < OBJECT_SLACK
    assert report.rss_mb[1] - report.rss_mb[0] < RSS_SLACK_MB
