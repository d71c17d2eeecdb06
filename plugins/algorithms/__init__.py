"""The alignment algorithms behind the reward_model, dpo, ppo, long_context and eval stages.

Compute apart from the job plumbing: no DeepSpeed, no stage context — the stages wire these into the shared
trainer (``datasets`` is the one module that reads files).

    reward_loss   COOL RLHF reward-model loss: focal ranking loss + log-barrier score penalty
    dpo_loss      direct preference optimisation against a frozen reference
    ppo_loss      KL-shaped per-token rewards, GAE, clipped policy and value losses
    logprobs      per-token log-probs of selected tokens through the fused linear + cross-entropy
    preference    preference pairs -> token ids (conditional RM sequences, DPO prompt/response splits)
    rollout       PPO rollouts through the shared inference engine
    similarity    sequence similarity to a reference answer (ROUGE-L), the seed's alignment reward
    metrics       perplexity, BLEU (sacrebleu), ROUGE (rouge-score), task accuracy
    needle        needle-in-a-haystack prompts, scoring and the heatmap
    ppo_experience  rollouts -> log-probs, values, rewards, GAE; the actor and critic minibatch losses
    models        reward model from a causal-LM trunk, frozen copies, their dtype
    datasets      JSONL records of the stages (preference, prompt, text, eval), hold-out split, packing
"""
