"""The package itself: stubs match proto/, types pass mypy --strict, and it
installs into a fresh virtual environment with the README's one command."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

from .conftest import REPO

PACKAGE = REPO / "clients" / "python"


def run(cmd: list[str], cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def test_committed_stubs_match_the_protos() -> None:
    out = run([sys.executable, str(PACKAGE / "tools" / "generate_stubs.py"), "--check"])
    assert out.returncode == 0, f"{out.stdout}\n{out.stderr}"


def test_the_package_passes_mypy_strict() -> None:
    # pyproject.toml's [tool.mypy] says strict = true and names the package.
    out = run([sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--config-file", "pyproject.toml"], cwd=PACKAGE)
    assert out.returncode == 0, f"mypy --strict failed:\n{out.stdout}\n{out.stderr}"
    assert "Success: no issues found" in out.stdout


def test_the_readme_install_command_works_in_a_fresh_venv(tmp_path: Path, billing_addr: str) -> None:
    readme = (PACKAGE / "README.md").read_text()
    command = "pip install ./clients/python"
    assert command in readme, "the README gives the one install command"
    # A copy of the repository's package directory, so the build leaves
    # nothing behind in the checkout.
    checkout = tmp_path / "repo"
    shutil.copytree(PACKAGE, checkout / "clients" / "python", ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info", ".mypy_cache"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True, clear=True)
    bin_dir = env_dir / "bin"
    python = bin_dir / "python"
    out = run([str(python), "-m", *command.split()[:-1], "--quiet", "--disable-pip-version-check", command.split()[-1]], cwd=checkout)
    assert out.returncode == 0, f"{command} failed:\n{out.stdout}\n{out.stderr}"
    probe = (
        "import sys, igny8_client, igny8_client.aio, igny8_client.compat\n"
        "from pathlib import Path\n"
        "root = Path(igny8_client.__file__).parent\n"
        "assert 'site-packages' in str(root), root\n"
        "assert (root / 'py.typed').is_file() and list(root.rglob('billing_pb2.pyi')), 'type information installed'\n"
        f"c = igny8_client.Igny8Credits({billing_addr!r}, token='x')\n"
        "print(c.get_credit_cost.__doc__ is not None)\n"
        "try:\n"
        "    c.balance()\n"
        "except igny8_client.Unauthenticated as e:\n"
        "    print('unauthenticated', e.reason)\n"
    )
    out = run([str(python), "-c", probe], cwd=tmp_path)
    assert out.returncode == 0, f"the installed package does not work:\n{out.stdout}\n{out.stderr}"
    assert "unauthenticated INVALID_TOKEN" in out.stdout, out.stdout
    deps = run([str(python), "-m", "pip", "list", "--format=freeze", "--disable-pip-version-check"])
    names = {line.split("==")[0].lower() for line in deps.stdout.split()}
    assert {"grpcio", "protobuf", "grpcio-status"} <= names
