"""Orchestration as a user meets it, through the ``autoqra`` command in subprocesses:

* a search against real servers on 127.0.0.1 (S3, MLflow, Prefect) leaves its exported files in
  the S3 server (byte-identical), its runs and champion in MLflow, its flow and task runs in Prefect;

* a search killed with SIGKILL mid-way and started again finishes like an uninterrupted run,
  re-runs none of the finished evaluations (counted by a completion hook, i.e. after persistence) and
  finishes the same MLflow parent run;
* a search on an existing Dask cluster (by address) gives the same result, its evaluations run on both
  workers; the local Dask runner's own worker processes both get task runs;
* the deployments of prefect.yaml run on a process worker against a real Prefect server.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prefect import task as task_decorator

from tasks.evaluate import COUNTER_ENV

from .helpers import AUTOQRA, ROOT, SERVER_ENV, TINY_SEARCH, cli_env

SEED = 5


def search_cmd(out: Path, config: Path) -> list[str]:
    return [*AUTOQRA, "search", "--config", str(config), "--out", str(out), "--seed", str(SEED), "--no-export"]


def counted(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def best(out: Path) -> dict:
    """The winner of a search, its losses rounded: torch's float32 sums differ in the 7th digit between a
    2-thread process and a 1-thread Dask worker, so the same search on another runner agrees to about 1e-7."""
    b = json.loads((out / "result.json").read_text())["best"]
    test = b.get("test") or {}
    return {"config": b["config"], "replicates": b.get("replicates", 1), "memory_bytes": b["memory_bytes"],
            **{k: round(b[k], 5) for k in ("eval_loss", "accuracy") if b.get(k) is not None},
            **{f"test {k}": round(v, 5) for k, v in test.items() if isinstance(v, float)}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(TINY_SEARCH)
    return path


@pytest.fixture(scope="module")
def reference(served_search) -> tuple[Path, list[str]]:
    """An uninterrupted search (the same seed and settings): its output folder and the evaluations it ran."""
    return served_search.out, served_search.evaluations_run


def _kill_mid_search(out: Path, config: Path, env: dict, log: Path) -> list[str]:
    """Start ``autoqra search`` and SIGKILL its process group (CLI, ephemeral Prefect server) a few evaluations
    into its second step; the evaluations it had finished (the counter file's lines)."""
    counter = Path(env[COUNTER_ENV])
    with open(log, "w") as f:
        proc = subprocess.Popen(search_cmd(out, config), cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline, after_first_step = time.time() + 600, None
    while time.time() < deadline and proc.poll() is None:
        if after_first_step is None and (out / "search-state.json").exists():
            after_first_step = len(counted(counter))
        if after_first_step is not None and len(counted(counter)) >= after_first_step + 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the search finished before it could be killed: make it longer"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return counted(counter)


@pytest.mark.slow
def test_killed_search_resumes_without_rerunning_finished_evaluations(tmp_path, tiny, reference):
    """SIGKILL mid-search, then the same command. The second run re-runs none of the finished evaluations
    (together they ran exactly the uninterrupted search's) and ends with its answer. MLflow holds one parent run
    (found again by its tags, not a local file), back from RUNNING to FINISHED with a note, and every evaluation
    logged exactly once as a child."""
    from mlflow import MlflowClient

    from infra import tracking

    ref_out, ref_count = reference
    out = tmp_path / "out"
    first = _kill_mid_search(out, tiny, cli_env(tmp_path, **{COUNTER_ENV: str(tmp_path / "first.txt")}),
                             tmp_path / "first.log")
    assert first and not (out / "result.json").exists()
    (out / "search-state.json").unlink()  # a snapshot for people: resume replays the steps from Prefect's cache
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow = MlflowClient(uri)
    exp = mlflow.get_experiment_by_name("autoqra").experiment_id

    def parents():
        runs = mlflow.search_runs([exp], filter_string=f"tags.out = '{out.resolve()}'")
        return [r for r in runs if tracking.PARENT_TAG not in r.data.tags]

    (crashed,) = parents()
    assert crashed.info.status == "RUNNING"
    logged_before = len(tracking.child_runs(crashed.info.run_id, uri))

    env2 = cli_env(tmp_path, **{COUNTER_ENV: str(tmp_path / "second.txt")})
    r = subprocess.run(search_cmd(out, tiny), cwd=ROOT, env=env2, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    second = counted(tmp_path / "second.txt")
    assert second and not set(first) & set(second), "a finished evaluation was run again"
    assert sorted(first + second) == sorted(ref_count)  # together: exactly the uninterrupted run's evaluations
    assert best(out) == best(ref_out)

    result = json.loads((out / "result.json").read_text())
    (parent,) = parents()
    assert parent.info.run_id == crashed.info.run_id == result["mlflow_run_id"]
    assert parent.info.status == "FINISHED" and parent.data.tags["autoqra.note"] == "killed while running; resumed"
    children = tracking.child_runs(parent.info.run_id, uri)
    ids = [c.data.tags[tracking.EVAL_TAG] for c in children]
    assert logged_before > 0 and len(ids) == len(set(ids)) == len(result["evaluations"])
    assert all(c.info.status in ("FINISHED", "FAILED") for c in children)


@pytest.mark.slow
def test_dask_runner_maps_tasks_onto_its_own_local_workers(tmp_path):
    """`execution: {task_runner: dask, workers: 2}` starts a local cluster of two worker processes, and mapped
    task runs reach both. (A whole search through a Dask cluster, and its answer: the existing-cluster test.)"""
    cfg = tmp_path / "local.yaml"
    cfg.write_text("execution: {task_runner: dask, workers: 2}\n")
    env = cli_env(tmp_path, PYTHONPATH=str(ROOT), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="300")
    r = subprocess.run([sys.executable, "-c", f"from tests.test_orchestration import fan_out; "
                        f"print(len(set(fan_out({str(cfg)!r}))))"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "2"


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
    assert got["result"]["status"] == "ok" and got["result"]["rung"] == 0
    assert 0 < got["result"]["eval_loss"] < 20


@pytest.mark.slow
def test_search_against_real_servers(served_search, tmp_path):
    from infra import tracking
    from infra.settings import Settings
    from infra.storage import open_store

    res, env = served_search.result, served_search.env
    ex = json.loads((served_search.out / "export.json").read_text())
    local = served_search.out / "export" / ex["registered_model"]
    files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json", "model/qmodel.pt",
            "model/config.json", "README.md"} <= set(files)
    assert ex["config"] == res["best"]["config"] and ex["files"]["loss"] == pytest.approx(ex["in_memory"]["loss"],
                                                                                         abs=1e-4)

    # S3: the exported folder went through boto3 to the server and comes back byte-identical.
    assert ex["store_url"].startswith("s3://")
    store = open_store(ex["store_url"].rsplit("/", 1)[0], settings=Settings.load(environ=env))
    prefix = ex["store_url"].rsplit("/", 1)[1]
    got = store.get_dir(prefix, tmp_path / "s3")
    assert sorted(p.relative_to(tmp_path / "s3").as_posix() for p in got) == files
    for f in files:
        assert (tmp_path / "s3" / f).read_bytes() == (local / f).read_bytes()

    # MLflow server: the parent run, one child per evaluation, the registered version behind "champion".
    uri = env["MLFLOW_TRACKING_URI"]
    assert uri.startswith("http://127.0.0.1:")
    children = tracking.child_runs(res["mlflow_run_id"], uri)
    assert len(children) == len(res["evaluations"])
    assert {c.data.params["rung"] for c in children} == {"0", "1"}
    assert all("bits" in c.data.params and "eval_loss" in c.data.metrics for c in children if c.info.status == "FINISHED")
    version = tracking.resolve_alias(ex["registered_model"], "champion", uri)
    assert version.run_id == res["mlflow_run_id"] and str(version.version) == ex["version"]
    dl = tracking.download_model(ex["registered_model"], tmp_path / "registry", uri=uri)
    adapter = f"artifacts/{local.name}/adapter/adapter_model.safetensors"  # the pyfunc model's copy of the export
    assert (dl / adapter).read_bytes() == (local / "adapter/adapter_model.safetensors").read_bytes()

    # Prefect server: the search's flow run, its export subflow, a task run per evaluation.
    got = json.loads(_prefect(env, """
import json
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
with get_client(sync_client=True) as c:
    runs = c.read_flow_runs()
    flows = {f.id: f.name for f in c.read_flows()}
    search = [r for r in runs if flows[r.flow_id] == "autoqra-search"]
    tasks = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[search[0].id])))
    print(json.dumps({"flows": sorted(flows[r.flow_id] + ":" + r.state.type.value for r in runs),
                      "evals": sorted(t.name for t in tasks if t.name.startswith("eval "))}))"""))
    assert "autoqra-search:COMPLETED" in got["flows"] and "autoqra-export:COMPLETED" in got["flows"]
    assert got["evals"] == sorted(served_search.evaluations_run)


@pytest.mark.slow
def test_flow_run_graph_shows_the_method_steps(served_search):
    """Read through the Prefect API: the search's task runs are the method's steps in order (priors, generation
    0..G-1, turbo 1..T, report, then the export subflow), and every evaluation is a nested task run of
    the step that made it: new children at rung 0 and promotions in generations, the top rung in TuRBO, the
    test split only in the report."""
    got = json.loads(_prefect(served_search.env, """
import json
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
with get_client(sync_client=True) as c:
    flows = {f.id: f.name for f in c.read_flows()}
    runs = c.read_flow_runs()
    search = next(r for r in runs if flows[r.flow_id] == "autoqra-search")
    export = next(r for r in runs if flows[r.flow_id] == "autoqra-export")
    tasks = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[search.id])))
    tasks.sort(key=lambda t: t.start_time or t.expected_start_time)
    parent = {str(t.id): [str(p.id) for p in t.task_inputs.get("__parents__", [])] for t in tasks}
    print(json.dumps({"tasks": [{"id": str(t.id), "name": t.name, "parents": parent[str(t.id)],
                                 "state": t.state.type.value, "start": t.start_time.isoformat()} for t in tasks],
                      "export_parent": str(export.parent_task_run_id), "export_start": export.start_time.isoformat()}))"""))
    tasks = got["tasks"]
    steps = [t for t in tasks if not t["name"].startswith(("eval ", "train to step ", "autoqra-export"))]
    names = [t["name"].split(" (")[0] for t in steps]
    assert names == ["priors", "generation 0", "generation 1", "turbo 1", "report"], names  # no --baselines
    assert all(t["state"] == "COMPLETED" for t in steps)
    # a population of 4: the references start at the top rung, the rest at rung 0
    gen0 = re.fullmatch(r"generation 0 \((\d+) children, \d+ promoted, ([1-9]\d*) references, \d+ replicates\)",
                        steps[1]["name"])
    assert gen0 and int(gen0[1]) + int(gen0[2]) == 4, steps[1]["name"]
    assert re.fullmatch(r"generation 1 \(3 children, \d+ promoted, \d+ replicates\)", steps[2]["name"]), steps[2]["name"]
    assert re.fullmatch(r"turbo 1 \(2 evaluated, \d+ replicates\)", steps[3]["name"]), steps[3]["name"]
    by_id = {t["id"]: t for t in tasks}
    evals = [t for t in tasks if t["name"].startswith("eval ")]
    made_by = {}
    for e in evals:
        (parent,) = e["parents"]  # exactly one step made it
        made_by.setdefault(by_id[parent]["name"].split(" (")[0], []).append(e["name"])
    assert set(made_by) == {"generation 0", "generation 1", "turbo 1", "report"}
    assert sum(n.startswith("eval r0 ") for n in made_by["generation 0"]) == int(gen0[1])  # the references: not at r0
    assert "r0" in {n.split()[1] for n in made_by["generation 1"]} <= {"r0", "r1"}  # its children, any promoted
    assert made_by["turbo 1"] and all(n.startswith("eval r1 ") and " test " not in n for n in made_by["turbo 1"])
    assert made_by["report"] and all(n.startswith("eval r1 test seed ") for n in made_by["report"])
    assert not any(" test " in n for step, ns in made_by.items() if step != "report" for n in ns)
    assert got["export_start"] > steps[-1]["start"]  # the export subflow comes after the report
    # Each run's training is a nested task run of the evaluation (or the later checkpoint) that asked for it.
    trains = [t for t in tasks if t["name"].startswith("train to step ")]
    assert trains and all(by_id[p]["name"].startswith(("eval ", "train to step ")) for t in trains for p in t["parents"])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_existing_dask_cluster_by_address_gives_the_same_result(tmp_path, tiny, reference, served_search):
    """`execution: {task_runner: dask, address: tcp://...}`: a real `dask scheduler` and two `dask worker`
    processes on 127.0.0.1 (one per GPU on a GPU box), started and stopped here, run the evaluations."""
    ref_out, ref_count = reference
    port = _free_port()
    dask = str(Path(sys.executable).parent / "dask")
    servers = {k: v for k, v in served_search.env.items() if k in SERVER_ENV}  # workers report to the same Prefect
    env = cli_env(tmp_path, **servers, PYTHONPATH=str(ROOT),
                  PREFECT_RESULTS_LOCAL_STORAGE_PATH=str(tmp_path / "results"),
                  **{COUNTER_ENV: str(tmp_path / "count.txt")})  # the search's process; each worker has a file of its own
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        time.sleep(3)
        for i in range(2):  # on a GPU box: CUDA_VISIBLE_DEVICES=i for worker i
            procs.append(subprocess.Popen([dask, "worker", f"tcp://127.0.0.1:{port}", "--nworkers", "1",
                                           "--nthreads", "1", "--no-dashboard", "--name", f"gpu{i}"],
                                          cwd=ROOT, env={**env, "CUDA_VISIBLE_DEVICES": str(i),
                                                         COUNTER_ENV: str(tmp_path / f"count-gpu{i}.txt")},
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        cfg = tmp_path / "cluster.yaml"
        cfg.write_text(tiny.read_text() + f"execution: {{task_runner: dask, address: 'tcp://127.0.0.1:{port}'}}\n")
        r = subprocess.run(search_cmd(tmp_path / "out", cfg), cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=900)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert best(tmp_path / "out") == best(ref_out)
        ran = [counted(tmp_path / f"count-gpu{i}.txt") for i in range(2)]
        assert all(ran), ran  # both workers ran evaluations, and the search's own process none
        assert sorted(ran[0] + ran[1]) == sorted(ref_count) and not counted(tmp_path / "count.txt")
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


@task_decorator()
def _worker_name(i: int) -> str:
    from distributed import get_worker

    return get_worker().name


def fan_out(config_file: str) -> list[str]:
    """Eight mapped task runs through the runner ``autoqra`` builds from ``config_file``; the Dask workers' names."""
    from prefect import flow

    from flows.cli import _with_runner

    @flow
    def fan() -> list[str]:
        return [f.result() for f in _worker_name.map(list(range(8)))]

    return _with_runner(fan, config_file)()
