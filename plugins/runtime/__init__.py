"""Runs jobs (pipelines of stages) on Celery workers and keeps their records in Redis.

One module per part, no import cycle (tests/runtime/test_runtime_parts.py checks the import graph):

    records     Job, StageRun, Artifact, JobEvent, JobState (JSON-safe, mirror training.proto)
    machine     the job state machine: pure transitions returning Effects (no Redis, no clock)
    store       RedisStore: the only Redis code — keys, WATCH/MULTI transact, leases, streams, intents
    pipeline    validate_pipeline: stage configs, references and trust boundaries, before anything runs
    jobs        JobStore: the job API (submit/get/list/cancel/retry/watch) and the worker-side calls
    dispatch    the dispatcher port and its Celery adapter (queue from the record in hand)
    launchers   the launcher port (Run) and the local-process launcher; k8s: the Kubernetes launcher
    supervisor  the one supervision loop: record -> renew lease -> cancel -> result
    settings    RuntimeSettings: plain data, the environment read in one place
    tasks       the ``internlm2.training.run_stage`` task: claim, then supervise
    celery_app  the worker's Celery app and its recovery thread
    worker      run_worker(): the one worker factory behind ``internlm2 serve worker``
    launch      ``python -m internlm2.plugins.runtime.launch RUN.json``: one run of a stage
    channels    events, cancel and the commit fence between a run and its supervisor
    runspec     RUN.json and the StageInputs a stage sees

Import the job API from ``internlm2.plugins.runtime.jobs`` (Celery is imported only to send).
"""
