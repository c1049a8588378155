"""Shared fixtures.

Servers: real processes on 127.0.0.1 started through ``infra.stack`` (the same code as
``autoqra stack up``), once per test session, stopped at its end. Each fixture starts
only what it needs; they share one stack folder, so ``mlflow_server`` stores its
artifacts in the S3 server of ``s3_server``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from infra import stack as local_stack


@pytest.fixture(scope="session")
def stack_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Folder of the session's local stack; every server started in it is stopped at the end."""
    home = tmp_path_factory.mktemp("stack-home")
    try:
        yield home
    finally:
        local_stack.down(home)


@pytest.fixture(scope="session")
def s3_server(stack_home: Path) -> local_stack.Stack:
    """``rclone serve s3`` on 127.0.0.1 (~1 s); ``.env()`` gives AWS_ENDPOINT_URL and credentials."""
    return local_stack.up(stack_home, services=("s3",), timeout=60)


@pytest.fixture(scope="session")
def mlflow_server(s3_server: local_stack.Stack, stack_home: Path) -> local_stack.Stack:
    """MLflow server (SQLite backend, artifacts in the S3 server) on 127.0.0.1 (~20-30 s on 2 cores)."""
    return local_stack.up(stack_home, services=("s3", "mlflow"), timeout=150)


@pytest.fixture(scope="session")
def prefect_server(stack_home: Path) -> local_stack.Stack:
    """Prefect server on 127.0.0.1 with its own PREFECT_HOME (~15-25 s on 2 cores)."""
    return local_stack.up(stack_home, services=("prefect",), timeout=150)
