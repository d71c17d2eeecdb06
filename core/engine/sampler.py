"""Next-token sampling for a batch of requests, on the logits' device.

    logits (S, V) fp32 -> [logprobs of the raw distribution]
                       -> penalties (repetition over prompt+output, presence/frequency over output)
                       -> stop ids masked while min_new_tokens is unmet
                       -> greedy rows: argmax | other rows: / temperature -> top-k -> top-p -> min-p
                          -> sample by the exponential race argmax(p / E), E ~ Exp(1)
                             (seeded requests draw E from their own torch.Generator)

Every per-row option is a tensor op over the batch; the work for an option is skipped when no row uses
it, so the common all-greedy or plain-temperature batch is a handful of kernels. The exponential race
samples exactly from p and lets each seeded row draw its noise independently of its batch-mates, so a
seed gives the same tokens alone or in any batch. One host transfer at the end (the sampled ids, and
the logprobs when asked for).
"""

from __future__ import annotations

import torch

from .outputs import TokenLogprob
from .request import Request


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, k: int) -> list[TokenLogprob]:
    """Logprob of ``token_ids[i]`` under ``log_softmax(logits[i])`` and its top ``k`` alternatives."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, token_ids[:, None].long())[:, 0].tolist()
    if k > 0:
        top_v, top_i = lp.topk(k, dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(top_i.tolist(), top_v.tolist())]
    else:
        tops = [[] for _ in chosen]
    return [TokenLogprob(int(t), c, top) for t, c, top in zip(token_ids.tolist(), chosen, tops)]


def apply_penalties(logits: torch.Tensor, rows: list[int], requests: list[Request]) -> None:
    """In place, for the given rows (the few requests that ask for penalties)."""
    device = logits.device
    for i in rows:
        req = requests[i]
        p = req.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(req.token_ids, device=device).unique()
            vals = logits[i, seen]
            logits[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and req.num_output_tokens:
            ids, counts = torch.tensor(req.output_token_ids, device=device).unique(return_counts=True)
            logits[i, ids] -= p.frequency_penalty * counts.to(logits.dtype) + p.presence_penalty


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """Mask all but each row's top-k logits and its top-p nucleus (top_k = V / top_p = 1 leave a row be)."""
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    if top_k is not None:
        kth = sorted_logits.gather(1, (logits.shape[1] - top_k).clamp(min=0)[:, None])
        sorted_logits.masked_fill_(sorted_logits < kth, float("-inf"))
    if top_p is not None:
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= 1 - top_p[:, None]
        drop[:, -1] = False  # always keep the most likely token
        sorted_logits.masked_fill_(drop, float("-inf"))
    return torch.empty_like(sorted_logits).scatter_(1, order, sorted_logits)


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0):
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> tuple[list[int], list[TokenLogprob | None]]:
        """logits (S, V) fp32, one row per request -> (token ids, logprobs or None per request)."""
        params = [r.params for r in requests]
        n, vocab = logits.shape

        lp_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        raw = logits[lp_rows] if lp_rows else None  # keep the raw rows before in-place edits

        pen_rows = [i for i, p in enumerate(params) if p.needs_penalties]
        if pen_rows:
            apply_penalties(logits, pen_rows, requests)
        suppress = [(i, r) for i, r in enumerate(requests) if r.stops_suppressed]
        for i, r in suppress:
            ids = sorted(t for t in r.eos_token_ids | r.stop_token_ids if t < vocab)
            if ids:
                logits[i, ids] = float("-inf")

        greedy = [p.temperature == 0.0 for p in params]
        if all(greedy):
            tokens = logits.argmax(dim=-1)
        else:
            tokens = self._sample(logits, requests, params, greedy)

        token_list = tokens.tolist()
        logprobs: list[TokenLogprob | None] = [None] * n
        if lp_rows:
            k = max(params[i].logprobs for i in lp_rows)
            for i, tl in zip(lp_rows, token_logprobs(raw, tokens[lp_rows], k)):
                tl.top = tl.top[: params[i].logprobs]
                logprobs[i] = tl
        return token_list, logprobs

    def _sample(self, logits, requests, params, greedy) -> torch.Tensor:
        device = logits.device
        argmax = logits.argmax(dim=-1) if any(greedy) else None
        temps = torch.tensor([p.temperature or 1.0 for p in params], device=device)
        logits = logits / temps[:, None]
        top_k = top_p = None
        if any(p.top_k > 0 for p in params):
            top_k = torch.tensor([p.top_k if p.top_k > 0 else logits.shape[1] for p in params], device=device)
        if any(p.top_p < 1.0 for p in params):
            top_p = torch.tensor([p.top_p for p in params], device=device, dtype=logits.dtype)
        if top_k is not None or top_p is not None:
            logits = apply_top_k_top_p(logits, top_k, top_p)
        probs = logits.softmax(dim=-1)
        if any(p.min_p > 0.0 for p in params):
            min_p = torch.tensor([p.min_p for p in params], device=device, dtype=probs.dtype)
            probs = probs.masked_fill(probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values, 0.0)
        noise = torch.empty_like(probs)
        noise.exponential_(generator=self.generator)
        for i, r in enumerate(requests):
            if r.generator is not None and not greedy[i]:
                noise[i].exponential_(generator=r.generator)
        tokens = (probs / noise).argmax(dim=-1)
        if argmax is not None:
            tokens = torch.where(torch.tensor(greedy, device=device), argmax, tokens)
        return tokens
