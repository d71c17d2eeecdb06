"""ModelRunner: a SchedulerOutput in, one forward over the flattened ragged batch, sampled tokens out.

Per step it builds (on the host, then one copy each to the device):
    input_ids / positions (N,)   decodes first (one token each), then prefill chunks
    slot_mapping (N,)            block_ids[pos // block_size] * block_size + pos % block_size
    decode block tables / lengths, prefill chunks (ctx_len, block table row)
runs ``model.model`` with the PagedAttention backend, computes logits only for the rows that sample
(the last token of every sequence whose tokens are all computed now) plus, for requests that asked
for prompt logprobs, the prompt rows of this chunk, and samples on the device.

Layout: the model gets [1, N]; with dynamic NTK RoPE and a sequence past max_position_embeddings it gets
[N, 1] instead, so ``rope_seq_len`` can be each token's own sequence length (the model scales RoPE per
row; every other op is per token either way).

CUDA graphs: pure-decode steps (the steady state) replay a graph captured for the next batch size up
(padding rows write into the scratch block and are discarded). Capturing needs the Triton decode
kernel (its launch shape is fixed; the blocks it visits come from device tensors). Mixed and prefill
steps run eagerly; their cost is dominated by the prefill GEMMs, not launches.
"""

from __future__ import annotations

import bisect
import logging
import time

import numpy as np
import torch

from .kv_cache import PagedKVCache
from .outputs import TokenLogprob
from .paged_attention import AttentionMetadata, PagedAttention, PrefillChunk
from .params import EngineConfig
from .request import Request
from .sampler import Sampler, token_logprobs
from .scheduler import SchedulerOutput

logger = logging.getLogger(__name__)

PROMPT_LOGPROB_ROWS = 256  # prompt-logprob rows per logits chunk: bounds the (rows, V) fp32 buffer


def _triton_decode_available(device: torch.device, head_dim: int, block_size: int) -> bool:
    if device.type != "cuda":
        return False
    try:
        from . import triton_decode
    except ImportError:
        return False
    return triton_decode.supports(head_dim, block_size)


class _DecodeGraph:
    """A decode step of ``size`` rows over the runner's static input buffers: a captured CUDA graph, or
    (``graph`` None, off-GPU tests) the same forward run eagerly over the same buffers."""

    __slots__ = ("forward", "graph", "logits", "metadata", "size")

    def __init__(self, size: int, metadata: AttentionMetadata, forward, graph=None, logits=None):
        self.size = size
        self.metadata = metadata
        self.forward = forward
        self.graph = graph
        self.logits = logits

    def replay(self) -> torch.Tensor:
        if self.graph is None:
            self.logits = self.forward()
        else:
            self.graph.replay()
        return self.logits


class ModelRunner:
    def __init__(self, model, kv_cache: PagedKVCache, config: EngineConfig, max_model_len: int,
                 sampler: Sampler):
        self.model = model
        self.kv = kv_cache
        self.config = config
        self.sampler = sampler
        self.device = model.device
        mc = model.config
        self.block_size = kv_cache.block_size
        self.max_blocks_per_seq = -(-max_model_len // self.block_size)
        self.num_kv_heads = mc.num_key_value_heads
        self.use_triton = _triton_decode_available(self.device, mc.head_dim, self.block_size)
        self.attn = PagedAttention(kv_cache, mc.num_attention_heads, self.use_triton)
        rotary = model.model.rotary
        self.dynamic_rope = rotary.scaling_type == "dynamic"
        self.max_position_embeddings = mc.max_position_embeddings
        self.num_sms = (torch.cuda.get_device_properties(self.device).multi_processor_count
                        if self.device.type == "cuda" else 1)
        self.graphs: dict[int, _DecodeGraph] = {}
        self.graph_sizes: list[int] = []
        self.prepare_time = 0.0  # host time spent building step inputs (part of the engine's CPU overhead)

    # ---- forward ---------------------------------------------------------------------------------
    def _rope_len(self, seq_lens: list[int]) -> int | None:
        """An int rope_seq_len when one serves all tokens (no dynamic scaling active), else None."""
        if not self.dynamic_rope:
            return None
        if max(seq_lens) <= self.max_position_embeddings:
            return self.max_position_embeddings  # any length up to the limit means unscaled
        return None

    def _hidden(self, input_ids: torch.Tensor, positions: torch.Tensor, token_seq_lens: list[int]) -> torch.Tensor:
        """Final hidden states (N, H) of the flattened step."""
        n = input_ids.shape[0]
        rope = self._rope_len(token_seq_lens)
        if self.dynamic_rope and rope is None:
            lens = torch.tensor(token_seq_lens, device=self.device)
            h = self.model.model(input_ids[:, None], positions[:, None], attn=self.attn, rope_seq_len=lens)
        else:
            h = self.model.model(input_ids[None], positions[None], attn=self.attn, rope_seq_len=rope)
        return h.reshape(n, -1)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> list[int | None]:
        """Run the step; returns the sampled token per scheduled request (None: prefill chunk, no sample).
        Also appends prompt logprobs to the requests that asked for them."""
        t_start = time.perf_counter()
        reqs, counts = sched.requests, sched.num_new_tokens
        # Decodes, then fresh prompts by length (equal lengths batch into one SDPA call), then chunks
        # that continue a cached context.
        order = [i for i, n in enumerate(counts) if n == 1]
        num_decodes = len(order)
        order += sorted((i for i, n in enumerate(counts) if n > 1 and reqs[i].num_computed_tokens == 0),
                        key=counts.__getitem__)
        order += [i for i, n in enumerate(counts) if n > 1 and reqs[i].num_computed_tokens > 0]

        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        token_seq_lens: list[int] = []  # per token: its sequence's length after this step (dynamic RoPE)
        sample_rows: list[int] = []
        sample_idx: list[int] = []  # scheduled index of each sampled row
        decode_seq_lens: list[int] = []
        prefills: list[PrefillChunk] = []
        context_reqs: list[Request] = []  # prefill chunks over cached context: rows of their block table
        prompt_lp: list[tuple[Request, int, int, int]] = []  # (request, first row, first position, rows)
        for i in order:
            req, n = reqs[i], counts[i]
            start = req.num_computed_tokens
            end = start + n
            row0 = len(ids)
            if n == 1:
                ids.append(req.token_ids[start])
                positions.append(start)
                slots.append(req.block_ids[start // bs] * bs + start % bs)
                decode_seq_lens.append(end)
            else:
                ids.extend(req.token_ids[start:end])
                pos = np.arange(start, end)
                positions.extend(pos.tolist())
                table = np.asarray(req.block_ids)
                slots.extend((table[pos // bs] * bs + pos % bs).tolist())
                prev = prefills[-1] if prefills else None
                if start:
                    prefills.append(PrefillChunk(row0, n, start, row=len(context_reqs)))
                    context_reqs.append(req)
                elif prev is not None and prev.ctx_len == 0 and prev.q_len == n:
                    prev.count += 1
                else:
                    prefills.append(PrefillChunk(row0, n, 0))
            if self.dynamic_rope:
                token_seq_lens.extend([end] * n)
            if end == req.num_tokens:
                sample_rows.append(row0 + n - 1)
                sample_idx.append(i)
            if req.needs_prompt_logprobs:
                first = max(start, len(req.prompt_logprobs))
                last = min(end, req.num_prompt_tokens - 1)
                if last > first:
                    prompt_lp.append((req, row0 + first - start, first, last - first))

        sampled: list[int | None] = [None] * len(reqs)
        graph = None
        if num_decodes == len(reqs) and not prompt_lp and self.graphs:
            b = bisect.bisect_left(self.graph_sizes, num_decodes)
            if b < len(self.graph_sizes) and (not self.dynamic_rope or self._rope_len(decode_seq_lens)):
                graph = self.graphs[self.graph_sizes[b]]

        dev = self.device
        if graph is not None:
            logits = self._replay(graph, reqs, ids, positions, slots, decode_seq_lens, t_start)
        else:
            md = AttentionMetadata(slot_mapping=torch.tensor(slots, device=dev), num_decodes=num_decodes,
                                   prefills=prefills)
            decode_reqs = [reqs[i] for i in order[:num_decodes]]
            if num_decodes:
                width = max(len(r.block_ids) for r in decode_reqs)
                md.decode_block_tables = self._block_table(decode_reqs, width, torch.int32)
                md.decode_seq_lens = torch.tensor(decode_seq_lens, dtype=torch.int32, device=dev)
                md.decode_max_blocks = width
                if self.use_triton:
                    from .triton_decode import num_splits_for

                    md.decode_num_splits = num_splits_for(num_decodes, self.num_kv_heads, width, self.num_sms)
            if context_reqs:
                width = max(len(r.block_ids) for r in context_reqs)
                md.prefill_block_tables = self._block_table(context_reqs, width, torch.int64)
            self.attn.metadata = md
            input_ids, input_pos = torch.tensor(ids, device=dev), torch.tensor(positions, device=dev)
            self.prepare_time += time.perf_counter() - t_start
            hidden = self._hidden(input_ids, input_pos, token_seq_lens)
            logits = None
            if sample_rows:
                logits = self.model.compute_logits(hidden[torch.tensor(sample_rows, device=dev)]).float()
            for req, row, first, rows in prompt_lp:
                req.prompt_logprobs.extend(self._prompt_logprobs(req, hidden, row, first, rows))

        if sample_rows:
            sample_reqs = [reqs[i] for i in sample_idx]
            tokens, logprobs = self.sampler(logits, sample_reqs)
            for i, req, tok, lp in zip(sample_idx, sample_reqs, tokens, logprobs):
                sampled[i] = tok
                if lp is not None:
                    if req.new_logprobs is not None:
                        req.new_logprobs.append(lp)
                    if req.cumulative_logprob is not None:
                        req.cumulative_logprob += lp.logprob
        return sampled

    def _block_table(self, requests: list[Request], width: int, dtype) -> torch.Tensor:
        table = np.zeros((len(requests), width), dtype=np.int64)
        for row, r in enumerate(requests):
            table[row, : len(r.block_ids)] = r.block_ids
        return torch.from_numpy(table).to(device=self.device, dtype=dtype)

    def _prompt_logprobs(self, req: Request, hidden: torch.Tensor, row: int, first: int,
                         rows: int) -> list[TokenLogprob]:
        """Logprobs of prompt tokens first+1 .. first+rows, from the hidden states of positions first.. ."""
        out: list[TokenLogprob] = []
        k = req.params.prompt_logprobs
        for off in range(0, rows, PROMPT_LOGPROB_ROWS):
            m = min(PROMPT_LOGPROB_ROWS, rows - off)
            logits = self.model.compute_logits(hidden[row + off : row + off + m]).float()
            targets = torch.tensor(req.token_ids[first + off + 1 : first + off + 1 + m], device=self.device)
            out.extend(token_logprobs(logits, targets, k))
        return out

    # ---- CUDA graphs ---------------------------------------------------------------------------
    def capture_graphs(self, batch_sizes: list[int], emulate: bool = False) -> None:
        """Capture decode graphs for ``batch_sizes`` (largest first, sharing one memory pool).

        ``emulate``: set up the static buffers and padding exactly as for graphs but replay by running the
        forward eagerly: the graph input path, testable without a GPU."""
        if not emulate and (self.device.type != "cuda" or not self.use_triton):
            return
        if self.use_triton:
            from .triton_decode import num_splits_for
        else:
            def num_splits_for(*_):
                return 1

        dev = self.device
        cuda = dev.type == "cuda"
        bmax = max(batch_sizes)
        # Static graph inputs. Rows of one int64 buffer: token ids, positions, slots, sequence lengths, so
        # a step's inputs go up in two copies (this and the block tables) from pinned staging buffers.
        self._g_buf = torch.zeros(4, bmax, dtype=torch.long, device=dev)
        self._g_buf[2] = self.kv.scratch_slot
        self._g_buf[3] = 1
        self._g_ids, self._g_pos, self._g_slots, self._g_lens = self._g_buf.unbind(0)
        self._g_tables = torch.full((bmax, self.max_blocks_per_seq), self.kv.scratch_block, dtype=torch.int32,
                                    device=dev)
        self._h_buf = self._g_buf.cpu()
        self._h_tables = self._g_tables.cpu()
        if cuda:
            self._h_buf, self._h_tables = self._h_buf.pin_memory(), self._h_tables.pin_memory()
        rope = self.max_position_embeddings if self.dynamic_rope else None
        pool = None
        with torch.inference_mode():
            for b in sorted(batch_sizes, reverse=True):
                md = AttentionMetadata(
                    slot_mapping=self._g_slots[:b], num_decodes=b, decode_block_tables=self._g_tables[:b],
                    decode_seq_lens=self._g_lens[:b], decode_max_blocks=self.max_blocks_per_seq,
                    decode_num_splits=num_splits_for(b, self.num_kv_heads, self.max_blocks_per_seq, self.num_sms),
                )
                self.attn.metadata = md

                def forward(b=b):
                    h = self.model.model(self._g_ids[None, :b], self._g_pos[None, :b], attn=self.attn,
                                         rope_seq_len=rope)
                    return self.model.compute_logits(h[0]).float()

                if not cuda:
                    self.graphs[b] = _DecodeGraph(b, md, forward)
                    continue
                stream = torch.cuda.Stream(dev)
                stream.wait_stream(torch.cuda.current_stream(dev))
                with torch.cuda.stream(stream):
                    for _ in range(2):  # compile Triton kernels, settle allocator
                        forward()
                torch.cuda.current_stream(dev).wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = forward()
                pool = graph.pool()
                self.graphs[b] = _DecodeGraph(b, md, forward, graph, logits)
        self.graph_sizes = sorted(self.graphs)
        if cuda:
            torch.cuda.synchronize(dev)
        logger.info("decode graphs (%s) for batch sizes %s", "captured" if cuda else "emulated", self.graph_sizes)

    def _replay(self, graph: _DecodeGraph, reqs: list[Request], ids, positions, slots, seq_lens,
                t_start: float) -> torch.Tensor:
        s = len(ids)
        b = graph.size
        # The previous step's copies have completed: it synchronised on its sampled ids.
        buf = self._h_buf.numpy()
        buf[0, :s], buf[1, :s], buf[2, :s], buf[3, :s] = ids, positions, slots, seq_lens
        buf[0, s:b], buf[1, s:b], buf[2, s:b], buf[3, s:b] = 0, 0, self.kv.scratch_slot, 1  # padding rows
        self._g_buf[:, :b].copy_(self._h_buf[:, :b], non_blocking=True)
        width = max(len(r.block_ids) for r in reqs)
        tables = self._h_tables.numpy()
        for row, r in enumerate(reqs):
            tables[row, : len(r.block_ids)] = r.block_ids
        self._g_tables[:s, :width].copy_(self._h_tables[:s, :width], non_blocking=True)
        self.attn.metadata = graph.metadata
        self.prepare_time += time.perf_counter() - t_start
        return graph.replay()[:s]

    # ---- memory profiling ---------------------------------------------------------------------
    @torch.inference_mode()
    def profile_peak_bytes(self, num_tokens: int, num_sample_rows: int) -> int:
        """Peak extra device memory of a ``num_tokens`` prefill step (activations, logits); CUDA only.

        Runs on this runner's (possibly tiny, temporary) KV cache; the tokens all write into the scratch
        block, which is harmless for a throwaway forward."""
        dev = self.device
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        n = num_tokens
        self.attn.metadata = AttentionMetadata(
            slot_mapping=torch.full((n,), self.kv.scratch_slot, dtype=torch.long, device=dev),
            prefills=[PrefillChunk(0, n, 0)],
        )
        ids = torch.zeros(n, dtype=torch.long, device=dev)
        hidden = self._hidden(ids, torch.arange(n, device=dev), [n] * n if self.dynamic_rope else [])
        rows = min(n, max(num_sample_rows, PROMPT_LOGPROB_ROWS))
        logits = self.model.compute_logits(hidden[:rows]).float()
        torch.log_softmax(logits, dim=-1).sort(dim=-1)  # the sampler's widest temporaries
        del hidden, logits
        torch.cuda.synchronize(dev)
        return torch.cuda.max_memory_allocated(dev) - base
