"""Fixtures: the real billing-svc and settings-svc binaries on a fresh
PostgreSQL database, seeded directory rows, and tokens.

The tests are run by ``cargo test -p igny8-tests --test python_client`` (and
so by ``cargo test --workspace`` and ``.ci/run``), which builds the binaries
and sets:

* ``IGNY8_BILLING_BIN``, ``IGNY8_SETTINGS_BIN``: the service binaries;
* ``IGNY8_TEST_JWT_SECRET``: the HS256 secret they are started with;
* ``IGNY8_TEST_POSTGRES_URL``: a PostgreSQL server URL whose user may
  ``CREATE DATABASE`` (default ``postgres://postgres@127.0.0.1:5432/postgres``).

By hand: ``cargo build -p billing-svc -p settings-svc`` then
``IGNY8_BILLING_BIN=target/debug/billing-svc IGNY8_SETTINGS_BIN=target/debug/settings-svc
python3 -m pytest clients/python/tests``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import igny8_client

REPO = Path(__file__).resolve().parents[3]

# pyproject.toml puts src/ first on sys.path: the tests must exercise the
# checkout, never a copy installed earlier with pip.
assert Path(igny8_client.__file__).resolve().is_relative_to(REPO / "clients" / "python" / "src"), (
    f"testing {igny8_client.__file__}, not the source tree: run pytest from clients/python"
)


def _required_env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.exit(
            f"{name} is not set: run these tests with `cargo test -p igny8-tests --test python_client`, "
            f"or see clients/python/tests/conftest.py",
            returncode=4,
        )
    return value


SECRET = os.environ.get("IGNY8_TEST_JWT_SECRET", "igny8-test-secret-0123456789abcdef0123456789")
PG_ADMIN = os.environ.get("IGNY8_TEST_POSTGRES_URL") or "postgres://postgres@127.0.0.1:5432/postgres"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign(claims: dict[str, Any]) -> str:
    """An HS256 JWT with the test secret."""
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64(json.dumps(claims).encode())
    sig = hmac.new(SECRET.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(sig)}"


def access_token(user_id: int, account_hint: int | None = None, ttl: int = 3600) -> str:
    claims: dict[str, Any] = {"type": "access", "user_id": user_id, "exp": int(time.time()) + ttl, "iat": int(time.time())}
    if account_hint is not None:
        claims["account_id"] = account_hint
    return sign(claims)


def service_token(name: str = "python-client-tests") -> str:
    return sign({"type": "service", "sub": name, "exp": int(time.time()) + 3600})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Psql:
    """Runs SQL on one database with the psql client."""

    def __init__(self, url: str) -> None:
        self.url = url

    def run(self, sql: str) -> str:
        out = subprocess.run(
            ["psql", self.url, "-v", "ON_ERROR_STOP=1", "-qAtX", "-c", sql],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if out.returncode != 0:
            raise AssertionError(f"psql failed ({out.returncode}) on {sql!r}: {out.stderr}")
        return out.stdout.strip()

    def scalar(self, sql: str) -> int:
        return int(self.run(sql) or 0)


@dataclass
class Server:
    """A service binary running as a child process."""

    binary: str
    service: str
    db_url: str
    port: int = field(default_factory=free_port)
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> Server:
        env = {
            "PATH": os.environ.get("PATH", ""),
            "DATABASE_URL": self.db_url,
            "IGNY8_JWT_SECRET": SECRET,
            "IGNY8_LISTEN_ADDR": self.addr,
            "IGNY8_METRICS_ADDR": "off",
            "IGNY8_SHUTDOWN_TIMEOUT_SECS": "2",
            "RUST_LOG": "error",
            **self.env,
        }
        self.proc = subprocess.Popen([self.binary], env=env, stdin=subprocess.DEVNULL)
        if wait:
            self.wait_serving()
        return self

    def wait_serving(self, within: float = 20.0) -> None:
        deadline = time.monotonic() + within
        with grpc.insecure_channel(self.addr) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                assert self.proc is not None and self.proc.poll() is None, (
                    f"{self.binary} exited with {self.proc.returncode if self.proc else '?'} during start-up"
                )
                try:
                    r = stub.Check(health_pb2.HealthCheckRequest(service=self.service), timeout=1)
                    if r.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.05)
        raise AssertionError(f"{self.service} at {self.addr} did not report SERVING within {within} s")

    def kill(self) -> None:
        """SIGKILL: no drain, no goodbye."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture(scope="session")
def database() -> Iterator[Psql]:
    """A fresh PostgreSQL database for the session, dropped afterwards."""
    admin = Psql(PG_ADMIN)
    name = f"igny8_pyclient_{secrets.token_hex(8)}"
    admin.run(f"CREATE DATABASE {name}")
    base = PG_ADMIN.rsplit("/", 1)[0]
    try:
        yield Psql(f"{base}/{name}")
    finally:
        admin.run(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(scope="session")
def settings_server(database: Psql) -> Iterator[Server]:
    server = Server(_required_env("IGNY8_SETTINGS_BIN"), "igny8.settings.v1.SettingsService", database.url)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def billing_server(database: Psql, settings_server: Server) -> Iterator[Server]:
    # With IGNY8_SETTINGS_URL billing checks modules through settings-svc
    # (docs/api.md, "Module-aware charging"); a billing without module checks ignores it.
    server = Server(
        _required_env("IGNY8_BILLING_BIN"),
        "igny8.billing.v1.BillingService",
        database.url,
        env={"IGNY8_SETTINGS_URL": f"http://{settings_server.addr}"},
    )
    server.start()
    yield server
    server.stop()


_ids = itertools.count(100)


@dataclass
class Account:
    """A seeded account with helpers for users and assertions."""

    db: Psql
    id: int

    def user(self, role: str = "owner", active: bool = True) -> int:
        user_id = next(_ids) * 10
        self.db.run(
            f"INSERT INTO users (id, account_id, role, is_active, email) "
            f"VALUES ({user_id}, {self.id}, '{role}', {str(active).lower()}, 'u{user_id}@example.test')"
        )
        return user_id

    def token(self, role: str = "owner") -> str:
        """An access token of a new user with ``role`` in this account."""
        return access_token(self.user(role), self.id)

    def balance(self) -> int:
        return self.db.scalar(f"SELECT credits FROM accounts WHERE id = {self.id}")

    def ledger(self) -> tuple[int, int]:
        """(sum of credits, number of rows) of the ledger."""
        out = self.db.run(f"SELECT COALESCE(SUM(credits), 0), COUNT(*) FROM credit_ledger WHERE account_id = {self.id}")
        total, count = out.split("|")
        return int(total), int(count)

    def suspend(self) -> None:
        self.db.run(f"UPDATE accounts SET status = 'suspended' WHERE id = {self.id}")


class Accounts:
    def __init__(self, db: Psql) -> None:
        self.db = db

    def new(self, credits: int = 0) -> Account:
        account_id = next(_ids)
        self.db.run(
            f"INSERT INTO accounts (id, name, status, credits) VALUES ({account_id}, 'account {account_id}', 'active', {credits})"
        )
        return Account(self.db, account_id)


@pytest.fixture()
def accounts(database: Psql, billing_server: Server, settings_server: Server) -> Accounts:
    """Makes accounts in the session database (after the servers migrated it)."""
    return Accounts(database)


@pytest.fixture()
def billing_addr(billing_server: Server) -> str:
    return billing_server.addr


@pytest.fixture()
def settings_addr(settings_server: Server) -> str:
    return settings_server.addr
