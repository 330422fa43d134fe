"""igny8_client: Python clients of the IGNY8 billing and settings services.

    from igny8_client import Igny8Credits, Igny8Settings, InsufficientCredits

    billing = Igny8Credits("billing:50051", token=jwt)
    billing.deduct("content_generation", 250)   # 2 credits, retried safely

Blocking clients live here, asyncio ones in :mod:`igny8_client.aio`, the old
``CreditService`` call shapes in :mod:`igny8_client.compat`, exceptions in
:mod:`igny8_client.errors`, generated messages in
``igny8_client.billing_pb2`` / ``igny8_client.settings_pb2``.
"""

from ._common import NO_RETRY, RetryPolicy
from ._gen.igny8.billing.v1 import billing_pb2
from ._gen.igny8.settings.v1 import settings_pb2
from .client import Igny8Credits, Igny8Settings
from .errors import (
    AlreadyExists,
    CaptureExceedsHold,
    DeadlineExceeded,
    FailedPrecondition,
    HoldNotActive,
    IdempotencyKeyReused,
    Igny8Error,
    InsufficientCredits,
    InvalidArgument,
    ModuleDisabled,
    NotFound,
    PermissionDenied,
    RefundExceedsCharge,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    UnknownOperation,
)
from .tokens import token_from_file

__version__ = "0.1.0"

__all__ = [
    "Igny8Credits",
    "Igny8Settings",
    "RetryPolicy",
    "NO_RETRY",
    "token_from_file",
    "billing_pb2",
    "settings_pb2",
    "Igny8Error",
    "InvalidArgument",
    "UnknownOperation",
    "FailedPrecondition",
    "InsufficientCredits",
    "ModuleDisabled",
    "HoldNotActive",
    "CaptureExceedsHold",
    "RefundExceedsCharge",
    "AlreadyExists",
    "IdempotencyKeyReused",
    "PermissionDenied",
    "Unauthenticated",
    "NotFound",
    "Unavailable",
    "DeadlineExceeded",
    "ResourceExhausted",
]
