"""Next-token sampling for a batch of requests, on the logits' device.

    logits (S, V) fp32 -> [logprobs of the raw distribution]
                       -> penalties (repetition over prompt+output, presence/frequency over output)
                       -> stop ids masked while min_new_tokens is unmet
                       -> grammar bitmask on the constrained rows (structured output)
                       -> greedy rows: argmax | other rows: / temperature -> top-k -> top-p -> min-p
                          -> sample by the exponential race argmax(p / E), E = -log u
                             u[b, v] = hash(noise_key_b, step_b, v): counter-based, one draw per batch

Every per-row option is a tensor op over the batch; the work for an option is skipped when no row uses
it, so the common all-greedy or plain-temperature batch is a handful of kernels. One host transfer at the
end (the sampled ids, and the logprobs when asked for).

Sampling noise is counter-based, not drawn from a generator: the uniform for request ``b``, vocabulary
index ``v`` at its ``step_b``-th output token is a pure function of (its noise key, step_b, v). So a
request's tokens depend only on its own key, prompt and sampling params: the same alone or in any batch,
after preemption and recompute, whatever ran before (a generator's output depends on how many draws
preceded it). The whole batch's noise is one vectorised int64 computation, no per-request kernels.

The hash is SplitMix64 (Steele, Lea & Flood 2014; Vigna's ``splitmix64.c``), the generator
``java.util.SplittableRandom`` uses: a Weyl sequence ``key + i * GAMMA`` through the Stafford "Mix13"
finaliser, which passes BigCrush. Here it runs twice: once over steps (per row, ``[S]``) to derive the
row's stream start, then over pairs of vocabulary indices (``[S, V/2]``, 23 bits from each half of the
64-bit output). Eager torch, about ten passes over ``[S, V/2]`` int64; torch int64 arithmetic wraps mod 2**64
like uint64 and XOR is bitwise, so only the right shifts need care: they are arithmetic on negative
values, so each one is masked to the bits a logical shift keeps.

Keys (``noise_key`` / ``engine_noise_key``, computed once per request in Python): a request's own
``seed`` maps to Mix13(2 seed + c), the engine's unseeded requests to Mix13(2 (Mix13(engine seed) + n) + 1
+ c) for the engine's n-th request; Mix13 is a bijection, so user seeds and engine streams never share a
key. Unseeded requests go through the same path (one code path, and they too are batch invariant); they
are reproducible given the engine seed and arrival order, as the former engine-wide generator was.
"""

from __future__ import annotations

import torch

from .outputs import TokenLogprob
from .request import Request

_M64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's Weyl increment (2**64 / golden ratio, odd): over vocab indices
_GAMMA_STEP = 0xD1B54A32D192ED03  # another odd increment (a Weyl constant of Steele & Vigna): over steps
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # Stafford Mix13 multipliers
_KEY_OFFSET = 0x2545F4914F6CDD1D  # keeps seed 0 off Mix13's fixed point 0
_GAMMA_SIBLING = 0x8CB92BA72F3D8DD7  # odd Weyl increment (Steele & Vigna's table): over sibling indices


def _signed(x: int) -> int:
    """uint64 bit pattern -> the int64 with the same bits (what an int64 tensor holds)."""
    return x - (1 << 64) if x >= 1 << 63 else x


def mix64(z: int) -> int:
    """Stafford Mix13 of a uint64, in Python ints: the reference for ``mix64_``."""
    z &= _M64
    z = ((z ^ (z >> 30)) * _MIX1) & _M64
    z = ((z ^ (z >> 27)) * _MIX2) & _M64
    return z ^ (z >> 31)


def noise_key(seed: int) -> int:
    """The int64 noise key of a request with ``SamplingParams.seed`` (an int in [0, 2**63))."""
    return _signed(mix64(2 * seed + _KEY_OFFSET))


def engine_noise_key(engine_seed: int, index: int) -> int:
    """The int64 noise key of the engine's ``index``-th request without a seed (odd pre-image: never a
    user seed's key)."""
    return _signed(mix64(2 * ((mix64(engine_seed) + index) % (1 << 63)) + 1 + _KEY_OFFSET))


def sibling_key(key: int, index: int) -> int:
    """The noise key of sibling ``index`` of an n > 1 request whose own key is ``key``: sibling 0 keeps
    it (so it is the n = 1 completion), the others get Mix13 of the key advanced by ``index`` Weyl
    steps, so each sibling is reproducible from the request's seed alone."""
    if index == 0:
        return key
    return _signed(mix64(key + index * _GAMMA_SIBLING))


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (``>>`` sign-extends; the mask drops the copied sign)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def mix64_(x: torch.Tensor) -> torch.Tensor:
    """Stafford Mix13 of int64 tensor ``x`` as uint64 bit patterns, in place (wrapping multiplies)."""
    x ^= _shr(x, 30)
    x *= _signed(_MIX1)
    x ^= _shr(x, 27)
    x *= _signed(_MIX2)
    x ^= _shr(x, 31)
    return x


def counter_uniform(keys: torch.Tensor, steps: torch.Tensor, vocab: int,
                    offsets: torch.Tensor | None = None) -> torch.Tensor:
    """keys, steps (S,) int64 -> u (S, vocab) fp32, u[b, v] = hash(keys[b], steps[b], v), uniform on (0, 1).

    One 64-bit hash serves the pair of indices (2i, 2i + 1): its bits 41..63 make u[2i], its bits 9..31
    u[2i + 1] (disjoint bits of one SplitMix64 output), which halves the int64 work, the bulk of the cost.
    u takes the 2**23 values (2j + 1) / 2**24: never 0 or 1, so E = -log u is finite and positive and a
    masked (p = 0) token never wins the race. ``offsets`` is ``arange((vocab + 1) // 2) * GAMMA`` (int64),
    for a caller that caches it.
    """
    half = (vocab + 1) // 2
    if offsets is None:
        offsets = torch.arange(half, dtype=torch.int64, device=keys.device) * _signed(_GAMMA)
    base = mix64_(keys + steps * _signed(_GAMMA_STEP))  # (S,) the row's stream start for this step
    x = mix64_(base[:, None] + offsets[None, :])  # (S, half) 64 random bits per pair of indices
    # j * 2**-23 + 2**-24 with j < 2**23 is exact in fp32. (x >> 41) is signed, in [-2**22, 2**22).
    even = (x >> 41).mul(2.0**-23).add_(0.5 + 2.0**-24)
    odd = ((x >> 9) & ((1 << 23) - 1)).mul(2.0**-23).add_(2.0**-24)  # the mask drops any sign bits
    return torch.stack((even, odd), dim=-1).view(-1, 2 * half)[:, :vocab]


def exponential_race(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """probs (S, V) (rows may be unnormalised, zeros never win), uniform (S, V) on (0, 1) -> ids (S,).

    argmax_v p_v / E_v with E_v = -log u_v ~ Exp(1) independent picks v with probability p_v / sum(p).
    Computed as argmin p_v / log u_v (log u < 0), one pass fewer; ``uniform`` is overwritten.
    """
    return (probs / uniform.log_()).argmin(dim=-1)


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
    """Samples one token per row. Stateless but for a cache: the noise comes from each request's
    ``noise_key`` and output count, so nothing here depends on what was sampled before."""

    def __init__(self, device: torch.device, structured=None):
        self.device = device
        self.structured = structured  # structured.StructuredOutputs: bitmasks of constrained rows
        self._offsets: torch.Tensor | None = None  # int64 arange((V + 1) // 2) * GAMMA for counter_uniform

    def _vocab_offsets(self, vocab: int, device: torch.device) -> torch.Tensor:
        half = (vocab + 1) // 2
        if self._offsets is None or self._offsets.shape[0] != half or self._offsets.device != device:
            self._offsets = torch.arange(half, dtype=torch.int64, device=device) * _signed(_GAMMA)
        return self._offsets

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> tuple[list[int], list[TokenLogprob | None]]:
        """logits (S, V) fp32, one row per request -> (token ids, logprobs or None per request)."""
        params = [r.params for r in requests]
        n, vocab = logits.shape

        # Rows that asked for logprobs, and best_of rows (their chosen token's logprob sums up).
        lp_rows = [i for i, p in enumerate(params) if p.logprobs is not None or p.wants_cumulative_logprob]
        raw = logits[lp_rows] if lp_rows else None  # keep the raw rows before in-place edits

        pen_rows = [i for i, p in enumerate(params) if p.needs_penalties]
        if pen_rows:
            apply_penalties(logits, pen_rows, requests)
        suppress = [(i, r) for i, r in enumerate(requests) if r.stops_suppressed]
        for i, r in suppress:
            ids = sorted(t for t in r.eos_token_ids | r.stop_token_ids if t < vocab)
            if ids:
                logits[i, ids] = float("-inf")

        constrained = [i for i, r in enumerate(requests) if r.structured is not None]
        if constrained:
            from .structured import apply_bitmask

            mask = self.structured.bitmask([requests[i].structured for i in constrained])
            apply_bitmask(logits, constrained, mask)

        greedy = [p.temperature == 0.0 for p in params]
        if all(greedy):
            tokens = logits.argmax(dim=-1)
        else:
            tokens = self._sample(logits, requests, params, greedy)

        token_list = tokens.tolist()
        logprobs: list[TokenLogprob | None] = [None] * n
        if lp_rows:
            k = max(params[i].logprobs or 0 for i in lp_rows)
            for i, tl in zip(lp_rows, token_logprobs(raw, tokens[lp_rows], k)):
                tl.top = tl.top[: params[i].logprobs or 0]
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
        # One (S, 2) int64 transfer; the step is the index of the output token being sampled, so a
        # recompute after preemption replays the same noise.
        counters = torch.tensor([(r.noise_key, r.num_output_tokens) for r in requests], dtype=torch.int64,
                                device=device)
        uniform = counter_uniform(counters[:, 0], counters[:, 1], probs.shape[1],
                                  self._vocab_offsets(probs.shape[1], device))
        tokens = exponential_race(probs, uniform)
        if argmax is not None:
            tokens = torch.where(torch.tensor(greedy, device=device), argmax, tokens)
        return tokens
