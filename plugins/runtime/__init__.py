"""Runs jobs (pipelines of stages) on Celery workers and keeps their records in Redis.

    records     Job, StageRun, Artifact, JobEvent, JobState (JSON-safe, mirror training.proto)
    pipeline    validate_pipeline: every stage config checked before anything runs
    jobs        JobStore: submit / get / list / cancel / watch + the worker-side transitions
    celery_app  make_app / app: Redis broker + backend, acks_late, prefetch 1, long visibility timeout
    tasks       the ``internlm2.training.run_stage`` task and per-stage dispatch
    supervisor  launches and follows the training process (cancel, heartbeat lease, events)
    launch      ``python -m internlm2.plugins.runtime.launch RUN.json``: runs a stage in a process
    channels    event/cancel transport between the training process and its supervisor
    k8s         multi-node: Kubernetes indexed Job + headless Service, and following it
    worker      run_worker(): what ``internlm2 serve worker`` calls

Import the job API from ``internlm2.plugins.runtime.jobs`` (no Celery import until a job is sent).
"""
