"""The platform's gRPC servers (package ``internlm2.v1``), each runnable alone.

    common      what every server shares: config, lifecycle + health, interceptors (request ids,
                errors -> google.rpc.Status, bearer auth, readiness), metrics HTTP server, TLS, JSON logs
    tokenizer   TokenizerService over ``internlm2.core.tokenizer``            (port 50051)
    inference   InferenceService over ``internlm2.core.engine.AsyncLLMEngine`` (port 50052)
    reward      RewardService over ``internlm2.core.reward.RewardScorer``      (port 50053)
    training    TrainingService over the plugins' Redis job store             (port 50054)
    worker      the Celery worker that runs training stages
    cli_entry   ``serve(args)`` behind ``internlm2 serve``
    local_stack ``up(args)`` behind ``internlm2 up``: Redis, the four servers and a worker on one machine

Servicers are thin: they convert protobuf to plain Python, call the core, and convert back. Every
cross-cutting concern (request ids, errors, auth, readiness, access logs, RPC metrics) lives in an
interceptor in ``common``.
"""

if __name__ != "internlm2.services":  # imported as a top-level `services` from the repository root
    raise ImportError(
        f"this folder is the package internlm2.services; import internlm2.services (not {__name__!r}): a second copy "
        "of the same modules would hold different classes and registries"
    )
