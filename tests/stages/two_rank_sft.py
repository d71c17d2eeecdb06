"""One rank of a 2-process stage run (tests/stages/test_two_ranks.py starts two of these with RANK/WORLD_SIZE set).

    python tests/stages/two_rank_sft.py BASE DATA OUT_DIR CONFIG_JSON [STAGE]

Runs the real stage (default sft; its data field is "data", DPO's "train_data") on this rank (gloo,
DeepSpeed on CPU) and prints one JSON line: the first step's metrics and the stage's log lines (rank 0's
channel is the one that reports)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def main() -> None:
    base, data, out, config = sys.argv[1], sys.argv[2], Path(sys.argv[3]), json.loads(sys.argv[4])
    name = sys.argv[5] if len(sys.argv) > 5 else "sft"
    from internlm2.plugins.contract import StageInputs, local_context
    from internlm2.plugins.registry import get_stage

    stage = get_stage(name)
    field = "train_data" if name in ("dpo", "reward_model") else "data"
    ctx = local_context(stage, {field: data, **config}, out, inputs=StageInputs(checkpoints={"base": Path(base)}))
    stage.run(ctx)
    metrics = [e["values"] for e in ctx.channel.of_type("metrics")]
    logs = [e["message"] for e in ctx.channel.of_type("log")]
    print(json.dumps({"rank": ctx.rank, "metrics": metrics[:1], "logs": logs}), flush=True)


if __name__ == "__main__":
    main()
    # As the production launcher (plugins/runtime/launch.py) ends: skip interpreter teardown, where gloo's
    # threads can abort a finished rank ("terminate called without an active exception", exit -6).
    sys.stderr.flush()
    os._exit(0)
