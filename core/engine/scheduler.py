"""Iteration-level scheduling: which requests run how many tokens in the next step.

The contract (vLLM's SchedulerInterface, STYLE 8), called once per step by ``LLMEngine.step``:

    schedule() -> SchedulerOutput         pick (request, num_new_tokens) pairs within the budgets
    <the runner executes them and samples>
    update_from_output(out, sampled)      advance progress, append tokens, finish and free

and ``finish_request`` at any time (abort, stop string) to free a request's blocks at once.

Policy, in ``schedule``:
- Running requests first, in admission order. A decoding request always gets its one token (the
  token budget is never smaller than ``max_num_seqs``, and prefill chunks leave room for every
  decode), so long prompts never stall decodes. A request still in prefill gets a chunk of what is left
  of ``max_num_batched_tokens`` (chunked prefill; with ``enable_chunked_prefill`` off a waiting request is
  admitted only when its whole prefill fits the step).
- When a running request cannot get a block, the most recently admitted running request is preempted
  (``Preemption``: blocks freed, recomputed later from its tokens; cached prefix blocks usually make
  that cheap) — possibly the request itself. Never an error, never an allocation past the pool.
- Then waiting requests, FCFS, while there are sequence slots, tokens and blocks (keeping a small
  watermark free). A new request starts after its longest cached prefix. The head of the queue is never
  skipped, so nothing starves. The siblings of an n > 1 request (queued right behind their leader) are
  admitted only once the leader has computed the prompt, so they start from its cached blocks: the
  prompt's KV is computed once and shared by ref count (with the prefix cache off they do not wait).
The queue is bounded: ``add_request`` past ``max_queue_size`` raises ``EngineOverloadedError``.
One path finishes a sequence, ``_finish``: abort, stop strings, errors and token-level stops alike.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .errors import EngineOverloadedError
from .outputs import ERROR
from .params import EngineConfig
from .request import Request, RequestStatus


@dataclass(slots=True)
class SchedulerOutput:
    """The step's work: ``requests[i]`` runs ``num_new_tokens[i]`` tokens from its
    ``num_computed_tokens``. ``preempted`` lost their blocks this step."""

    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    total_tokens: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.requests


class Preemption:
    """Recompute preemption: drop the victim's blocks and put it back at the head of the queue."""

    def __init__(self, block_manager: BlockManager):
        self.block_manager = block_manager
        self.count = 0

    def preempt(self, request: Request, waiting: deque[Request]) -> None:
        self.block_manager.free(request)
        request.reset_for_recompute()
        waiting.appendleft(request)
        self.count += 1


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager, max_model_len: int):
        self.config = config
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.preemption = Preemption(block_manager)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[tuple[str, int], Request] = {}  # live sequences by (request id, sibling index)
        self.groups: dict[str, list[Request]] = {}  # live request id -> its sibling sequences
        self.num_computed_prompt_tokens = 0
        self.num_generated_tokens = 0

    # ---- queue -----------------------------------------------------------------------------------
    def add_request(self, siblings: list[Request]) -> None:
        """Queue one request's sequences (n siblings, leader first), all or none."""
        if len(self.waiting) + len(siblings) > self.config.max_queue_size:
            raise EngineOverloadedError(
                f"engine overloaded: {len(self.waiting)} sequences waiting (max_queue_size "
                f"{self.config.max_queue_size}); retry later"
            )
        self.groups[siblings[0].request_id] = siblings
        for request in siblings:
            self.requests[request.key] = request
            self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def finish_request(self, request: Request, reason: str, stop_reason=None, error: str | None = None) -> None:
        """End ``request`` now (any state, e.g. aborted or stopped by a stop string) and free its blocks."""
        if request.is_finished:
            return
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            with contextlib.suppress(ValueError):
                self.waiting.remove(request)
        self._finish(request, reason, stop_reason, error)

    def _finish(self, request: Request, reason: str, stop_reason, error: str | None) -> None:
        """The one place a sequence ends: blocks freed, status and reasons set, no longer live. The caller
        has taken it out of ``running`` / ``waiting``."""
        self.block_manager.free(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        request.stop_reason = stop_reason
        request.error = error
        self.requests.pop(request.key, None)
        group = self.groups.get(request.request_id)
        if group is not None and all(r.is_finished for r in group):
            del self.groups[request.request_id]

    # ---- schedule ------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        bm = self.block_manager
        num_decodes = sum(1 for r in self.running if r.num_tokens - r.num_computed_tokens == 1)
        prefill_budget = self.config.max_num_batched_tokens - num_decodes
        now = time.perf_counter()

        # 1. Running requests, oldest first; the newest are the preemption victims.
        i = 0
        while i < len(self.running):
            req = self.running[i]
            remaining = req.num_tokens - req.num_computed_tokens
            if remaining == 1:
                n = 1
            else:
                n = min(remaining, prefill_budget)
                if n <= 0:
                    i += 1
                    continue
            while not bm.allocate_slots(req, n):
                victim = self.running.pop()
                self.preemption.preempt(victim, self.waiting)
                out.preempted.append(victim)
                if victim is req:
                    break
            if req.status is not RequestStatus.RUNNING:  # it preempted itself
                continue
            if remaining != 1:
                prefill_budget -= n
            out.requests.append(req)
            out.num_new_tokens.append(n)
            i += 1

        # 2. Waiting requests, FCFS, without preempting anyone (and not in a step that just had to).
        max_seqs = self.config.max_num_seqs
        while not out.preempted and self.waiting and len(self.running) < max_seqs and prefill_budget > 0:
            req = self.waiting[0]
            if req.waits_for_leader and bm.enable_prefix_caching:
                break  # FCFS: the siblings start once their shared prompt blocks are cached
            hits = bm.get_computed_blocks(req)
            num_hit = len(hits) * bm.block_size
            n = min(req.num_tokens - num_hit, prefill_budget)
            if n < req.num_tokens - num_hit and not self.config.enable_chunked_prefill:
                break  # its prefill must run whole: wait for a step with room
            # The watermark applies only when someone is running: an idle engine admits anything that fits.
            if not bm.allocate_slots(req, n, hits, admit=bool(self.running)):
                break
            self.waiting.popleft()
            req.num_computed_tokens = num_hit
            if req.first_scheduled is None:
                req.first_scheduled = now
                req.num_cached_tokens = num_hit
            bm.count_admission(req, num_hit)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            prefill_budget -= n
            out.requests.append(req)
            out.num_new_tokens.append(n)

        out.total_tokens = sum(out.num_new_tokens)
        return out

    # ---- update ------------------------------------------------------------------------------
    def update_from_output(self, out: SchedulerOutput, sampled: list[int | None]) -> list[Request]:
        """Apply a step's results; ``sampled[i]`` is the token sampled for ``out.requests[i]`` (None when
        it ran a non-final prefill chunk). Returns the requests that got a token (finished ones included,
        already freed)."""
        bm = self.block_manager
        now = time.perf_counter()
        updated: list[Request] = []
        finished = False
        for req, n, token in zip(out.requests, out.num_new_tokens, sampled):
            if req.is_finished:  # aborted while the step ran
                continue
            if req.num_computed_tokens < req.num_prompt_tokens:
                self.num_computed_prompt_tokens += min(n, req.num_prompt_tokens - req.num_computed_tokens)
            req.num_computed_tokens += n
            bm.cache_computed_blocks(req)
            if token is None:
                continue
            req.append_token(token, now)
            self.num_generated_tokens += 1
            updated.append(req)
            if req.structured is not None and not req.structured.accept_token(token):
                # Cannot happen with the bitmask applied; never let a constrained output go off its grammar.
                self._finish(req, ERROR, None, error=f"token {token} does not fit the structured output grammar")
                finished = True
                continue
            stop = req.check_stop(token, self.max_model_len)
            if stop is not None:
                self._finish(req, *stop, error=None)
                finished = True
        if finished:
            self.running = [r for r in self.running if not r.is_finished]
        return updated
