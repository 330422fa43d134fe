#!/usr/bin/env python3
"""Python grpcio against a service binary serving mTLS.

Driven by tests/tests/tls.rs, which makes a throw-away CA and starts the
binary with IGNY8_TLS_CERT_FILE / IGNY8_TLS_KEY_FILE / IGNY8_TLS_CLIENT_CA_FILE.
--dir holds ca.pem (the CA that signed the server and the client),
client.crt and client.key. Checks: health and an authenticated call succeed
with the client certificate; without one, or trusting another CA, the
connection is refused.

    python3 tests/python/tls_check.py --addr 127.0.0.1:50052 --dir certs/ \
        --service igny8.settings.v1.SettingsService --token "$USER_JWT"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
except ImportError as e:  # pragma: no cover - environment problem
    print(f"tls_check.py: missing Python package ({e}): pip install grpcio grpcio-health-checking",
          file=sys.stderr)
    sys.exit(2)

TIMEOUT = 10.0


def health(channel: grpc.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT).status


def refused(creds: grpc.ChannelCredentials, addr: str, service: str, what: str) -> None:
    with grpc.secure_channel(addr, creds) as channel:
        try:
            status = health(channel, service)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE, f"{what}: {e.code()} {e.details()}"
            print(f"ok: {what} refused ({e.code().name})")
            return
    raise AssertionError(f"{what}: expected a refused connection, got health status {status}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--addr", required=True)
    parser.add_argument("--dir", required=True, type=Path)
    parser.add_argument("--service", required=True)
    parser.add_argument("--token", required=True)
    args = parser.parse_args()
    ca = (args.dir / "ca.pem").read_bytes()
    cert = (args.dir / "client.crt").read_bytes()
    key = (args.dir / "client.key").read_bytes()

    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    with grpc.secure_channel(args.addr, creds) as channel:
        status = health(channel, args.service)
        assert status == health_pb2.HealthCheckResponse.SERVING, f"health: {status}"
        print("ok: health SERVING over mTLS")
        # GetModuleSettingsRequest is empty: raw bytes in and out, no stubs.
        method = "/" + args.service + "/GetModuleSettings"
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        reply = call(b"", metadata=[("authorization", f"Bearer {args.token}")], timeout=TIMEOUT)
        assert isinstance(reply, bytes) and reply, "GetModuleSettings returned nothing"
        print(f"ok: authenticated call over mTLS ({len(reply)} bytes)")
        try:
            call(b"", timeout=TIMEOUT)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAUTHENTICATED, e.code()
            print("ok: mTLS does not replace the bearer token (UNAUTHENTICATED)")
        else:
            raise AssertionError("a call without a token must fail")

    refused(grpc.ssl_channel_credentials(root_certificates=ca), args.addr, args.service,
            "no client certificate")
    # Trusting only the client certificate (not the CA): the server is unknown.
    refused(grpc.ssl_channel_credentials(root_certificates=cert, private_key=key,
                                         certificate_chain=cert),
            args.addr, args.service, "an untrusted server certificate")
    print("tls checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
