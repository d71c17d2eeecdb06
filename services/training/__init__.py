"""TrainingService: training jobs (pipelines of stage plugins) kept in Redis (default port 50054).

convert   job records of ``internlm2.plugins.runtime`` <-> training.proto
servicer  TrainingServicer (over JobStore) and TrainingService (connects to Redis)
server    serve(args): the standalone server behind ``internlm2 serve training``
"""

from .servicer import TrainingService, TrainingServicer

__all__ = ["TrainingService", "TrainingServicer"]
