"""Gateway overhead: the same 64 concurrent chat streams straight to the inference service over gRPC, and
through the OpenAI-compatible HTTP gateway (SSE), in one run against one server.

Both servers run as their own processes (`internlm2 serve inference`, `internlm2 serve gateway`), as deployed;
this process is only the client: grpc.aio GenerateStream for the direct path, httpx streaming POST
/v1/chat/completions for the gateway. Every stream asks for exactly --max-tokens greedy tokens (ignore_eos),
so both paths do the same engine work. Rounds alternate direct / gateway so load drifts hit both alike; the
table reports the median round of each. Per stream: time to first token (first generated text received) and
its decode rate; per round: generated tokens / wall time.

    python benchmarks/bench_gateway.py                        # CPU, tiny random model, 64 streams x 64 tokens
    python benchmarks/bench_gateway.py --streams 64 --max-tokens 64 --rounds 3 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import httpx
import psutil

from internlm2.v1 import common_pb2, inference_pb2, inference_pb2_grpc

CLI = "import sys; from internlm2_client.cli import main; sys.exit(main(sys.argv[1:]))"
MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Tell me about the quick brown fox and the lazy dog."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(argv: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CLI, *argv], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"a server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{url} not ready in {timeout}s")


# ---- one stream each way ------------------------------------------------------------------------------
async def direct_stream(stub, max_tokens: int) -> tuple[float, float, int]:
    request = inference_pb2.GenerateStreamRequest(
        chat=inference_pb2.ChatInput(messages=[common_pb2.ChatMessage(**m) for m in MESSAGES]),
        sampling=inference_pb2.SamplingParams(temperature=0, max_new_tokens=max_tokens, ignore_eos=True),
    )
    start_t = time.perf_counter()
    first = None
    tokens = 0
    async for message in stub.GenerateStream(request):
        if message.HasField("delta") and message.delta.token_ids:
            tokens += len(message.delta.token_ids)
            if first is None and message.delta.text:
                first = time.perf_counter()
    end = time.perf_counter()
    return first - start_t, end - first, tokens


async def gateway_stream(client: httpx.AsyncClient, model: str, max_tokens: int) -> tuple[float, float, int]:
    body = {"model": model, "messages": MESSAGES, "temperature": 0, "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start_t = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
    end = time.perf_counter()
    return first - start_t, end - first, tokens


def cpu_seconds(proc: subprocess.Popen) -> float:
    """User + system CPU time of a server process so far (all its threads)."""
    times = psutil.Process(proc.pid).cpu_times()
    return times.user + times.system


def measured_round(kind, streams, max_tokens, grpc_address, url, model, servers: dict) -> dict:
    """One round, with the CPU time each process spent in it: on 2 shared cores the gateway's, the engine's
    and this client's work compete, so CPU per token says what each costs whatever the contention."""
    before = {name: cpu_seconds(proc) for name, proc in servers.items()}
    client_before = time.process_time()
    result = asyncio.run(run_round(kind, streams, max_tokens, grpc_address, url, model))
    for name, proc in servers.items():
        result[f"{name}_cpu_ms_per_token"] = 1000 * (cpu_seconds(proc) - before[name]) / result["tokens"]
    result["client_cpu_ms_per_token"] = 1000 * (time.process_time() - client_before) / result["tokens"]
    return result


async def run_round(kind: str, streams: int, max_tokens: int, grpc_address: str, http_url: str, model: str) -> dict:
    if kind == "direct":
        async with grpc.aio.insecure_channel(grpc_address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            t0 = time.perf_counter()
            results = await asyncio.gather(*(direct_stream(stub, max_tokens) for _ in range(streams)))
            wall = time.perf_counter() - t0
    else:
        limits = httpx.Limits(max_connections=streams + 8, max_keepalive_connections=streams + 8)
        async with httpx.AsyncClient(base_url=http_url, timeout=600, limits=limits) as client:
            t0 = time.perf_counter()
            results = await asyncio.gather(*(gateway_stream(client, model, max_tokens) for _ in range(streams)))
            wall = time.perf_counter() - t0
    ttft = sorted(r[0] for r in results)
    tokens = sum(r[2] for r in results)
    decode_rates = [(r[2] - 1) / r[1] for r in results if r[1] > 0]
    return {
        "kind": kind,
        "ttft_p50_s": statistics.median(ttft),
        "ttft_p99_s": ttft[min(len(ttft) - 1, round(0.99 * (len(ttft) - 1)))],
        "tokens": tokens,
        "wall_s": wall,
        "tok_per_s": tokens / wall,
        "stream_tok_per_s_p50": statistics.median(decode_rates),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per path, alternating (median reported)")
    parser.add_argument("--model", default=None, help="checkpoint folder (default: a tiny random one)")
    parser.add_argument("--json", default=None, help="also write the rounds here")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    model_path = args.model
    if model_path is None:
        from internlm2.services.local_stack import make_tiny_models

        model_path = str(make_tiny_models(work / "models")[0])
    grpc_port, http_port = free_port(), free_port()
    inference = start(["serve", "inference", "--model", model_path, "--host", "127.0.0.1", "--port", str(grpc_port),
                       "--metrics-port", "0", "--max-num-seqs", str(args.streams), "--max-num-batched-tokens",
                       str(max(2048, args.streams * 32)), "--max-model-len", "512", "--model-name", "bench"],
                      work / "inference.log")
    gateway = start(["serve", "gateway", "--host", "127.0.0.1", "--port", str(http_port), "--metrics-port", "0",
                     "--inference", f"127.0.0.1:{grpc_port}", "--log-level", "WARNING"], work / "gateway.log")
    url = f"http://127.0.0.1:{http_port}"
    try:
        wait_http(url + "/ready", gateway)
        grpc_address = f"127.0.0.1:{grpc_port}"
        # Warm both paths (first-call costs: channel setup, the engine's first batch shapes).
        asyncio.run(run_round("direct", 4, 8, grpc_address, url, "bench"))
        asyncio.run(run_round("gateway", 4, 8, grpc_address, url, "bench"))
        rounds = []
        for i in range(args.rounds):
            for kind in (("direct", "gateway") if i % 2 == 0 else ("gateway", "direct")):
                result = measured_round(kind, args.streams, args.max_tokens, grpc_address, url, "bench",
                                        {"inference": inference, "gateway": gateway})
                rounds.append(result)
                print(json.dumps(result), file=sys.stderr, flush=True)
    finally:
        for proc in (gateway, inference):
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    def median_round(kind: str) -> dict:
        runs = sorted((r for r in rounds if r["kind"] == kind), key=lambda r: r["tok_per_s"])
        return runs[len(runs) // 2]

    direct, via = median_round("direct"), median_round("gateway")
    print(f"{args.streams} concurrent chat streams x {args.max_tokens} greedy tokens (ignore_eos), "
          f"tiny random InternLM2, CPU; median of {args.rounds} alternating rounds per path")
    print("| path | TTFT p50 | TTFT p99 | aggregate tok/s | per-stream tok/s p50 |")
    print("|---|---|---|---|---|")
    for name, r in (("gRPC direct", direct), ("HTTP gateway (SSE)", via)):
        print(f"| {name} | {r['ttft_p50_s'] * 1000:.0f} ms | {r['ttft_p99_s'] * 1000:.0f} ms | "
              f"{r['tok_per_s']:.0f} | {r['stream_tok_per_s_p50']:.1f} |")
    print(f"| gateway / direct | {via['ttft_p50_s'] / direct['ttft_p50_s']:.2f}x | "
          f"{via['ttft_p99_s'] / direct['ttft_p99_s']:.2f}x | {via['tok_per_s'] / direct['tok_per_s']:.2f}x | "
          f"{via['stream_tok_per_s_p50'] / direct['stream_tok_per_s_p50']:.2f}x |")
    print()
    print("| path | CPU ms per generated token: inference server | gateway | benchmark client |")
    print("|---|---|---|---|")
    for name, r in (("gRPC direct", direct), ("HTTP gateway (SSE)", via)):
        print(f"| {name} | {r['inference_cpu_ms_per_token']:.3f} | {r['gateway_cpu_ms_per_token']:.3f} | "
              f"{r['client_cpu_ms_per_token']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rounds": rounds}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
