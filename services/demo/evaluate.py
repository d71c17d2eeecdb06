"""The demo's serving half: one server per checkpoint, the same held-out questions asked through the SDK."""

from __future__ import annotations

import math
import random
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..local_stack import Child, port_or_free
from .task import Question, descending, wrong_answer

READY_TIMEOUT_S = 180.0


@dataclass
class StageServer:
    child: Child

    @property
    def address(self) -> str:
        return self.child.address

    @classmethod
    def start(cls, service: str, model: Path, log_dir: Path, host: str = "127.0.0.1") -> StageServer:
        """``internlm2 serve <service> --model <model>`` on free ports; returns once it is SERVING."""
        from internlm2_client import check_health

        port, metrics = port_or_free(host, 0), port_or_free(host, 0)
        child = Child(f"{service}-{model.name}", ["serve", service, "--model", str(model), "--host", host,
                                                   "--port", str(port), "--metrics-port", str(metrics)],
                      log_dir / f"demo-{service}-{model.parent.name}-{model.name}.log", address=f"{host}:{port}")
        child.start()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if not child.alive():
                raise RuntimeError(f"{service} server for {model} exited:\n{child.log_tail()}")
            try:
                if check_health(child.address, "", timeout=2.0) == "SERVING":
                    return cls(child)
            except Exception:  # not listening yet
                pass
            if time.monotonic() > deadline:
                child.process.kill()
                raise RuntimeError(f"{service} server for {model} not ready after {READY_TIMEOUT_S:.0f}s")
            time.sleep(0.25)

    def stop(self) -> None:
        process = self.child.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def evaluate_policy(address: str, rewards, questions: list[Question], condition: str) -> dict:
    """Greedy answers to every question (sent concurrently: the engine batches them), their exact and
    per-digit accuracy, their mean reward under the judge, and the perplexity of the reference answers."""
    from internlm2_client import InferenceClient

    with InferenceClient(address, timeout=120) as client:
        def answer(q: Question):
            return client.generate(messages=q.messages(), temperature=0.0, max_new_tokens=16)

        def answer_nll(q: Question) -> tuple[float, int]:
            """Summed -log p of the reference answer and its <|im_end|>, given the question; token count."""
            # The question's length in the served model's own tokens (a --model checkpoint has its own
            # tokenizer): the prompt the server builds for the question with the generation prompt.
            prefix = client.generate(messages=q.messages(), max_new_tokens=1, temperature=0.0).usage.prompt_tokens
            result = client.generate(messages=q.messages(q.answer), add_generation_prompt=False,
                                     max_new_tokens=1, prompt_logprobs=0, temperature=0.0)
            # The template closes the turn with "<|im_end|>\n"; the "\n" after the end of turn is not the
            # answer (SFT never trains on it), so the answer is its text plus <|im_end|>.
            answer_logprobs = [t.logprob for t in result.prompt_logprobs[prefix:-1]]
            return -sum(answer_logprobs), len(answer_logprobs)

        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(answer, questions))
            nll = list(pool.map(answer_nll, questions))
    texts = [r.text.strip() for r in results]
    scores = rewards.score([q.messages(t) for q, t in zip(questions, texts)], condition=condition)
    return {
        "accuracy": sum(q.is_correct(t) for q, t in zip(questions, texts)) / len(questions),
        "digit_accuracy": sum(q.digit_accuracy(t) for q, t in zip(questions, texts)) / len(questions),
        # The other demonstrators' style (task.py): what PPO should move the policy away from.
        "descending": sum(t == descending(q) != q.answer for q, t in zip(questions, texts)) / len(questions),
        "mean_reward": sum(scores) / len(scores),
        "perplexity": math.exp(sum(n for n, _ in nll) / sum(c for _, c in nll)),
        "samples": [{"question": q.prompt, "answer": t, "expected": q.answer} for q, t in zip(questions, texts)][:4],
    }


def reward_accuracy(rewards, questions: list[Question], condition: str, seed: int = 7) -> float:
    """How often the judge prefers the correct answer to a wrong one on held-out questions."""
    rng = random.Random(seed)
    wins = 0
    for q in questions:
        comparison = rewards.compare(q.messages(), q.answer, wrong_answer(q, rng), condition=condition)
        wins += comparison.preferred.value == "a"
    return wins / len(questions)
