"""Orchestration as a user meets it, through the ``autoqra`` command in subprocesses:

* a search killed with SIGKILL mid-way and started again finishes like an uninterrupted run and
  re-runs none of the finished evaluations (counted by a completion hook, i.e. after persistence);
* the Dask task runner (a local cluster of 2 worker processes) gives the same result;
* the deployments of prefect.yaml run on a process worker against a real Prefect server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.evaluate import COUNTER_ENV

from .helpers import AUTOQRA, ROOT, TINY_SEARCH, cli_env

SEED = 5


def search_cmd(out: Path, config: Path) -> list[str]:
    return [*AUTOQRA, "search", "--config", str(config), "--out", str(out), "--seed", str(SEED), "--no-export"]


def counted(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def best(out: Path) -> dict:
    return json.loads((out / "result.json").read_text())["best"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(TINY_SEARCH)
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny) -> tuple[Path, list[str]]:
    """An uninterrupted search: its output folder and the evaluations it ran."""
    home = tmp_path_factory.mktemp("ref-home")
    counter = home / "count.txt"
    subprocess.run(search_cmd(home / "out", tiny), cwd=ROOT, env=cli_env(home, **{COUNTER_ENV: str(counter)}),
                   check=True, capture_output=True, timeout=900)
    return home / "out", counted(counter)


@pytest.mark.slow
def test_killed_search_resumes_without_rerunning_finished_evaluations(tmp_path, tiny, reference):
    ref_out, ref_count = reference
    env1 = cli_env(tmp_path, **{COUNTER_ENV: str(tmp_path / "first.txt")})
    out = tmp_path / "out"
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(search_cmd(out, tiny), cwd=ROOT, env=env1, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.time() + 600
    # Kill in the second generation: after the first checkpoint, with a few evaluations finished past it.
    while time.time() < deadline and proc.poll() is None:
        if (out / "checkpoint.json").exists() and len(counted(tmp_path / "first.txt")) >= 6:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the search finished before it could be killed: make it longer"
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: CLI, ephemeral Prefect server
    proc.wait()
    first = counted(tmp_path / "first.txt")
    assert not (out / "result.json").exists()

    env2 = cli_env(tmp_path, **{COUNTER_ENV: str(tmp_path / "second.txt")})
    r = subprocess.run(search_cmd(out, tiny), cwd=ROOT, env=env2, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    second = counted(tmp_path / "second.txt")

    assert first and second
    assert not set(first) & set(second), "a finished evaluation was run again"
    assert sorted(first + second) == sorted(ref_count)  # together: exactly the uninterrupted run's evaluations
    assert best(out) == best(ref_out)


@pytest.mark.slow
def test_dask_runner_gives_the_same_result(tmp_path, tiny, reference):
    ref_out, ref_count = reference
    cfg = tmp_path / "dask.yaml"
    cfg.write_text(tiny.read_text() + "execution: {task_runner: dask, workers: 2}\n")
    counter = tmp_path / "count.txt"
    r = subprocess.run(search_cmd(tmp_path / "out", cfg), cwd=ROOT, env=cli_env(tmp_path, **{COUNTER_ENV: str(counter)}),
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert best(tmp_path / "out") == best(ref_out)
    assert sorted(counted(counter)) == sorted(ref_count)
    assert "PrefectDaskClient" in r.stdout + r.stderr  # the evaluations really went through the Dask cluster


def _prefect(env: dict, code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_deployments_run_on_a_process_worker(prefect_server, tmp_path):
    env = cli_env(tmp_path, PREFECT_API_URL=prefect_server.env()["PREFECT_API_URL"])
    run = lambda *a: subprocess.run(a, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)  # noqa: E731
    prefect = str(Path(sys.executable).with_name("prefect"))
    r = run(prefect, "work-pool", "create", "autoqra", "--type", "process", "--overwrite")
    assert r.returncode == 0, r.stdout + r.stderr
    r = run(prefect, "--no-prompt", "deploy", "--all")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for name in ("autoqra-search/search", "autoqra-baselines/baselines", "autoqra-evaluate/evaluate",
                 "autoqra-export/export"):
        assert name.split("/")[1] in r.stdout

    layers = [{"name": f"model.layers.{i}", "bits": (2, 4)[i % 2], "rank": (16, 4)[i % 2]} for i in range(6)]
    flow_run_id = _prefect(env, f"""
from prefect.deployments import run_deployment
fr = run_deployment("autoqra-evaluate/evaluate", parameters={{"config": {{"layers": {layers!r}}}, "fidelity": 0}},
                    timeout=0)
print(fr.id)""")
    r = run(prefect, "worker", "start", "--pool", "autoqra", "--run-once")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    state = _prefect(env, f"""
import json
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as c:
    fr = c.read_flow_run("{flow_run_id}")
    print(json.dumps({{"state": fr.state.type.value, "result": fr.state.result(raise_on_failure=False)}}))""")
    got = json.loads(state)
    assert got["state"] == "COMPLETED", got
    assert got["result"]["status"] == "ok" and got["result"]["fidelity"] == 0
    assert 0 < got["result"]["eval_loss"] < 20
