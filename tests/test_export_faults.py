"""The S3 server (rclone) SIGKILLed during ``autoqra export``: a clear error and exit 1, the written export kept on
disk, and the same command publishes it once the server is back (without writing it again)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import yaml

from infra import stack as local_stack

from .helpers import AUTOQRA, ROOT, TINY_SEARCH, cli_env


def _finished_search(out):
    """The result.json a finished tiny search leaves (what ``export`` reads): its settings, model and best config."""
    from flows.config import RunConfig

    settings = RunConfig.model_validate(yaml.safe_load(TINY_SEARCH)).model_dump(mode="json")
    config = {"layers": [{"name": f"model.layers.{i}", "bits": 4 if i % 2 else 3, "rank": 8} for i in range(6)]}
    out.mkdir(parents=True)
    (out / "result.json").write_text(json.dumps({
        "model": "embedded", "dataset": "embedded", "budget_bytes": 10**9, "seed": 0, "settings": settings,
        "best": {"config": config, "memory_bytes": 1, "eval_loss": 1.0, "accuracy": None, "rung": 1},
        "mlflow_run_id": None}))


@pytest.mark.slow
def test_s3_server_killed_during_export_then_export_again(tmp_path):
    stack_home = tmp_path / "stack"
    s3 = local_stack.up(stack_home, services=("s3",), timeout=60)
    port = s3.services["s3"].port
    env = cli_env(tmp_path / "home", **{**s3.env(), "AUTOQRA_STORE": "s3://exports/runs"})
    run = tmp_path / "run"
    _finished_search(run)
    try:
        with open(tmp_path / "export.log", "w") as log:
            proc = subprocess.Popen([*AUTOQRA, "export", "--run", str(run)], cwd=ROOT, env=env, stdout=log,
                                    stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while time.time() < deadline and "its run on seed" not in (tmp_path / "export.log").read_text():
            assert proc.poll() is None, (tmp_path / "export.log").read_text()[-3000:]
            time.sleep(0.2)
        os.killpg(s3.services["s3"].pid, signal.SIGKILL)  # after the checks passed, before the upload
        killed_at = time.monotonic()
        assert proc.wait(timeout=300) == 1
        waited = time.monotonic() - killed_at
        text = (tmp_path / "export.log").read_text()
        assert f"export failed: Cannot reach S3 endpoint for s3://exports/runs at http://127.0.0.1:{port}" in text
        assert f"autoqra export --run {run}` again once the server answers" in text
        exported = run / "export" / "autoqra-embedded"
        assert (exported / "adapter" / "adapter_model.safetensors").is_file() and not (run / "export.json").exists()
        print(f"export exited {waited:.1f} s after the S3 server was killed (its run's training included)")

        local_stack.up(stack_home, services=("s3",), ports={"s3": port}, timeout=60)
        r = subprocess.run([*AUTOQRA, "export", "--run", str(run)], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "already holds this export" in r.stdout + r.stderr  # published as kept, not written again
        ex = json.loads((run / "export.json").read_text())
        from infra.settings import Settings
        from infra.storage import open_store

        store = open_store("s3://exports/runs", settings=Settings.load(environ=env))
        assert "adapter_model.safetensors" in " ".join(store.list(ex["store_url"].split("s3://exports/runs/")[1]))
    finally:
        local_stack.down(stack_home)
