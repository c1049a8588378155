"""Shared fixtures.

Servers: real processes on 127.0.0.1 started through ``infra.stack`` (the same code as
``autoqra stack up``), once per test session, stopped at its end. Each fixture starts
only what it needs; they share one stack folder, so ``mlflow_server`` stores its
artifacts in the S3 server of ``s3_server``.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from infra import stack as local_stack

# `make test` runs the suite on two pytest-xdist workers (one per core). Each worker is one torch thread
# (so are the `autoqra` subprocesses it starts: OMP_NUM_THREADS is inherited), and gets its own default
# AutoQRA and Prefect homes, so tests that do not name a home never share a SQLite file across workers.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    _worker_home = Path(tempfile.mkdtemp(prefix=f"autoqra-{os.environ['PYTEST_XDIST_WORKER']}-"))
    os.environ.setdefault("AUTOQRA_HOME", str(_worker_home / "autoqra"))
    os.environ.setdefault("PREFECT_HOME", str(_worker_home / "prefect"))


# Modules that use another module's session fixture run on the worker of that module: the browser tests
# look at the search that tests/test_orchestration.py's served_search runs against the servers.
SHARED_WORKER = {"tests/test_browser.py": "tests/test_orchestration.py"}


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """Each module runs whole on one worker (its module-scoped searches are built once), modules in
    collection order as workers free up (the served search's, the longest, first): xdist's ``loadfile``
    with the modules of SHARED_WORKER joined. (``--dist loadgroup`` cannot do it with pytest 9: its group
    suffix no longer reaches the node id.)"""
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False  # not by number of tests: the first module is the longest

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return SHARED_WORKER.get(path, path)

    return ByModule(config, log)


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


@pytest.fixture(scope="session")
def full_stack(stack_home: Path) -> local_stack.Stack:
    """S3, MLflow and Prefect servers together, as ``autoqra stack up`` starts them."""
    return local_stack.up(stack_home, services=("s3", "mlflow", "prefect"), timeout=180)


@dataclass
class ServedSearch:
    out: Path
    result: dict
    evaluations_run: list[str]  # task-run names of the evaluations it actually ran (not cache hits)
    env: dict[str, str]  # the environment it ran in (server URLs, credentials)


@pytest.fixture(scope="session")
def served_search(full_stack: local_stack.Stack, tmp_path_factory: pytest.TempPathFactory) -> ServedSearch:
    """A tiny search (seed 5) with export, run by ``autoqra search`` against all three servers."""
    from tasks.evaluate import COUNTER_ENV

    from .helpers import AUTOQRA, ROOT, TINY_SEARCH, cli_env

    home = tmp_path_factory.mktemp("served-home")
    (home / "tiny.yaml").write_text(TINY_SEARCH)
    env = cli_env(home, **full_stack.env(), **{COUNTER_ENV: str(home / "count.txt")})
    out = home / "out"
    r = subprocess.run([*AUTOQRA, "search", "--config", str(home / "tiny.yaml"), "--out", str(out), "--seed", "5"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    return ServedSearch(out, result, (home / "count.txt").read_text().splitlines(), env)


@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """In-process flows against Prefect's test server, results and MLflow in a temporary home (per module)."""
    home = tmp_path_factory.mktemp("flows-home")
    mp = pytest.MonkeyPatch()
    mp.setenv("AUTOQRA_HOME", str(home))
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
    mp.setenv("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(home / "results"))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield home
    mp.undo()
