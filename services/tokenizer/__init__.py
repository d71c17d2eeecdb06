"""TokenizerService: InternLM2's tokenizer and chat template over gRPC (default port 50051).

servicer  TokenizerServicer (protobuf <-> InternLM2Tokenizer) and TokenizerService (its loader)
server    serve(args): the standalone server behind ``internlm2 serve tokenizer``
"""

from .servicer import TokenizerService, TokenizerServicer

__all__ = ["TokenizerService", "TokenizerServicer"]
