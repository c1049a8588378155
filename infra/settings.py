"""Where AutoQRA finds the outside world: tracking, orchestration, object storage.

Settings use the names the ecosystem already uses (``MLFLOW_TRACKING_URI``,
``PREFECT_API_URL``, ``AWS_*``), so servers a user already has just work. Order of
precedence, lowest first: built-in defaults < environment < settings file (YAML)
< explicit overrides (command-line flags). Secrets never appear in ``repr`` or logs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from autoqra_core.errors import AutoQRAError

EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded"
#: Where AutoQRA keeps its data (MLflow database, object store, caches) when AUTOQRA_HOME is not set.
DEFAULT_HOME = Path(".autoqra")

#: Environment variable -> Settings field. The settings file accepts either spelling.
ENV_NAMES: dict[str, str] = {
    "AUTOQRA_HOME": "home",
    "MLFLOW_TRACKING_URI": "mlflow_tracking_uri",
    "PREFECT_API_URL": "prefect_api_url",
    "AUTOQRA_STORE": "store",
    "AWS_ENDPOINT_URL": "aws_endpoint_url",
    "AWS_ACCESS_KEY_ID": "aws_access_key_id",
    "AWS_SECRET_ACCESS_KEY": "aws_secret_access_key",
    "AUTOQRA_REQUEST_TIMEOUT": "request_timeout",
    "AUTOQRA_REQUEST_RETRIES": "request_retries",
}
SECRET_FIELDS = frozenset({"aws_secret_access_key"})
#: A settings file may be named by this variable instead of a flag.
SETTINGS_FILE_ENV = "AUTOQRA_SETTINGS"


class SettingsError(AutoQRAError):
    """A settings file that is missing, unreadable or names an unknown setting."""


def embedded_model_path() -> Path:
    """The small pretrained Llama shipped with the project (the default ``--model``)."""
    return EMBEDDED_DIR / "model"


# Tasks shipped with the project, by ``--dataset`` name ('embedded' is WordNet, the default); bench/task_choice.py says
# why two: on smollm2-135m, 4-bit costs accuracy on addition and not on WordNet definitions.
EMBEDDED_DATASETS = {"embedded": "wordnet", "wordnet": "wordnet", "addition": "addition"}


def embedded_dataset_path(name: str = "embedded") -> Path:
    """A task shipped with the project: WordNet definitions (the default ``--dataset``) or two-digit addition."""
    return EMBEDDED_DIR / EMBEDDED_DATASETS[name]


@dataclass(frozen=True)
class Settings:
    """Resolved settings. ``None`` means "not set": the ecosystem default applies."""

    home: Path
    mlflow_tracking_uri: str
    prefect_api_url: str | None
    store: str
    aws_endpoint_url: str | None = None
    aws_access_key_id: str | None = None
    aws_secret_access_key: str | None = None
    #: Seconds one MLflow / S3 request may take, and retries after a failed one: a server that dies mid-search
    #: costs about (1 + retries) x timeout at worst per call (a refused connection: milliseconds), not minutes.
    request_timeout: float = 10.0
    request_retries: int = 1

    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        overrides: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> "Settings":
        """Defaults < ``environ`` (default ``os.environ``) < YAML file < ``overrides``.

        ``path`` defaults to ``$AUTOQRA_SETTINGS``. Keys may be env names
        (``MLFLOW_TRACKING_URI``) or field names (``mlflow_tracking_uri``); ``None``
        values in ``overrides`` are ignored, so CLI flags can be passed through as is.
        """
        environ = os.environ if environ is None else environ
        raw: dict[str, Any] = {}
        for env_name, field_name in ENV_NAMES.items():
            if environ.get(env_name):
                raw[field_name] = environ[env_name]
        path = path or environ.get(SETTINGS_FILE_ENV) or None
        if path is not None:
            raw.update(_normalise(read_yaml(Path(path), SettingsError, "Settings file", "NAME: value",
                                            f"; fix the path or unset {SETTINGS_FILE_ENV}"), source=str(path)))
        if overrides:
            raw.update(_normalise({k: v for k, v in overrides.items() if v is not None}, source="overrides"))
        return cls._with_defaults(raw)

    @classmethod
    def _with_defaults(cls, raw: Mapping[str, Any]) -> "Settings":
        home = Path(raw.get("home") or DEFAULT_HOME).expanduser().resolve()
        return cls(
            home=home,
            mlflow_tracking_uri=str(raw.get("mlflow_tracking_uri") or f"sqlite:///{home / 'mlflow.db'}"),
            prefect_api_url=_opt(raw.get("prefect_api_url")),
            store=str(raw.get("store") or (home / "store").as_uri()),
            aws_endpoint_url=_opt(raw.get("aws_endpoint_url")),
            aws_access_key_id=_opt(raw.get("aws_access_key_id")),
            aws_secret_access_key=_opt(raw.get("aws_secret_access_key")),
            request_timeout=_number(raw, "request_timeout", float, cls.request_timeout),
            request_retries=_number(raw, "request_retries", int, cls.request_retries),
        )

    def to_env(self) -> dict[str, str]:
        """Variables to export so MLflow, Prefect and boto3 (in this or a child process) see these settings.

        Contains the secret: pass it to ``os.environ`` or a subprocess, never print it.
        ``MLFLOW_S3_ENDPOINT_URL`` is derived from ``AWS_ENDPOINT_URL``: MLflow's own S3
        client reads that name, not boto3's.
        """
        env = {
            "AUTOQRA_HOME": str(self.home),
            "MLFLOW_TRACKING_URI": self.mlflow_tracking_uri,
            "AUTOQRA_STORE": self.store,
            "AUTOQRA_REQUEST_TIMEOUT": str(self.request_timeout),
            "AUTOQRA_REQUEST_RETRIES": str(self.request_retries),
        }
        optional = {
            "PREFECT_API_URL": self.prefect_api_url,
            "AWS_ENDPOINT_URL": self.aws_endpoint_url,
            "MLFLOW_S3_ENDPOINT_URL": self.aws_endpoint_url,
            "AWS_ACCESS_KEY_ID": self.aws_access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.aws_secret_access_key,
        }
        env.update({k: v for k, v in optional.items() if v})
        return env

    def apply(self) -> None:
        """Export :meth:`to_env` into ``os.environ`` (before Prefect/MLflow clients are created)."""
        os.environ.update(self.to_env())

    def redacted(self) -> dict[str, str | None]:
        """All settings with secrets replaced by ``"***"``: safe to print or log."""
        out: dict[str, str | None] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in SECRET_FIELDS and value:
                out[f.name] = "***"
            else:
                out[f.name] = None if value is None else str(value)
        return out

    def __repr__(self) -> str:
        body = ", ".join(f"{k}={v!r}" for k, v in self.redacted().items())
        return f"Settings({body})"

    __str__ = __repr__


def _number(raw: Mapping[str, Any], name: str, kind: type, default: float) -> Any:
    value = raw.get(name)
    if value in (None, ""):
        return default
    try:
        out = kind(value)
    except (TypeError, ValueError):
        out = -1
    if out < 0:
        env = next(k for k, v in ENV_NAMES.items() if v == name)
        raise SettingsError(f"{env} must be a non-negative {kind.__name__}, got {value!r}")
    return out


def _opt(value: Any) -> str | None:
    return None if value in (None, "") else str(value)


def _normalise(raw: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Map env-style or field-style keys to field names; reject unknown keys by name."""
    known = {f.name for f in fields(Settings)}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = ENV_NAMES.get(str(key), str(key).lower())
        if name not in known:
            allowed = ", ".join(sorted(ENV_NAMES))
            raise SettingsError(f"Unknown setting {key!r} in {source}; allowed: {allowed}")
        out[name] = value
    return out


def read_yaml(path: Path, error: type[AutoQRAError], what: str, holds: str, hint: str = "") -> dict[str, Any]:
    """The mapping the YAML file ``path`` holds; ``error`` naming ``what`` file it is (and ``hint``, where it is
    missing) when it is missing, not YAML, or not a mapping of ``holds``."""
    import yaml

    if not path.is_file():
        raise error(f"{what} {path} not found{hint}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise error(f"{what} {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise error(f"{what} {path} must hold a mapping of {holds}")
    return data
