"""`HsdNgramProposer`: our n-gram drafter as a vLLM speculative-decoding proposer.

    LLM(model, speculative_config={"method": "custom_class",
                                   "model": "hsd_rag.engines.vllm.proposer.HsdNgramProposer",
                                   "num_speculative_tokens": 8})

vLLM builds it as `HsdNgramProposer(vllm_config)` in its worker process and calls `propose` once per engine step
with the whole batch: the tokens each row sampled this step, each row's token count, and the token-id matrix.
Per request it keeps our suffix-automaton drafter over prompt + output (+ the request's extra documents when
they reach it, see `documents`) with its online calibration; it turns the drafter's scored tree into the chain
vLLM verifies and sizes every chain for the batch by calibrated score and verification cost (`chain`). An
index of earlier requests' outputs (`answer_index`) drafts answers that share phrasing.

vLLM passes no request ids, so requests are recognised by their tokens (`RequestDrafts.continues/resumes`) and
a request absent from a step's batch is taken as finished, as vLLM's own suffix proposer does: its output goes
to the answer index and its state is parked (a bounded LRU) in case it was only preempted. Every draft is
verified by vLLM's rejection sampler, so mistakes here cost speed, never output.

Settings come from the environment of the serving process (vLLM passes only its own config):
`HSD_RAG_VLLM_ANSWERS` (earlier answers kept, 0 disables), `HSD_RAG_VLLM_COST_PROFILE` (a CostProfile JSON of the
engine's verification cost), `HSD_RAG_VLLM_DOCUMENTS_DIR` (the documents inbox; set by `launch.serve`).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from hsd_rag.budget import CostProfile
from hsd_rag.engines.vllm.answer_index import MAX_ANSWERS, AnswerIndex
from hsd_rag.engines.vllm.chain import chain_lengths
from hsd_rag.engines.vllm.documents import DOCUMENTS_DIR_ENV, DocumentInbox
from hsd_rag.engines.vllm.request_state import RequestDrafts

ANSWERS_ENV = "HSD_RAG_VLLM_ANSWERS"
COST_PROFILE_ENV = "HSD_RAG_VLLM_COST_PROFILE"
MAX_PARKED = 64  # requests that left the batch, kept in case they were preempted and come back


class HsdNgramProposer:
    """vLLM `custom_class` proposer wrapping hsd_rag's NgramDrafter (see module docstring)."""

    def __init__(self, vllm_config, *, answers: AnswerIndex | None | bool = True,
                 profile: CostProfile | None = None, inbox: DocumentInbox | None = None):
        spec = vllm_config.speculative_config
        self.max_drafts = int(spec.num_speculative_tokens)
        self.max_model_len = int(vllm_config.model_config.max_model_len)
        self.profile = profile or _cost_profile(str(getattr(vllm_config.device_config, "device_type", "cpu")))
        if answers is True:
            size = int(os.environ.get(ANSWERS_ENV, MAX_ANSWERS))
            answers = AnswerIndex(max_answers=size) if size > 0 else None
        self.answers = answers if isinstance(answers, AnswerIndex) else None  # (an empty index is falsy)
        if inbox is None and os.environ.get(DOCUMENTS_DIR_ENV):
            inbox = DocumentInbox(Path(os.environ[DOCUMENTS_DIR_ENV]))
        self.inbox = inbox
        self._rows: dict[int, RequestDrafts] = {}  # batch row -> request, as of the last step
        self._parked: OrderedDict[int, RequestDrafts] = OrderedDict()  # id() -> request that left the batch

    def propose(self, sampled_token_ids: Sequence[Sequence[int]], num_tokens_no_spec, token_ids_cpu,
                slot_mappings=None, **_) -> list[list[int]]:
        """Draft chains for every row: `sampled_token_ids[i]` are the tokens row i emitted this step (empty
        while it is still prefilling), `num_tokens_no_spec[i]` its token count, `token_ids_cpu[i]` its tokens."""
        unclaimed = dict(self._rows)
        rows: dict[int, RequestDrafts] = {}
        candidates = []
        for i, sampled in enumerate(sampled_token_ids):
            if not len(sampled):
                candidates.append(None)  # a partial prefill: nothing to draft from yet
                continue
            num_tokens = int(num_tokens_no_spec[i])
            request = self._claim(i, token_ids_cpu[i], num_tokens, sampled, unclaimed)
            rows[i] = request
            room = min(self.max_drafts, self.max_model_len - num_tokens - 1)
            candidates.append(request.candidates(room, self.answers))
        for request in unclaimed.values():
            self._retire(request)
        self._rows = rows

        lengths = chain_lengths([c[1] if c else [] for c in candidates], self.profile, len(sampled_token_ids))
        drafts: list[list[int]] = []
        for i, (candidate, length) in enumerate(zip(candidates, lengths, strict=True)):
            if candidate is None:
                drafts.append([])
                continue
            tokens, scores, source, buckets = candidate
            rows[i].submit(tokens[:length], scores[:length], source, buckets)
            drafts.append(tokens[:length])
        return drafts

    def load_model(self, *args, **kwargs) -> None:
        """vLLM calls this on every proposer; an n-gram drafter has no weights."""

    # ---- request identity ---------------------------------------------------------------------------------

    def _claim(self, i: int, row, num_tokens: int, sampled: Sequence[int],
               unclaimed: dict[int, RequestDrafts]) -> RequestDrafts:
        """The request in row i: last step's occupant of the row, a moved or resumed one, or a new one."""
        request = unclaimed.get(i)
        if request is not None and request.continues(row, num_tokens, sampled):
            del unclaimed[i]
            request.advance(sampled, self.answers, verified=True)
            return request
        for where, pool in (("rows", unclaimed), ("parked", self._parked)):
            for key, request in pool.items():
                if request.resumes(row, num_tokens):
                    del pool[key]
                    one_step = num_tokens - len(sampled) == len(request) and where == "rows"
                    request.advance(row[len(request) : num_tokens], self.answers, verified=one_step)
                    return request
        prompt_length = num_tokens - len(sampled)
        tokens = [int(t) for t in row[:num_tokens]]
        documents = self.inbox.take(tokens[:prompt_length]) if self.inbox is not None else []
        return RequestDrafts(tokens, prompt_length, documents, max_depth=self.max_drafts)

    def _retire(self, request: RequestDrafts) -> None:
        """A request left the batch: finished (its output joins the answer index) or preempted (parked)."""
        if self.answers is not None and not request.retired:
            self.answers.add(request.output)
        request.retired = True
        self._parked[id(request)] = request
        while len(self._parked) > MAX_PARKED:
            self._parked.popitem(last=False)


def _cost_profile(device_type: str) -> CostProfile:
    """The engine's verification cost curve: a measured one from $HSD_RAG_VLLM_COST_PROFILE, else hsd_rag.budget's
    default for the device (on CPU the HF curve of FIELD-NOTES §2: vLLM's own could not be measured apart from
    the noise of the shared box this was built on)."""
    path = os.environ.get(COST_PROFILE_ENV)
    if path:
        return CostProfile.load(Path(path))
    return CostProfile.default_for(device_type)
