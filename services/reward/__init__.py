"""RewardService: InternLM2 reward models over gRPC (default port 50053).

servicer  RewardServicer (protobuf <-> RewardScorer) and RewardService (its loader)
server    serve(args): the standalone server behind ``internlm2 serve reward``
"""

from .servicer import RewardService, RewardServicer

__all__ = ["RewardService", "RewardServicer"]
