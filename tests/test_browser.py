"""The UIs as a person sees them: headless Chromium on the Prefect UI (the search's flow run) and the
MLflow UI (the search's runs, the registered model and its alias), after a search on the local stack.

Screenshots are kept in ``test-artifacts/screenshots/``. Needs Debian's chromium (``.ci/run`` installs it);
skipped where it is missing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import ROOT

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = ROOT / "test-artifacts" / "screenshots"
# Closed network here: no background fetches to Google's hosts (they are refused and slow the start).
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed"),
]


@pytest.fixture(scope="module")
def page():
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        pg = browser.new_page(viewport={"width": 1600, "height": 1000})
        pg.set_default_timeout(60_000)
        yield pg
        browser.close()


def _see(page, text: str, shot: str) -> None:
    """Wait until ``text`` is visible; on a timeout keep a screenshot and say what the page showed."""
    try:
        page.get_by_text(text).first.wait_for()
    except Exception:  # noqa: BLE001 - re-raised with the page's content
        page.screenshot(path=SHOTS / f"FAILED-{shot}", full_page=True)
        raise AssertionError(f"{text!r} not shown at {page.url}; page says: {page.inner_text('body')[:2000]!r}")


def _flow_run(env: dict) -> dict:
    code = """
import json
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as c:
    flows = {f.id: f.name for f in c.read_flows()}
    run = next(r for r in c.read_flow_runs() if flows[r.flow_id] == "autoqra-search")
    print(json.dumps({"id": str(run.id), "name": run.name}))"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_prefect_ui_shows_the_search_flow_run(served_search, page):
    api = served_search.env["PREFECT_API_URL"]
    run = _flow_run(served_search.env)
    page.goto(api.removesuffix("/api") + f"/runs/flow-run/{run['id']}")
    _see(page, run["name"], "prefect-flow-run.png")
    _see(page, "Completed", "prefect-flow-run.png")
    page.wait_for_timeout(1500)  # let the graph and logs render for the picture
    page.screenshot(path=SHOTS / "prefect-flow-run.png", full_page=True)
    text = page.inner_text("body")
    assert run["name"] in text and "autoqra-search" in text and "Completed" in text
    # The method's steps, as task runs a person can read (the graph above is a canvas: no text to assert on).
    # A search has dozens of task runs (one training segment and one scoring per evaluation), listed newest first
    # a page at a time, so each step is looked up with the list's own search box, as a person would.
    page.get_by_text("Task Runs", exact=True).first.click()
    box = page.get_by_placeholder("Search by run name").first
    for step in ("generation 0", "generation 1", "turbo 1", "report"):
        box.fill(step)
        _see(page, step + " (", "prefect-task-runs.png")
    box.fill("")
    page.wait_for_timeout(1000)
    page.screenshot(path=SHOTS / "prefect-task-runs.png", full_page=True)


def test_mlflow_ui_shows_runs_and_champion(served_search, page):
    from infra import tracking

    uri = served_search.env["MLFLOW_TRACKING_URI"]
    res = served_search.result
    parent = tracking.client(uri).get_run(res["mlflow_run_id"])
    page.goto(f"{uri}/#/experiments/{parent.info.experiment_id}/runs")
    _see(page, parent.info.run_name, "mlflow-experiment.png")
    page.wait_for_timeout(1500)
    page.screenshot(path=SHOTS / "mlflow-experiment.png", full_page=True)
    text = page.inner_text("body")
    assert parent.info.run_name in text
    assert f"{len(res['evaluations']) + 1} matching runs" in text  # the search and one child per evaluation

    page.goto(f"{uri}/#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}")
    _see(page, "best_eval_loss", "mlflow-search-run.png")
    page.screenshot(path=SHOTS / "mlflow-search-run.png", full_page=True)

    name = json.loads((served_search.out / "export.json").read_text())["registered_model"]
    page.goto(f"{uri}/#/models/{name}")
    _see(page, "champion", "mlflow-registered-model.png")
    page.wait_for_timeout(1000)
    page.screenshot(path=SHOTS / "mlflow-registered-model.png", full_page=True)
    text = page.inner_text("body")
    assert name in text and "champion" in text and "Version 1" in text
