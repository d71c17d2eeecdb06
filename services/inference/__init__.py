"""InferenceService: text generation with the continuous-batching engine (default port 50052).

requests   protobuf request -> prompt token ids + engine SamplingParams (validation, field paths)
responses  engine RequestOutputs -> deltas / final messages (logprobs, usage, parsed tool calls)
metrics    vLLM-style Prometheus metrics (``internlm2:`` prefix) of the engine and its requests
servicer   InferenceServicer (thin) and InferenceService (loads the model, owns the engine)
server     serve(args): the standalone server behind ``internlm2 serve inference``
"""

from .servicer import InferenceService, InferenceServicer

__all__ = ["InferenceService", "InferenceServicer"]
