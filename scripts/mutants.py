"""Mutation check of the lossless tests: plant one small, plausible bug at a time and make sure a test fails.

Each mutant is (name, file, exact original snippet, replacement). For every mutant the script copies `hsd_rag/`,
`tests/` and `pyproject.toml` to a temporary directory, applies the replacement there (the working tree is never
touched), runs the fast lossless / sampling tests on the copy and records which tests failed, with the p-value
of the sampling tests that report one. It prints a table and exits non-zero if any mutant survives, if the
unmutated copy fails (baseline) or if a snippet no longer exists.

    python scripts/mutants.py            # every mutant against every fast lossless/sampling test (hours on 2 cores)
    python scripts/mutants.py --stop-at-first   # each mutant until its first catching test (cheap tests first)
    python scripts/mutants.py --quick    # the cheapest few, each against the tests that catch it (CI, ~1 min)
    python scripts/mutants.py --only no-cache-row-copy,eos-not-cutting-step
    python scripts/mutants.py --list

When the code under test is rewritten and a snippet disappears, the script stops with
"mutant X not applicable: its snippet is gone from FILE, update it": update that mutant's snippet to the new code.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("hsd_rag", "tests", "pyproject.toml")
P_VALUE = re.compile(r"\bp=([0-9.]+(?:e[-+]?[0-9]+)?)")

# The fast tests that carry the lossless promise (greedy equality, sampling fidelity, EOS and stop handling),
# cheapest first so that `--stop-at-first` finds a catching test soon.
FAST_TESTS = [
    "tests/test_verify_exact.py",
    "tests/test_sampling_fidelity.py::test_acceptance_rule_emits_the_target_law",
    "tests/test_sampling_fidelity.py::test_warpers_match_transformers",
    "tests/test_sampling_fidelity.py::test_sequence_law_is_a_distribution",
    "tests/test_decoder_api.py",
    "tests/test_generate_sampling_match.py",
    "tests/test_step_boundaries.py",
    "tests/test_lossless_tiny.py",
    "tests/test_sampling_fidelity.py::test_decoder_samples_the_target_law",
    "tests/test_sampling_fidelity.py::test_real_methods_sample_the_target_law",
    "tests/test_lossless_methods.py",
]


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to the repository root
    original: str  # must occur exactly once in `file`
    replacement: str
    why: str  # the bug it stands for
    quick: tuple[str, ...] = ()  # in --quick mode: run only these test node ids (the mutant must be caught there)


MUTANTS = [
    # ---- acceptance (hsd_rag/verify.py) ------------------------------------------------------------------------
    Mutant(
        "accept-p-not-p-over-residual",
        "hsd_rag/verify.py",
        "if residual > 0 and uniforms[child - 1] * residual < p:",
        "if residual > 0 and uniforms[child - 1] < p:",
        "a sibling draft accepted with probability p instead of p / (1 - mass of the rejected siblings)",
        quick=("tests/test_sampling_fidelity.py::test_acceptance_rule_emits_the_target_law[T1]",),
    ),
    Mutant(
        "rejected-not-reset-per-level",
        "hsd_rag/verify.py",
        "    while True:\n        residual = 1.0\n        rejected: list[int] = []\n",
        "    rejected: list[int] = []\n    while True:\n        residual = 1.0\n",
        "tokens rejected at one tree level also removed from the bonus distribution at a deeper level",
        quick=("tests/test_sampling_fidelity.py::test_acceptance_rule_emits_the_target_law[T1]",),
    ),
    Mutant(
        "shared-uniform-among-siblings",
        "hsd_rag/verify.py",
        "if residual > 0 and uniforms[child - 1] * residual < p:",
        "if residual > 0 and uniforms[node] * residual < p:",
        "one uniform draw reused for every sibling of a node",
    ),
    Mutant(
        "draft-prob-read-at-child-row",
        "hsd_rag/verify.py",
        "p_child = probs[parents, tokens]",
        "p_child = probs[1:][torch.arange(n - 1, device=probs.device), tokens]",
        "a draft's acceptance probability read from its own row instead of its parent's",
    ),
    Mutant(
        "bonus-from-unmasked-p",
        "hsd_rag/verify.py",
        "        residual_dist[rejected] = 0.0\n",
        "",
        "the bonus token drawn from p itself, rejected drafts included",
    ),
    Mutant(
        "bonus-from-unrenormalised-residual",
        "hsd_rag/verify.py",
        "bonus = torch.multinomial(dist, 1, generator=generator).item()",
        "bonus = int((dist.cumsum(-1) < torch.rand(1, generator=generator, device=dist.device)).sum()"
        ".clamp(max=dist.numel() - 1))",
        "the bonus token drawn by inverse CDF from the residual without renormalising it",
    ),
    Mutant(
        "bonus-ignores-top-k-top-p",
        "hsd_rag/verify.py",
        "    dist = probs[node]\n",
        "    dist = torch.softmax(logits[node].float() / temperature, dim=-1)\n",
        "the bonus token drawn from the tempered distribution without the top-k / top-p filters",
    ),
    # ---- cache rollback (hsd_rag/verify.py) --------------------------------------------------------------------
    Mutant(
        "no-cache-row-copy",
        "hsd_rag/attention_layout.py",
        "            if not contiguous:\n",
        "            if False:\n",
        "an accepted path that skips earlier siblings keeps the rejected siblings' cache rows",
        quick=("tests/test_verify_exact.py::test_rollback_keeps_exactly_the_accepted_rows",),
    ),
    Mutant(
        "cache-copy-keys-only",
        "hsd_rag/attention_layout.py",
        "                values[..., start : start + kept, :] = values.index_select(-2, index + start)\n",
        "",
        "the rollback moves the accepted keys but not their values",
    ),
    Mutant(
        "cache-copy-index-without-past-offset",
        "hsd_rag/attention_layout.py",
        "keys[..., start : start + kept, :] = keys.index_select(-2, index + start)",
        "keys[..., start : start + kept, :] = keys.index_select(-2, index)",
        "the rows to keep indexed from the start of the cache instead of the start of the tree block",
    ),
    # ---- tree tensors (hsd_rag/tree.py) -------------------------------------------------------------------------
    Mutant(
        "position-ids-off-by-one",
        "hsd_rag/tree.py",
        "return torch.tensor([self.depths], dtype=torch.long, device=device) + past_length",
        "return torch.tensor([self.depths], dtype=torch.long, device=device) + past_length + 1",
        "tree positions one past where sequential decoding puts them",
    ),
    Mutant(
        "position-ids-from-node-index",
        "hsd_rag/tree.py",
        "return torch.tensor([self.depths], dtype=torch.long, device=device) + past_length",
        "return torch.arange(len(self), dtype=torch.long, device=device)[None] + past_length",
        "a node's position taken from its index in the tree instead of its depth",
        quick=("tests/test_verify_exact.py::test_tree_logits_equal_sequential_logits",),
    ),
    Mutant(
        "mask-allows-previous-sibling",
        "hsd_rag/tree.py",
        "            rows[i][i] = True\n",
        "            rows[i][i] = True\n            rows[i][max(i - 1, 0)] = True\n",
        "the tree mask lets a node also see the node just before it (often a sibling)",
    ),
    Mutant(
        "mask-hides-last-cache-row",
        "hsd_rag/tree.py",
        "            mask[..., :rows] = 0\n",
        "            mask[..., : max(rows - 1, 0)] = 0\n",
        "the tree does not see the last cached token",
    ),
    # ---- end of generation and streaming (hsd_rag/decoder.py) ---------------------------------------------------
    Mutant(
        "eos-not-cutting-step",
        "hsd_rag/decoder.py",
        "            if token in self.eos_token_ids:\n",
        "            if token in self.eos_token_ids and i == len(new_tokens[:room]) - 1:\n",
        "an EOS inside a multi-token step is only noticed when it is the step's last token",
        quick=("tests/test_decoder_api.py::test_eos_inside_a_step_ends_generation_like_generate",),
    ),
    Mutant(
        "eos-dropped-from-output",
        "hsd_rag/decoder.py",
        "return new_tokens[: i + 1], sources[: i + 1], True",
        "return new_tokens[:i], sources[:i], True",
        "the EOS token itself left out of the output (HF generate keeps it)",
    ),
    Mutant(
        "utf8-holdback-removed",
        "hsd_rag/streaming_text.py",
        "complete = fresh and not window.endswith(REPLACEMENT_CHAR) and",
        "complete = fresh and",
        "streaming emits half a multi-byte character as U+FFFD",
    ),
    # ---- warpers (hsd_rag/sampling.py) --------------------------------------------------------------------------
    Mutant(
        "top-k-keeps-k-minus-one",
        "hsd_rag/sampling.py",
        'flat = flat.masked_fill(flat < kth, float("-inf"))',
        'flat = flat.masked_fill(flat <= kth, float("-inf"))',
        "top-k drops the k-th token (and its ties)",
    ),
]


class NotApplicable(RuntimeError):
    pass


def check_applicable(mutant: Mutant, root: Path = ROOT) -> None:
    path = root / mutant.file
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    count = text.count(mutant.original)
    if count == 0:
        raise NotApplicable(
            f"mutant {mutant.name} not applicable: its snippet is gone from {mutant.file}, update it "
            f"(snippet: {mutant.original!r})"
        )
    if count > 1:
        raise NotApplicable(
            f"mutant {mutant.name} not applicable: its snippet occurs {count} times in {mutant.file}, "
            "make it unique"
        )


def make_copy(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", ".hypothesis")
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        else:
            shutil.copy2(src, dest / name)


def apply(mutant: Mutant, copy_root: Path) -> None:
    check_applicable(mutant, copy_root)
    path = copy_root / mutant.file
    path.write_text(path.read_text(encoding="utf-8").replace(mutant.original, mutant.replacement), encoding="utf-8")


@dataclass
class Outcome:
    name: str
    failed: list[str] = field(default_factory=list)  # test ids that failed or errored
    p_values: dict[str, float] = field(default_factory=dict)  # test id -> reported p-value
    passed: int = 0
    seconds: float = 0.0
    returncode: int = 0
    timed_out: bool = False  # a timeout proves nothing: the mutant counts as not caught
    log_tail: str = ""

    @property
    def caught(self) -> bool:
        return bool(self.failed) and not self.timed_out


def run_tests(copy_root: Path, tests: list[str], stop_at_first: bool, timeout: float) -> Outcome:
    xml = copy_root / "report.xml"
    env = {**os.environ, "PYTHONPATH": str(copy_root), "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "--junitxml", str(xml)]
    cmd += ["-x"] if stop_at_first else []
    start = time.perf_counter()
    timed_out = False
    try:
        proc = subprocess.run(cmd + tests, cwd=copy_root, env=env, capture_output=True, text=True, timeout=timeout)
        returncode, log = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        output = err.stdout.decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        returncode, log, timed_out = -1, f"timed out after {timeout:.0f} s\n{output}", True
    outcome = Outcome("", seconds=time.perf_counter() - start, returncode=returncode, timed_out=timed_out,
                      log_tail=log[-3000:])
    if xml.exists():
        for case in ET.parse(xml).getroot().iter("testcase"):
            test_id = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
            problems = [child for child in case if child.tag in ("failure", "error")]
            if problems:
                outcome.failed.append(test_id)
                found = P_VALUE.findall(" ".join((p.get("message") or "") + (p.text or "") for p in problems))
                if found:
                    outcome.p_values[test_id] = min(float(v) for v in found)
            elif not any(child.tag == "skipped" for child in case):
                outcome.passed += 1
    elif returncode != 0 and not timed_out:  # e.g. the interpreter crashed under the mutant
        outcome.failed.append(f"(pytest exited {returncode} without a report)")
    return outcome


def run_one(mutant: Mutant | None, tests: list[str], stop_at_first: bool, timeout: float) -> Outcome:
    with tempfile.TemporaryDirectory(prefix="hsd-mutant-") as tmp:
        copy_root = Path(tmp)
        make_copy(copy_root)
        if mutant is not None:
            apply(mutant, copy_root)
        outcome = run_tests(copy_root, tests, stop_at_first, timeout)
    outcome.name = mutant.name if mutant else "(baseline: no mutation)"
    return outcome


def format_row(outcome: Outcome) -> str:
    if outcome.timed_out:
        verdict, tests = "TIMED OUT (not proven caught)", "-"
    elif not outcome.caught:
        verdict, tests = "SURVIVED", "-"
    else:
        verdict = "caught"
        shown = []
        for test_id in outcome.failed[:6]:
            p = outcome.p_values.get(test_id)
            shown.append(test_id + (f" (p={p:.2g})" if p is not None else ""))
        more = len(outcome.failed) - len(shown)
        tests = "; ".join(shown) + (f"; +{more} more" if more > 0 else "")
    return f"| {outcome.name} | {verdict} | {len(outcome.failed)} | {outcome.seconds:.0f} s | {tests} |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the CI subset: cheap mutants, their catching tests")
    parser.add_argument("--only", default="", help="comma-separated mutant names")
    parser.add_argument("--tests", default="", help="comma-separated test paths/ids (default: the fast set)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run on the unmutated copy")
    parser.add_argument("--stop-at-first", action="store_true",
                        help="stop each mutant's run at its first failing test (the table then names that one)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per pytest run")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = parser.parse_args(argv)

    mutants = [m for m in MUTANTS if m.quick] if args.quick else list(MUTANTS)
    if args.only:
        wanted = {name.strip() for name in args.only.split(",") if name.strip()}
        unknown = wanted - {m.name for m in MUTANTS}
        if unknown:
            parser.error(f"unknown mutant(s): {', '.join(sorted(unknown))}")
        mutants = [m for m in MUTANTS if m.name in wanted]
    if args.list:
        for m in mutants:
            print(f"{m.name:40} {m.file:22} {m.why}")
        return 0
    try:  # fail loudly, before running anything, when the code moved under a mutant
        for mutant in mutants:
            check_applicable(mutant)
    except NotApplicable as err:
        print(f"mutants.py: {err}", file=sys.stderr)
        return 2

    tests = [t.strip() for t in args.tests.split(",") if t.strip()] or FAST_TESTS
    print("| mutant | verdict | failing tests | time | caught by |\n|---|---|---|---|---|", flush=True)
    if not args.quick and not args.no_baseline:
        baseline = run_one(None, tests, stop_at_first=False, timeout=args.timeout)
        print(format_row(baseline).replace("caught", "BASELINE FAILS").replace("SURVIVED", "passes"), flush=True)
        if baseline.caught or baseline.timed_out:
            print(f"\nThe unmutated copy fails, so no mutant verdict means anything:\n{baseline.log_tail}",
                  file=sys.stderr)
            return 1
    survivors = []
    for mutant in mutants:
        selected = list(mutant.quick) if args.quick else tests
        outcome = run_one(mutant, selected, stop_at_first=args.quick or args.stop_at_first, timeout=args.timeout)
        print(format_row(outcome), flush=True)
        if not outcome.caught:
            survivors.append(mutant.name)
            print(f"  {mutant.name}: {mutant.why}\n  last output:\n{outcome.log_tail}", file=sys.stderr)
    print(f"\n{len(mutants) - len(survivors)} of {len(mutants)} mutants caught"
          + (f"; SURVIVED: {', '.join(survivors)}" if survivors else ""))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
