"""Exceptions built from a status and its trailers, and kept through pickle."""

from __future__ import annotations

import pickle

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from igny8_client import FailedPrecondition, Igny8Error, InsufficientCredits, ModuleDisabled
from igny8_client.errors import DETAILS_TRAILER, build_error


def details(reason: str, metadata: dict[str, str], code: int = 9) -> tuple[tuple[str, bytes], ...]:
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain="billing.igny8", metadata=metadata))
    status = status_pb2.Status(code=code, message="m", details=[info])
    return ((DETAILS_TRAILER, status.SerializeToString()),)


def test_reason_picks_the_class_and_fields_survive_pickle() -> None:
    err = build_error(
        grpc.StatusCode.FAILED_PRECONDITION,
        "Insufficient credits. Required: 10, Available: 7",
        details("INSUFFICIENT_CREDITS", {"required": "10", "available": "7"}),
        attempts=2,
    )
    assert isinstance(err, InsufficientCredits) and (err.required, err.available) == (10, 7)
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is InsufficientCredits and str(copy) == str(err)
    assert (copy.required, copy.available, copy.reason, copy.attempts) == (10, 7, "INSUFFICIENT_CREDITS", 2)
    assert copy.status == err.status and copy.code == grpc.StatusCode.FAILED_PRECONDITION

    disabled = pickle.loads(pickle.dumps(build_error(
        grpc.StatusCode.FAILED_PRECONDITION, "off", details("MODULE_DISABLED", {"module": "writer", "operation": "content_generation"})
    )))
    assert isinstance(disabled, ModuleDisabled) and (disabled.module, disabled.operation) == ("writer", "content_generation")


def test_unknown_reasons_and_bad_trailers_fall_back_to_the_code() -> None:
    err = build_error(grpc.StatusCode.FAILED_PRECONDITION, "x", details("SOMETHING_NEW", {}))
    assert type(err) is FailedPrecondition and err.reason == "SOMETHING_NEW"
    garbled = build_error(grpc.StatusCode.FAILED_PRECONDITION, "y", ((DETAILS_TRAILER, b"\xff\x00garbage"),))
    assert type(garbled) is FailedPrecondition and garbled.status is None and garbled.reason == ""
    other = build_error(grpc.StatusCode.DATA_LOSS, "z", None)
    assert type(other) is Igny8Error and other.code == grpc.StatusCode.DATA_LOSS
    built = InsufficientCredits(required=3, available=1)
    assert str(built) == "Insufficient credits. Required: 3, Available: 1"
