"""Python client of the InternLM2 platform (gRPC, package internlm2.v1). No torch.

One client per service, because each service is its own server (own port, own
scaling, own lifetime: the tokenizer may be up while the inference model still loads):

    from internlm2_client import InferenceClient
    with InferenceClient("127.0.0.1:50052", token="...") as client:
        result = client.generate("The capital of France is", max_new_tokens=8, temperature=0)
        for delta in client.generate_stream(messages=[{"role": "user", "content": "Hi"}]):
            print(delta.text, end="")

`internlm2_client.aio` has the asyncio twins with the same names. Results are the
dataclasses of `internlm2_client.types`; failures raise `internlm2_client.errors`
exceptions (subclasses of InternLM2Error, one per gRPC status code).
"""

from internlm2_client import aio, errors, types
from internlm2_client._channel import DEFAULT_PORTS, ChannelConfig, RetryPolicy, default_address
from internlm2_client._sync import (
    GenerationStream,
    InferenceClient,
    RewardClient,
    ServerStream,
    TokenizerClient,
    TrainingClient,
    check_health,
)
from internlm2_client.errors import (
    AbortedError,
    AlreadyExistsError,
    CancelledError,
    DataLossError,
    DeadlineExceededError,
    FailedPreconditionError,
    FieldViolation,
    InternalError,
    InternLM2Error,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
    UnknownError,
)
from internlm2_client.types import (
    Artifact,
    ArtifactKind,
    ChatMessage,
    ChatTemplateResult,
    Comparison,
    FinishReason,
    GenerateDelta,
    GenerateResult,
    Job,
    JobEvent,
    JobEventKind,
    JobPage,
    JobState,
    ModelInfo,
    Preference,
    Ranking,
    RequestMetrics,
    SamplingParams,
    StageInfo,
    StageRun,
    StageSpec,
    Submission,
    TokenCounts,
    TokenizedText,
    TokenizerInfo,
    TokenLogprob,
    Tool,
    ToolCall,
    ToolKind,
    TopLogprob,
    Usage,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_PORTS",
    "AbortedError",
    "AlreadyExistsError",
    "Artifact",
    "ArtifactKind",
    "CancelledError",
    "ChannelConfig",
    "ChatMessage",
    "ChatTemplateResult",
    "Comparison",
    "DataLossError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "FieldViolation",
    "FinishReason",
    "GenerateDelta",
    "GenerateResult",
    "GenerationStream",
    "InferenceClient",
    "InternLM2Error",
    "InternalError",
    "InvalidArgumentError",
    "Job",
    "JobEvent",
    "JobEventKind",
    "JobPage",
    "JobState",
    "ModelInfo",
    "NotFoundError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "Preference",
    "Ranking",
    "RequestMetrics",
    "ResourceExhaustedError",
    "RetryPolicy",
    "RewardClient",
    "SamplingParams",
    "ServerStream",
    "StageInfo",
    "StageRun",
    "StageSpec",
    "Submission",
    "TokenCounts",
    "TokenLogprob",
    "TokenizedText",
    "TokenizerClient",
    "TokenizerInfo",
    "Tool",
    "ToolCall",
    "ToolKind",
    "TopLogprob",
    "TrainingClient",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "UnknownError",
    "Usage",
    "aio",
    "check_health",
    "default_address",
    "errors",
    "types",
]
