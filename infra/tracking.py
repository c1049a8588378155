"""MLflow tracking and registry for searches: one parent run per search, one nested child run per evaluation.

Everything goes through an explicit ``MlflowClient`` and run ids, never the fluent
"active run" global, so Prefect tasks in threads or other processes can log into the
same parent (``mlflow.parentRunId`` is MLflow's own nesting tag). Create the experiment
(and with it a SQLite database) with :func:`ensure_experiment` *before* fanning out:
concurrent first-time creation locks SQLite. MLflow's HTTP client retries for minutes
on a dead server, so :func:`check_tracking` fails within seconds first.
"""

from __future__ import annotations

import json
import math
import os
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from autoqra_core.errors import AutoQRAError

PARENT_TAG = "mlflow.parentRunId"  # MLflow's own nested-run tag (the UI nests on it)
#: Names that never become params or tags, whatever a caller passes.
_SECRET_WORDS = ("secret", "password", "token", "access_key", "credential")


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"


class TrackingError(AutoQRAError):
    """An MLflow tracking URI that cannot be reached or used."""


def tracking_uri(uri: str | None = None) -> str:
    """The URI in use: ``uri``, else ``MLFLOW_TRACKING_URI``, else AutoQRA's SQLite default."""
    if uri:
        return uri
    from infra.settings import Settings

    return Settings.load().mlflow_tracking_uri


def bound_requests() -> None:
    """Bound every MLflow HTTP request by the settings (``AUTOQRA_REQUEST_TIMEOUT`` seconds, ``AUTOQRA_REQUEST_RETRIES``
    retries, short backoff) instead of MLflow's defaults (120 s, 7 retries with exponential backoff: minutes per
    call on a dead server). MLflow reads these variables at each request; ones the user set are kept."""
    from infra.settings import Settings

    s = Settings.load()
    for name, value in (("MLFLOW_HTTP_REQUEST_TIMEOUT", int(max(1, round(s.request_timeout)))),
                        ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", s.request_retries),
                        ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", 1), ("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", 0)):
        os.environ.setdefault(name, str(value))


def client(uri: str | None = None) -> Any:
    """An ``MlflowClient`` for ``uri`` (registry on the same URI), its requests bounded (``bound_requests``)."""
    from mlflow import MlflowClient

    bound_requests()
    uri = tracking_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def check_tracking(uri: str | None = None, timeout: float = 3.0) -> None:
    """Fail fast with a message naming the URI and ``MLFLOW_TRACKING_URI`` if it cannot be used."""
    uri = tracking_uri(uri)
    parsed = urlparse(uri)
    hint = "start the server or set MLFLOW_TRACKING_URI (unset it to use a local SQLite file)"
    if parsed.scheme in ("http", "https"):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - user-chosen URL
                body = resp.read(64).decode(errors="replace").strip()
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingError(f"Cannot reach the MLflow tracking server at {uri} ({reason}); {hint}") from exc
        if body != "OK":
            raise TrackingError(f"{uri} answered /health with {body!r}, not an MLflow server; {hint}")
    elif parsed.scheme == "sqlite":
        path = _sqlite_path(uri)
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise TrackingError(f"Cannot create the folder of {uri} ({exc}); set MLFLOW_TRACKING_URI") from exc
            if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
                raise TrackingError(f"{uri} is not writable; set MLFLOW_TRACKING_URI to a writable location")
    elif parsed.scheme in ("file", ""):
        path = Path(unquote(parsed.path) if parsed.scheme else uri)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingError(f"Cannot use {uri} as an MLflow file store ({exc}); set MLFLOW_TRACKING_URI") from exc


def _sqlite_path(uri: str) -> Path | None:
    """``sqlite:////abs/x.db`` -> ``/abs/x.db``; ``None`` for in-memory databases."""
    rest = uri[len("sqlite:///") :] if uri.startswith("sqlite:///") else ""
    return Path(rest).resolve() if rest and rest != ":memory:" else None


def default_artifact_location(uri: str) -> str | None:
    """Where artifacts go for a local backend (next to the database); ``None`` lets a server decide."""
    if uri.startswith("sqlite:///"):
        path = _sqlite_path(uri)
        return (path.parent / "mlartifacts").as_uri() if path else None
    return None


def ensure_experiment(name: str, artifact_location: str | None = None, uri: str | None = None) -> str:
    """Create the experiment (and the database) if missing; return its id. Call before any fan-out.

    For SQLite backends the artifact location is set explicitly (default: ``mlartifacts/``
    next to the database) so it does not depend on the current directory.
    """
    from mlflow.exceptions import MlflowException

    uri = tracking_uri(uri)
    check_tracking(uri)
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        # The UI opens a "model training" experiment on its runs, not on the GenAI trace overview.
        return c.create_experiment(name, artifact_location=artifact_location or default_artifact_location(uri),
                                   tags={EXPERIMENT_KIND_TAG: "custom_model_development"})
    except MlflowException as exc:  # created concurrently by another process
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise TrackingError(f"Cannot create MLflow experiment {name!r} at {uri}: {exc}") from exc
        return exp.experiment_id


def start_search_run(
    experiment_id: str,
    run_name: str,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
    uri: str | None = None,
) -> str:
    """Open the parent run of one search (model, dataset, budget, seed as params); return its id."""
    c = client(uri)
    run = c.create_run(experiment_id, run_name=run_name, tags=_strs(_safe(tags or {})))
    _log_batch(c, run.info.run_id, params=params or {})
    return run.info.run_id


def find_or_start_run(experiment_id: str, run_name: str, key: str, tags: Mapping[str, Any] | None = None,
                      uri: str | None = None) -> str:
    """The run tagged ``autoqra.key=key`` in the experiment, else a new one with that tag: a publish
    redone for the same thing logs into the same run (and so registers no duplicate version)."""
    c = client(uri)
    found = c.search_runs([experiment_id], filter_string=f"tags.`autoqra.key` = '{key}'", max_results=1)
    if found:
        return found[0].info.run_id
    return start_search_run(experiment_id, run_name, tags={**(tags or {}), "autoqra.key": key}, uri=uri)


RESUME_TAG = "autoqra.resume_key"  # hash of what makes two runs the same search (params + output folder)
EVAL_TAG = "autoqra.eval_id"  # stage/rung/seed/config key of a child run: what a resumed search has already logged


def resume_search_run(experiment_id: str, resume_key: str, out: str, uri: str | None = None) -> str | None:
    """The parent run of the same search (same ``resume_key``), reopened as RUNNING, or None.

    Runs of the same output folder left RUNNING by a crash are marked KILLED: superseded (another search) or
    continued (the newest of this one, which goes back to RUNNING). Found by tags, not by any local file."""
    c = client(uri)
    runs = c.search_runs([experiment_id], filter_string=f"tags.out = '{out}'", order_by=["attributes.start_time DESC"],
                         max_results=1000)
    same = [r for r in runs if r.data.tags.get(RESUME_TAG) == resume_key]
    keep = same[0] if same else None
    for r in runs:
        if r.info.status == "RUNNING" and r is not keep:
            c.set_terminated(r.info.run_id, status="KILLED")
            c.set_tag(r.info.run_id, "autoqra.note", "left RUNNING by a crash; superseded by a later search in "
                      "the same folder")
    if keep is None:
        return None
    if keep.info.status == "RUNNING":  # it crashed (or was killed): say so in its history, then continue it
        c.set_tag(keep.info.run_id, "autoqra.note", "killed while running; resumed")
    c.update_run(keep.info.run_id, status="RUNNING")
    c.set_tag(keep.info.run_id, "autoqra.resumes", str(int(keep.data.tags.get("autoqra.resumes", "0")) + 1))
    return keep.info.run_id


def logged_evaluations(parent_run_id: str, uri: str | None = None) -> set[str]:
    """``EVAL_TAG`` of the parent's finished child runs; a child left half-logged (RUNNING) by a crash is
    deleted so that it is logged again in full, once."""
    c = client(uri)
    done = set()
    for r in child_runs(parent_run_id, uri):
        if r.info.status == "RUNNING":
            c.delete_run(r.info.run_id)
        elif EVAL_TAG in r.data.tags:
            done.add(r.data.tags[EVAL_TAG])
    return done


def run_exists(run_id: str | None, uri: str | None = None) -> bool:
    """Whether this tracking server knows ``run_id`` (a run dir may come from another server)."""
    from mlflow.exceptions import MlflowException

    if not run_id:
        return False
    try:
        client(uri).get_run(run_id)
        return True
    except MlflowException:
        return False


def end_run(run_id: str, status: str = "FINISHED", uri: str | None = None) -> None:
    """Close a run: ``FINISHED``, ``FAILED`` or ``KILLED``."""
    client(uri).set_terminated(run_id, status=status)


def compact_config(config: Mapping[str, Any]) -> dict[str, str]:
    """``{"layers": [{"name","bits","rank"}, ...]}`` -> ``{"bits": "4,4,2,8", "ranks": "16,16,64,0", ...}``.

    One short param per quantity keeps runs comparable in the UI without 2 params per layer.
    """
    layers = list(config.get("layers", []))
    bits = [int(layer["bits"]) for layer in layers]
    ranks = [int(layer["rank"]) for layer in layers]
    out = {"bits": ",".join(map(str, bits)), "ranks": ",".join(map(str, ranks)), "n_layers": str(len(layers))}
    if layers:
        out["mean_bits"] = f"{sum(bits) / len(bits):.3f}"
        out["mean_rank"] = f"{sum(ranks) / len(ranks):.2f}"
    return out


def log_evaluation(
    parent_run_id: str,
    evaluation: Mapping[str, Any],
    run_name: str | None = None,
    uri: str | None = None,
    log_config: bool = True,
) -> str:
    """Log one candidate evaluation as a child run of ``parent_run_id``; return the child's id.

    ``evaluation`` is an entry of ``result.json["evaluations"]``: ``config``, ``rung``
    (``fidelity`` in results written before the rename), ``eval_loss``, ``accuracy``, ``memory_bytes``, ``seconds``, ``status``
    (``"ok"``/``"failed"``), optionally ``stage``, ``reason``, ``seed``. A failed candidate
    becomes a FAILED run with its reason as a tag.
    """
    c = client(uri)
    parent = c.get_run(parent_run_id)
    rung = evaluation.get("rung", evaluation.get("fidelity"))
    status = str(evaluation.get("status", "ok"))
    tags = {PARENT_TAG: parent_run_id, "autoqra.status": status}
    for key in ("stage", "reason", "config_key", "eval_id"):
        if evaluation.get(key) is not None:
            tags[f"autoqra.{key}"] = str(evaluation[key])[:5000]
    name = run_name or f"eval-{evaluation.get('stage', 'x')}-r{rung}"
    run = c.create_run(parent.info.experiment_id, run_name=name, tags=tags)
    params: dict[str, Any] = dict(compact_config(evaluation.get("config", {})))
    for key in ("seed", "stage"):
        if evaluation.get(key) is not None:
            params[key] = evaluation[key]
    if rung is not None:
        params["rung"] = rung
    metrics = {k: evaluation.get(k) for k in ("eval_loss", "accuracy", "memory_bytes", "seconds")}
    if evaluation.get("memory_bytes") is not None:
        metrics["memory_mib"] = float(evaluation["memory_bytes"]) / 2**20
    _log_batch(c, run.info.run_id, params=params, metrics=metrics)
    if log_config and evaluation.get("config"):
        c.log_dict(run.info.run_id, dict(evaluation["config"]), "config.json")
    c.set_terminated(run.info.run_id, status="FINISHED" if status == "ok" else "FAILED")
    return run.info.run_id


def child_runs(parent_run_id: str, uri: str | None = None) -> list[Any]:
    """The evaluation runs nested under a search run."""
    c = client(uri)
    parent = c.get_run(parent_run_id)
    return list(
        c.search_runs(
            [parent.info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'", max_results=50000
        )
    )


def log_progress(run_id: str, step: int, metrics: Mapping[str, float | int | None], uri: str | None = None) -> None:
    """Per-generation / per-iteration metrics (best loss so far, evaluations, ...) at ``step``."""
    _log_batch(client(uri), run_id, metrics=metrics, step=step)


def log_artifacts(run_id: str, paths: Iterable[str | Path], artifact_path: str | None = None, uri: str | None = None) -> None:
    """Upload files and/or directories (plots, result.json, an adapter folder) to a run."""
    c = client(uri)
    for path in map(Path, paths):
        if path.is_dir():
            c.log_artifacts(run_id, str(path), _join(artifact_path, path.name))
        elif path.is_file():
            c.log_artifact(run_id, str(path), artifact_path)
        else:
            raise TrackingError(f"Cannot log artifact {path}: no such file or directory")


def register_model(
    run_id: str,
    artifact_path: str,
    name: str,
    alias: str | None = "champion",
    tags: Mapping[str, Any] | None = None,
    description: str | None = None,
    uri: str | None = None,
) -> Any:
    """Register the run's artifact directory (a pyfunc model, see :func:`log_pyfunc`) as a version of ``name``.

    Registering the same run's same artifact again updates that version (tags, description, alias)
    instead of adding a duplicate.

    MLflow 3's ``mlflow.register_model("runs:/...")`` wants a *logged model* (fluent API, an
    active run); the folder is registered with ``create_model_version`` on the run's artifact
    URI instead, which keeps the files exactly as saved and loads with
    ``mlflow.pyfunc.load_model("models:/NAME@champion")``. Returns the ``ModelVersion``.
    """
    from mlflow.exceptions import MlflowException

    c = client(uri)
    artifact_path = artifact_path.strip("/")
    if not c.list_artifacts(run_id, artifact_path):
        raise TrackingError(f"Run {run_id} has no artifacts under {artifact_path!r}; log them before registering")
    try:
        c.create_registered_model(name)
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
            raise
    source = c.get_run(run_id).info.artifact_uri.rstrip("/") + "/" + artifact_path
    # The same run's artifact registered again is the same version (its files were re-logged in place).
    same = [v for v in c.search_model_versions(f"name='{name}' and run_id='{run_id}'") if v.source == source]
    if same:
        version = max(same, key=lambda v: int(v.version))
        for k, v in _strs(_safe(tags or {})).items():
            c.set_model_version_tag(name, version.version, k, v)
        if description is not None:
            c.update_model_version(name, version.version, description=description)
    else:
        version = c.create_model_version(
            name, source=source, run_id=run_id, tags=_strs(_safe(tags or {})), description=description
        )
    if alias:
        c.set_registered_model_alias(name, alias, version.version)
    return c.get_model_version(name, version.version)


CHAMPION_CODE = Path(__file__).with_name("champion_model.py")


def log_pyfunc(run_id: str, export_dir: str | Path, artifact_path: str = "champion", uri: str | None = None) -> str:
    """Log ``export_dir`` as an MLflow pyfunc model (``champion_model.py``, export folder as its artifact
    ``export``) under the run's ``artifact_path``; return that path, ready for :func:`register_model`.

    Saved to a local folder and uploaded with the client (no fluent active run), so it works from any
    thread; the requirements are pinned to the installed versions instead of being inferred (inference
    would load the model).
    """
    import tempfile
    from importlib.metadata import version

    import mlflow.pyfunc

    reqs = [f"{p}=={version(p)}" for p in ("mlflow", "torch", "transformers", "peft", "hqq", "compressed-tensors",
                                           "pandas")]
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / artifact_path
        mlflow.pyfunc.save_model(str(local), python_model=str(CHAMPION_CODE),
                                 artifacts={"export": str(export_dir)}, pip_requirements=reqs)
        client(uri).log_artifacts(run_id, str(local), artifact_path)
    return artifact_path


def resolve_alias(name: str, alias: str = "champion", uri: str | None = None) -> Any:
    """The ``ModelVersion`` an alias points to."""
    return client(uri).get_model_version_by_alias(name, alias)


def download_model(name: str, dst: str | Path, alias: str = "champion", uri: str | None = None) -> Path:
    """Download the folder ``models:/NAME@ALIAS`` points to into ``dst``.

    The alias is resolved with this module's client: MLflow resolves ``models:/`` URIs
    against the *global* registry URI, ignoring a ``tracking_uri`` argument.
    """
    import mlflow.artifacts

    uri = tracking_uri(uri)
    version = resolve_alias(name, alias, uri)
    Path(dst).mkdir(parents=True, exist_ok=True)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(dst), tracking_uri=uri))


def _join(*parts: str | None) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def _safe(values: Mapping[str, Any]) -> dict[str, Any]:
    """Drop secret-looking names and any value equal to the configured secret key."""
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
    return {
        k: v
        for k, v in values.items()
        if not any(w in k.lower() for w in _SECRET_WORDS) and not (secret and str(v) == secret)
    }


def _strs(values: Mapping[str, Any]) -> dict[str, str]:
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in values.items()}


def _log_batch(
    c: Any,
    run_id: str,
    params: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    step: int = 0,
) -> None:
    """One request for params + metrics; ``None`` and non-finite metrics are skipped."""
    import time

    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    ps = [Param(k, str(v)[:6000]) for k, v in _safe(params or {}).items() if v is not None]
    # Non-finite values are dropped (MLflow turns inf into 1.8e308); a failed run carries its reason as a tag.
    ms = [Metric(k, float(v), now, step) for k, v in (metrics or {}).items() if v is not None and math.isfinite(float(v))]
    if ps or ms:
        c.log_batch(run_id, metrics=ms, params=ps)
