"""Message classes of two foreign protocols the SDK speaks, without their packages.

- `google.rpc.Status` and its error details (BadRequest, ErrorInfo, RetryInfo,
  PreconditionFailure, ResourceInfo): the rich error model servers put in the
  `grpc-status-details-bin` trailer (grpc guides/error.md).
- `grpc.health.v1.Health/Check`: the standard health check used by `internlm2 health`.

Their usual homes are googleapis-common-protos / grpcio-status and grpcio-health-checking.
The SDK promises to depend on grpcio and protobuf only, so the few messages it needs are
declared here (field numbers copied from google/rpc/status.proto,
google/rpc/error_details.proto and grpc/health/v1/health.proto) in a PRIVATE descriptor
pool: the same full names may also live in the default pool (a server process that
imports grpcio-status) without clashing. The wire format is what makes them compatible.
"""

from __future__ import annotations

from google.protobuf import any_pb2 as _any_pb2
from google.protobuf import descriptor_pb2, descriptor_pool, duration_pb2, message_factory, text_format

_RPC_FILE = """
name: "internlm2_client/private/google_rpc.proto"
package: "google.rpc"
dependency: "google/protobuf/any.proto"
dependency: "google/protobuf/duration.proto"
syntax: "proto3"
message_type {
  name: "Status"
  field { name: "code" number: 1 label: LABEL_OPTIONAL type: TYPE_INT32 }
  field { name: "message" number: 2 label: LABEL_OPTIONAL type: TYPE_STRING }
  field { name: "details" number: 3 label: LABEL_REPEATED type: TYPE_MESSAGE
          type_name: ".google.protobuf.Any" }
}
message_type {
  name: "BadRequest"
  field { name: "field_violations" number: 1 label: LABEL_REPEATED type: TYPE_MESSAGE
          type_name: ".google.rpc.BadRequest.FieldViolation" }
  nested_type {
    name: "FieldViolation"
    field { name: "field" number: 1 label: LABEL_OPTIONAL type: TYPE_STRING }
    field { name: "description" number: 2 label: LABEL_OPTIONAL type: TYPE_STRING }
    field { name: "reason" number: 3 label: LABEL_OPTIONAL type: TYPE_STRING }
  }
}
message_type {
  name: "ErrorInfo"
  field { name: "reason" number: 1 label: LABEL_OPTIONAL type: TYPE_STRING }
  field { name: "domain" number: 2 label: LABEL_OPTIONAL type: TYPE_STRING }
  field { name: "metadata" number: 3 label: LABEL_REPEATED type: TYPE_MESSAGE
          type_name: ".google.rpc.ErrorInfo.MetadataEntry" }
  nested_type {
    name: "MetadataEntry"
    field { name: "key" number: 1 label: LABEL_OPTIONAL type: TYPE_STRING }
    field { name: "value" number: 2 label: LABEL_OPTIONAL type: TYPE_STRING }
    options { map_entry: true }
  }
}
message_type {
  name: "RetryInfo"
  field { name: "retry_delay" number: 1 label: LABEL_OPTIONAL type: TYPE_MESSAGE
          type_name: ".google.protobuf.Duration" }
}
message_type {
  name: "PreconditionFailure"
  field { name: "violations" number: 1 label: LABEL_REPEATED type: TYPE_MESSAGE
          type_name: ".google.rpc.PreconditionFailure.Violation" }
  nested_type {
    name: "Violation"
    field { name: "type" number: 1 label: LABEL_OPTIONAL type: TYPE_STRING }
    field { name: "subject" number: 2 label: LABEL_OPTIONAL type: TYPE_STRING }
    field { name: "description" number: 3 label: LABEL_OPTIONAL type: TYPE_STRING }
  }
}
message_type {
  name: "ResourceInfo"
  field { name: "resource_type" number: 1 label: LABEL_OPTIONAL type: TYPE_STRING }
  field { name: "resource_name" number: 2 label: LABEL_OPTIONAL type: TYPE_STRING }
  field { name: "owner" number: 3 label: LABEL_OPTIONAL type: TYPE_STRING }
  field { name: "description" number: 4 label: LABEL_OPTIONAL type: TYPE_STRING }
}
"""

_HEALTH_FILE = """
name: "internlm2_client/private/grpc_health.proto"
package: "grpc.health.v1"
syntax: "proto3"
message_type {
  name: "HealthCheckRequest"
  field { name: "service" number: 1 label: LABEL_OPTIONAL type: TYPE_STRING }
}
message_type {
  name: "HealthCheckResponse"
  field { name: "status" number: 1 label: LABEL_OPTIONAL type: TYPE_INT32 }
}
"""

_pool = descriptor_pool.DescriptorPool()
for _dep in (_any_pb2, duration_pb2):
    _pool.Add(descriptor_pb2.FileDescriptorProto.FromString(_dep.DESCRIPTOR.serialized_pb))
for _text in (_RPC_FILE, _HEALTH_FILE):
    _pool.Add(text_format.Parse(_text, descriptor_pb2.FileDescriptorProto()))


def _cls(full_name: str):
    return message_factory.GetMessageClass(_pool.FindMessageTypeByName(full_name))


Status = _cls("google.rpc.Status")
BadRequest = _cls("google.rpc.BadRequest")
ErrorInfo = _cls("google.rpc.ErrorInfo")
RetryInfo = _cls("google.rpc.RetryInfo")
PreconditionFailure = _cls("google.rpc.PreconditionFailure")
ResourceInfo = _cls("google.rpc.ResourceInfo")
HealthCheckRequest = _cls("grpc.health.v1.HealthCheckRequest")
# `status` is an enum in health.proto; declared as int32 here (same wire encoding) and
# named by HEALTH_STATUS_NAMES.
HealthCheckResponse = _cls("grpc.health.v1.HealthCheckResponse")

HEALTH_CHECK_METHOD = "/grpc.health.v1.Health/Check"
HEALTH_STATUS_NAMES = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}

STATUS_DETAILS_KEY = "grpc-status-details-bin"
_TYPE_URL_PREFIX = "type.googleapis.com/"
_DETAIL_TYPES = {
    cls.DESCRIPTOR.full_name: cls for cls in (BadRequest, ErrorInfo, RetryInfo, PreconditionFailure, ResourceInfo)
}


def parse_status_details(trailing_metadata) -> tuple[object | None, list]:
    """Finds the google.rpc.Status in trailing metadata and unpacks its known details.

    Returns (status or None, [detail messages of the types above]); unknown detail types
    and undecodable bytes are skipped (a client must not fail on a richer server).
    """
    for key, value in trailing_metadata or ():
        if key != STATUS_DETAILS_KEY:
            continue
        try:
            status = Status.FromString(value)
        except Exception:  # corrupt details must not hide the status code
            return None, []
        details = []
        for any_msg in status.details:
            cls = _DETAIL_TYPES.get(any_msg.type_url.removeprefix(_TYPE_URL_PREFIX))
            if cls is None:
                continue
            try:
                details.append(cls.FromString(any_msg.value))
            except Exception:
                continue
        return status, details
    return None, []
