"""Training stages as plugins, and the runtime that runs them as jobs.

    contract    THE plugin contract: Stage, StageConfig, StageContext (read this first)
    registry    discovery through the ``internlm2.stages`` entry-point group
    data        JSONL formats (FORMATS.md), tokenisation with loss masks, packing, token shards
    trainer     run_deepspeed_training: the DeepSpeed loop every training stage shares
    stages      built-in stages (prepare_data, pretrain, sft, reward_model, dpo, ppo, long_context, eval)
    algorithms  losses and metrics of the RLHF/eval stages (pure tensor code)
    runtime     Celery app + task, supervisor of training processes, JobStore (jobs in Redis), k8s
    example_stage/  a separately installable third-party stage package (its own pyproject.toml)
"""

if __name__ != "internlm2.plugins":  # imported as a top-level `plugins` from the repository root
    raise ImportError(
        f"this folder is the package internlm2.plugins; import internlm2.plugins (not {__name__!r}): a second copy "
        "of the same modules would hold different classes and registries"
    )
