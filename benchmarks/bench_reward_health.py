"""Health-check latency of a reward server while it works on one maximal (~30 MiB) Score request.

    python benchmarks/bench_reward_health.py [--conversations 20000] [--chars 1500] [--runs 2]

Each run starts ``internlm2 serve reward`` (a tiny random checkpoint) in its own process, sends one
pre-serialized Score request of N conversations whose last one is longer than the context (so the
server parses, builds and tokenizes the whole batch, then refuses it: the encoding phase, without
minutes of tiny-model scoring), and meanwhile calls grpc.health.v1 Check every 10 ms from this
process. Baseline in the same run: the same server with the request parsed, built and tokenized on
the event loop, as before the fix (``--mode old`` patches exactly that back in).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from internlm2_client import RewardClient
from internlm2_client import _convert as cv


def serve(mode: str, argv: list[str]) -> int:
    """The server process: ``internlm2 serve reward``, in ``old`` mode with encoding on the loop."""
    from internlm2.services.common import decoding
    from internlm2.services.reward import servicer
    from internlm2_client.cli import main

    if mode == "old":
        decoding.PARSE_OFF_LOOP_BYTES = 1 << 40

        async def score_on_the_loop(self, candidates, condition):
            sequences = self._encode(candidates(), condition)
            scores = await asyncio.get_running_loop().run_in_executor(self._executor, self.scorer.score_ids, sequences)
            return scores, [len(s) for s in sequences]

        servicer.RewardServicer._score = score_on_the_loop
    return main(argv)


def measure(mode: str, checkpoint: str, payload: bytes) -> dict:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    address = f"127.0.0.1:{port}"
    argv = ["serve", "reward", "--model", checkpoint, "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0"]
    proc = subprocess.Popen([sys.executable, __file__, "--serve", mode, *argv], stderr=subprocess.DEVNULL)
    try:
        with RewardClient(address) as client:
            client.wait_until_ready(timeout=300)
        channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)])
        score = channel.unary_unary("/internlm2.v1.RewardService/Score", lambda b: b, lambda b: b)
        health = health_pb2_grpc.HealthStub(channel)
        done, outcome = threading.Event(), []

        def send():
            try:
                score(payload, timeout=600)
                outcome.append("OK")
            except grpc.RpcError as error:
                outcome.append(error.code().name)
            done.set()

        latencies = []
        start = time.monotonic()
        threading.Thread(target=send, daemon=True).start()
        while not done.is_set():
            t = time.monotonic()
            health.Check(health_pb2.HealthCheckRequest(service="internlm2.v1.RewardService"), timeout=600)
            latencies.append(time.monotonic() - t)
            time.sleep(0.01)
        latencies.sort()
        return {
            "mode": mode,
            "request_s": time.monotonic() - start,
            "outcome": outcome[0],
            "checks": len(latencies),
            "p50_ms": statistics.median(latencies) * 1000,
            "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
            "max_ms": latencies[-1] * 1000,
        }
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--serve":
        sys.exit(serve(sys.argv[2], sys.argv[3:]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=20000)
    parser.add_argument("--chars", type=int, default=1500)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()

    from internlm2.services.local_stack import make_tiny_models

    with tempfile.TemporaryDirectory() as tmp:
        _, reward = make_tiny_models(tmp)
        answered = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "tool " * (args.chars // 5)}]
        conversations = [answered] * args.conversations
        conversations.append([{"role": "user", "content": "word " * 5000}])  # past the context: refused unscored
        payload = cv.score_request(conversations, None).SerializeToString()
        print(f"Score request: {args.conversations + 1} conversations, {len(payload) / 2**20:.1f} MiB")
        print("| mode | request (s) | outcome | health checks | p50 (ms) | p99 (ms) | max (ms) |")
        print("|---|---|---|---|---|---|---|")
        for _ in range(args.runs):
            for mode in ("old", "new"):
                r = measure(mode, str(reward), payload)
                print(
                    f"| {r['mode']} | {r['request_s']:.1f} | {r['outcome']} | {r['checks']} | {r['p50_ms']:.1f} "
                    f"| {r['p99_ms']:.1f} | {r['max_ms']:.1f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
