"""Soak: many short requests from several threads on shared tiny models, mixing every way a caller uses the decoder.

Requests are drawn (fixed seed) from templates whose reference output was computed alone first: every method,
budgets, sampling with a seed, stop strings, sliding-window attention, two decoders sharing one model and one
EAGLE head; callers generate, stream to the end, abandon streams part-way, or send bad input. Checked: nothing
hangs, every output equals its reference, bad input gets ValueError/TypeError, the models' gates end free, and
Python object counts and RSS stay flat between the first and last part of the run.

Used by tests/test_soak.py (CI size) and scripts/soak.py (full size).
"""

from __future__ import annotations

import gc
import random
import threading
import time
from dataclasses import dataclass, field

import torch

from hsd_rag import HybridSpecDecoder
from hsd_rag.heads import Eagle3Head
from tests.tiny_models import IdTokenizer, tiny_model
from tests.tiny_sliding_models import sliding_model

KINDS = ("generate", "stream", "abandon", "bad")
KIND_WEIGHTS = (4, 3, 2, 1)
MAX_NEW = 16
BAD_INPUTS = (
    ("empty prompt", lambda dec: dec.generate([], max_new_tokens=4)),
    ("unknown argument", lambda dec: dec.generate([0, 5, 6], max_new_tokens=4, beams=3)),
    ("HF-only setting", lambda dec: dec.generate([0, 5, 6], num_beams=2)),
    ("bad budget", lambda dec: dec.generate([0, 5, 6], budget=-1)),
    ("batched tensor", lambda dec: dec.generate(torch.zeros(2, 4, dtype=torch.long))),
    ("prompt too long", lambda dec: dec.generate([3] * 600)),
    ("not a prompt", lambda dec: dec.generate(3.5)),
)


@dataclass
class Template:
    decoder: str
    prompt: list[int]
    kwargs: dict
    documents: list[str]
    reference: list[int] | None = None
    text: str = ""


@dataclass
class SoakReport:
    requests: int = 0
    by_kind: dict = field(default_factory=dict)
    mismatches: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    hung_threads: int = 0
    objects: tuple[int, int] = (0, 0)  # after the warm-up part, at the end
    rss_mb: tuple[float, float] = (0.0, 0.0)
    seconds: float = 0.0
    gates_free: bool = True

    def summary(self) -> str:
        return (
            f"{self.requests} requests {self.by_kind} in {self.seconds:.1f} s; mismatches {len(self.mismatches)}, "
            f"unexpected errors {len(self.errors)}, hung threads {self.hung_threads}, gates free {self.gates_free}; "
            f"Python objects {self.objects[0]} -> {self.objects[1]} ({self.objects[1] - self.objects[0]:+d}); "
            f"RSS {self.rss_mb[0]:.1f} -> {self.rss_mb[1]:.1f} MB ({self.rss_mb[1] - self.rss_mb[0]:+.1f})"
        )


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        resident_pages = int(statm.read().split()[1])
    import resource

    return resident_pages * resource.getpagesize() / 2**20


def live_objects() -> int:
    gc.collect()
    return len(gc.get_objects())


def build_decoders() -> dict[str, HybridSpecDecoder]:
    """Two decoders on one Llama (one with an EAGLE head, one without) and one on a sliding-window Gemma-2."""
    torch.manual_seed(0)
    shared = tiny_model("llama", seed=7, layers=4)
    gemma = sliding_model("gemma2", window=6, seed=4)
    decoders = {
        "llama+head": HybridSpecDecoder(shared, IdTokenizer(), head=Eagle3Head.from_target(shared)),
        "llama": HybridSpecDecoder(shared, IdTokenizer()),
        "gemma2-sliding+head": HybridSpecDecoder(gemma, IdTokenizer(), head=Eagle3Head.from_target(gemma)),
    }
    for dec in decoders.values():
        dec.eos_token_ids = set()  # every request runs its full length: more steps per request
    return decoders


def build_templates(decoders, count: int, rng: random.Random) -> list[Template]:
    templates = []
    for i in range(count):
        name = list(decoders)[i % len(decoders)]
        dec = decoders[name]
        prompt = [0] + [rng.randrange(2, 96) for _ in range(rng.randrange(3, 14))]
        kwargs: dict = dict(method=rng.choice(dec.available_methods()), budget=rng.choice([1, 4, 16, "auto"]),
                            max_new_tokens=rng.randrange(4, MAX_NEW + 1))
        if rng.random() < 0.3:
            kwargs.update(temperature=rng.choice([0.7, 1.0]), top_p=0.9, seed=rng.randrange(10_000))
        if rng.random() < 0.3:
            kwargs["stop"] = [f" {rng.randrange(2, 96)}"]
        documents = [" ".join(str(rng.randrange(2, 96)) for _ in range(40))] if rng.random() < 0.7 else []
        templates.append(Template(name, prompt, kwargs, documents))
    for template in templates:  # references: each request alone, before any concurrency
        result = decoders[template.decoder].generate(template.prompt, documents=template.documents, **template.kwargs)
        template.reference, template.text = result.token_ids, result.text
    return templates


_parked = threading.local()  # per thread: the last abandoned stream left suspended (never closed explicitly)


def run_request(decoders, template: Template, kind: str, rng: random.Random) -> str | None:
    """Run one request; returns a mismatch description, or None when it behaved."""
    dec = decoders[template.decoder]
    if kind == "bad":
        label, call = rng.choice(BAD_INPUTS)
        try:
            call(dec)
        except (ValueError, TypeError):
            return None
        return f"bad input accepted: {label}"
    if kind == "generate":
        result = dec.generate(template.prompt, documents=template.documents, **template.kwargs)
        ok = result.token_ids == template.reference and result.text == template.text
        ok = ok and result.stats.new_tokens == len(result.token_ids)
        return None if ok else f"generate {template.kwargs}: {result.token_ids} != {template.reference}"
    stream = dec.stream_tokens(template.prompt, documents=template.documents, **template.kwargs)
    if kind == "stream":
        pieces = list(stream)
        result = stream.result
        ok = result.token_ids == template.reference and "".join(p.text for p in pieces) == template.text
        return None if ok else f"stream {template.kwargs}: {result.token_ids} != {template.reference}"
    # abandon: read a few pieces, then close it, drop it, or leave it suspended until this thread's next abandon
    iterator = iter(stream)
    taken = [piece.token_id for _, piece in zip(range(rng.randrange(1, 4)), iterator, strict=False)]
    how = rng.choice(["close", "drop", "park"])
    if how == "close":
        stream.close()
    elif how == "park":
        _parked.iterator = iterator
    if taken != template.reference[: len(taken)]:
        return f"abandoned stream {template.kwargs}: {taken} != {template.reference[: len(taken)]}"
    return None


def soak(requests: int = 300, threads: int = 4, templates: int = 40, seed: int = 0,
         hang_guard_s: float = 1800.0) -> SoakReport:
    rng = random.Random(seed)
    decoders = build_decoders()
    pool = build_templates(decoders, templates, rng)
    plan = [(rng.choice(pool), rng.choices(KINDS, KIND_WEIGHTS)[0], rng.randrange(2**31)) for _ in range(requests)]
    report = SoakReport(requests=requests)
    for _, kind, _ in plan:
        report.by_kind[kind] = report.by_kind.get(kind, 0) + 1
    warm_up = max(threads, requests // 5)
    lock = threading.Lock()
    next_index = 0
    marks: dict[str, tuple] = {}
    done_warm_up = threading.Barrier(threads, action=lambda: marks.setdefault("warm", (live_objects(), rss_mb())))

    def worker():
        nonlocal next_index
        warmed = False
        while True:
            with lock:
                index = next_index
                next_index += 1
            if index >= warm_up and not warmed:  # every thread pauses once so the warm-up mark is quiescent
                warmed = True
                done_warm_up.wait()
            if index >= len(plan):
                return
            template, kind, request_seed = plan[index]
            try:
                problem = run_request(decoders, template, kind, random.Random(request_seed))
            except Exception as error:  # an unexpected failure is a finding, not a crash of the soak
                with lock:
                    report.errors.append(f"{kind} {template.kwargs}: {type(error).__name__}: {error}")
                continue
            if problem:
                with lock:
                    report.mismatches.append(problem)

    started = time.perf_counter()
    workers = [threading.Thread(target=worker, name=f"soak-{i}", daemon=True) for i in range(threads)]
    for thread in workers:
        thread.start()
    deadline = started + hang_guard_s
    for thread in workers:
        thread.join(max(0.0, deadline - time.perf_counter()))
    report.seconds = time.perf_counter() - started
    report.hung_threads = sum(thread.is_alive() for thread in workers)
    report.gates_free = not any(dec.gate.locked() for dec in decoders.values())
    report.objects = (marks.get("warm", (0, 0))[0], live_objects())
    report.rss_mb = (marks.get("warm", (0, 0.0))[1], rss_mb())
    return report
