"""The engine's text side with the official tokenizer: stop strings across token boundaries (never
emitted, held back while undecided), stop ids, and the AsyncLLMEngine's streams and cancellation."""

from __future__ import annotations

import asyncio
import time

import pytest

from internlm2.core import InternLM2Config, greedy_generate, random_model
from internlm2.core.engine import (
    AsyncLLMEngine,
    EngineClosedError,
    EngineConfig,
    InvalidRequestError,
    LLMEngine,
    SamplingParams,
)

pytestmark = pytest.mark.timeout(120)

PROMPT_TEXT = "Hello world, this is a test"


@pytest.fixture(scope="module")
def model():
    return random_model(InternLM2Config.preset("tiny"), seed=0)


@pytest.fixture(scope="module")
def observed(model, tok):
    """The model's greedy continuation and each token's text delta, observed before choosing stops."""
    from internlm2.core.tokenizer import IncrementalDetokenizer

    prompt = tok.encode(PROMPT_TEXT)
    ids = greedy_generate(model, prompt, 24)
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push(t) for t in ids]
    return prompt, ids, deltas


def new_engine(model, tok, **kw):
    kw.setdefault("block_size", 4)
    kw.setdefault("max_num_batched_tokens", 64)
    kw.setdefault("max_num_seqs", 8)
    return LLMEngine(model, tok, EngineConfig(**kw))


def spanning_stop(deltas):
    """A stop string made of the end of token k's text and the start of token k+1's, whose first
    occurrence in the output is exactly there; returns (stop, k)."""
    full = "".join(deltas)
    for k in range(len(deltas) - 1):
        a, b = deltas[k], deltas[k + 1]
        if len(a) >= 2 and len(b) >= 2:
            stop = a[-2:] + b[:2]
            if full.find(stop) == len("".join(deltas[: k + 1])) - 2:
                return stop, k
    raise AssertionError("no two adjacent tokens with text to build a stop string from")


def test_stop_string_across_token_boundary_is_held_back_and_not_emitted(model, tok, observed):
    prompt, ids, deltas = observed
    stop, k = spanning_stop(deltas)
    eng = new_engine(model, tok)
    eng.add_request("s", prompt, SamplingParams(temperature=0.0, max_new_tokens=24, stop=["never-there", stop]))
    stream = []
    while eng.has_unfinished():
        stream.extend(eng.step())
    full = "".join(deltas)
    text = "".join(o.new_text for o in stream)
    assert text == full[: full.find(stop)]
    final = stream[-1]
    assert (final.finished, final.finish_reason, final.stop_reason) == (True, "stop", stop)
    assert [t for o in stream for t in o.new_token_ids] == ids[: k + 2]  # the token completing the match stays
    # Token k's text ends with the stop string's first two characters: they were held back, not emitted.
    assert stream[k].new_text == deltas[k][:-2]
    assert all(stop not in o.new_text for o in stream)
    assert eng.stats().num_free_blocks == eng.stats().num_total_blocks


def test_held_back_text_is_flushed_when_no_stop_matches(model, tok, observed):
    prompt, ids, deltas = observed
    full = "".join(deltas)
    stop = full[-1] + "\x00never"  # its first character ends the output: held back, then flushed at "length"
    out = new_engine(model, tok).generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=24, stop=stop))[0]
    assert (out.new_text, out.finish_reason, out.new_token_ids) == (full, "length", ids)


def test_stop_strings_wait_for_min_new_tokens(model, tok, observed):
    prompt, _, deltas = observed
    stop, k = spanning_stop(deltas)
    sp = SamplingParams(temperature=0.0, max_new_tokens=24, stop=[stop], min_new_tokens=k + 2)
    out = new_engine(model, tok).generate([prompt], sp)[0]
    assert out.finish_reason == "length" and out.new_text == "".join(deltas)


def test_stop_token_text_is_not_emitted(model, tok, observed):
    prompt, ids, deltas = observed
    sp = SamplingParams(temperature=0.0, max_new_tokens=24, stop_token_ids=[ids[5]])
    out = new_engine(model, tok).generate([prompt], sp)[0]
    assert (out.finish_reason, out.stop_reason) == ("stop", ids[5])
    assert out.new_token_ids == ids[:6] and out.new_text == "".join(deltas[:5])


def test_tokenizer_defaults_end_at_im_end(model, tok):
    eng = new_engine(model, tok)
    assert eng.eos_token_ids == {tok.eos_id, tok.piece_to_id("<|im_end|>")}


def _drain_async(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=60))


def test_async_stream_deltas_concatenate_to_the_final_text(model, tok, observed):
    prompt, ids, deltas = observed

    async def main():
        async with AsyncLLMEngine(engine=new_engine(model, tok)) as engine:
            sp = SamplingParams(temperature=0.0, max_new_tokens=24, logprobs=1)

            async def one(rid):
                return [o async for o in engine.generate(rid, prompt, sp)]

            return await asyncio.gather(*(one(f"r{i}") for i in range(4)))

    for stream in _drain_async(main()):
        assert all(len(o.new_token_ids) == 1 and len(o.logprobs) == 1 for o in stream)
        assert [t for o in stream for t in o.new_token_ids] == ids
        assert "".join(o.new_text for o in stream) == "".join(deltas) == tok.decode(ids)
        assert [o.finished for o in stream] == [False] * 23 + [True]
        m = stream[-1].metrics
        assert m.first_token_time > 0 and len(m.inter_token_latencies) == 23 and m.e2e_latency >= m.first_token_time


async def _wait_until(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def test_closing_or_cancelling_the_iterator_frees_blocks(model, tok, observed):
    prompt = observed[0]
    sp = SamplingParams(temperature=0.0, max_new_tokens=500, ignore_eos=True)

    async def main():
        async with AsyncLLMEngine(engine=new_engine(model, tok, max_model_len=1024)) as engine:
            full = lambda: engine.stats().num_free_blocks == engine.stats().num_total_blocks
            # 1. aclose() after two deltas.
            it = engine.generate("a", prompt, sp)
            await it.__anext__()
            await it.__anext__()
            assert engine.stats().num_free_blocks < engine.stats().num_total_blocks
            await it.aclose()
            await _wait_until(lambda: full() and engine.stats().num_running == 0)
            # 2. The consuming task is cancelled.
            got = asyncio.Event()

            async def consume():
                async for _ in engine.generate("b", prompt, sp):
                    got.set()

            task = asyncio.create_task(consume())
            await got.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await _wait_until(lambda: full() and engine.stats().num_running == 0)
            # 3. abort() from elsewhere: the stream ends with "cancelled" and abort returns once freed.
            it = engine.generate("c", prompt, sp)
            first = await it.__anext__()
            assert await engine.abort("c") is True
            assert full()
            rest = [o async for o in it]
            assert rest[-1].finished and rest[-1].finish_reason == "cancelled"
            assert len(first.new_token_ids) + sum(len(o.new_token_ids) for o in rest) < 500
            assert await engine.abort("c") is False

    _drain_async(main())


def test_async_errors_and_shutdown(model, tok, observed):
    prompt = observed[0]

    async def main():
        engine = AsyncLLMEngine(engine=new_engine(model, tok))
        with pytest.raises(InvalidRequestError) as err:
            await engine.generate("x", prompt, SamplingParams(top_p=2.0)).__anext__()
        assert err.value.field == "top_p"
        it = engine.generate("long", prompt, SamplingParams(temperature=0.0, max_new_tokens=500))
        await it.__anext__()
        with pytest.raises(InvalidRequestError):
            await engine.generate("long", prompt, SamplingParams(max_new_tokens=4)).__anext__()
        await engine.shutdown()
        rest = [o async for o in it]
        assert rest[-1].finished and rest[-1].finish_reason == "cancelled"
        with pytest.raises(EngineClosedError):
            await engine.generate("late", prompt, SamplingParams(max_new_tokens=4)).__anext__()

    _drain_async(main())
