"""Regenerate the protobuf/gRPC Python code of `internlm2.v1` from `protos/`.

    python -m internlm2_client._codegen            # writes sdk/python/internlm2/v1/*_pb2*.py[i]
    python -m internlm2_client._codegen --out DIR  # writes DIR/internlm2/v1/... (staleness test)

The `.proto` tree (`protos/internlm2/v1/x.proto`) is laid out like the Python package it
generates, so protoc's absolute imports (`from internlm2.v1 import common_pb2`) resolve
with no rewriting (grpc#29390). The output depends on the grpcio-tools version; the
committed files are made with the version pinned in the SDK's `dev` extra.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
PROTO_ROOT = REPO_ROOT / "protos"
PROTO_PACKAGE = Path("internlm2") / "v1"
SDK_ROOT = REPO_ROOT / "sdk" / "python"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[Path]:
    """The package's .proto files, relative to PROTO_ROOT, sorted (stable output)."""
    return sorted(p.relative_to(PROTO_ROOT) for p in (PROTO_ROOT / PROTO_PACKAGE).glob("*.proto"))


def _protoc(args: list[str]) -> None:
    from grpc_tools import protoc  # build-time only: not a runtime dependency of the SDK

    import_path = Path(protoc.__file__).parent / "_proto"  # google/protobuf/*.proto
    argv = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{import_path}", *args]
    argv += [str(p) for p in proto_files()]
    code = protoc.main(argv)
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code}: {' '.join(argv)}")


def generate(out_root: Path = SDK_ROOT) -> list[Path]:
    """Runs protoc into `out_root/internlm2/v1/` and returns the generated files.

    Stale generated files (of a removed .proto) are deleted first, so the folder holds
    exactly what the current protos produce plus the hand-kept `__init__.py`.
    """
    out_dir = out_root / PROTO_PACKAGE
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.iterdir():
        if old.name.endswith(GENERATED_SUFFIXES):
            old.unlink()
    _protoc([f"--python_out={out_root}", f"--pyi_out={out_root}", f"--grpc_python_out={out_root}"])
    return generated_files(out_root)


def generated_files(out_root: Path = SDK_ROOT) -> list[Path]:
    """The generated files under `out_root/internlm2/v1/`, sorted."""
    out_dir = out_root / PROTO_PACKAGE
    return sorted(p for p in out_dir.iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def descriptor_set_with_source_info(out_file: Path) -> Path:
    """Writes a FileDescriptorSet with source info (comments) of the package's protos."""
    _protoc([f"--descriptor_set_out={out_file}", "--include_source_info", "--include_imports"])
    return out_file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m internlm2_client._codegen",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=SDK_ROOT,
        help="output root; files land in OUT/internlm2/v1/ (default: sdk/python)",
    )
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
