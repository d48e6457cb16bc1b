"""Start a real ``monailabel start_server`` on a free loopback port and talk to its REST API.

Used by every MONAI Label test module (``tests/test_monailabel_*.py``). MONAI Label pins older
packages, so it lives in its own virtual environment (``.ci/run`` creates ``.venv-monailabel``;
``$MONAILABEL_PYTHON`` points at its Python). Without it the tests are skipped, except under CI
(``$CI`` set), where they fail.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

__all__ = ["Response", "Server", "monailabel_python", "require_monailabel_python", "start_label_server", "free_port"]

REPO = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT = 420.0
REQUEST_TIMEOUT = 600.0


def monailabel_python() -> str | None:
    """The MONAI Label environment's Python: ``$MONAILABEL_PYTHON`` or ``.venv-monailabel`` in the checkout."""
    candidates = [os.environ.get("MONAILABEL_PYTHON"), str(REPO / ".venv-monailabel" / "bin" / "python")]
    return next((c for c in candidates if c and Path(c).is_file()), None)


def require_monailabel_python() -> str:
    """:func:`monailabel_python`, or skip the test (fail it under CI) when there is none."""
    python = monailabel_python()
    if python is None:
        reason = (
            "MONAI Label environment not found: set MONAILABEL_PYTHON or create .venv-monailabel "
            "(see .ci/run and docs/monai_label.md)"
        )
        if os.environ.get("CI"):
            pytest.fail(reason + "; CI must run the MONAI Label server tests.")
        pytest.skip(reason)
    return python


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (bound to port 0 and released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Response:
    status: int
    body: bytes

    def json(self):
        return json.loads(self.body.decode())


@dataclass
class Server:
    """A running (or stopped) MONAI Label server of an assembled app.

    Args:
        url: ``http://127.0.0.1:<port>``.
        app: the app folder (``python -m tools label_app``).
        studies: the datastore folder.
        log: the server's stdout and stderr (appended to over restarts).
        command: the ``start_server`` command line.
        env: its environment.
        cwd: its working folder.
        proc: the server process (leader of its own process group).
        ready_path: what must answer 200 once the server is up (``/auth/`` when MONAI Label's auth is on).
    """

    url: str
    app: Path
    studies: Path
    log: Path
    command: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    proc: subprocess.Popen | None = None
    ready_path: str = "/info/"

    def request(
        self,
        method: str,
        path: str,
        params: dict | None = None,
        file: Path | bytes | None = None,
        body: dict | None = None,
        filename: str = "volume.nii.gz",
        raw_params: str | None = None,
        timeout: float = REQUEST_TIMEOUT,
        file_field: str = "file",
    ) -> Response:
        """One HTTP request; ``params`` / ``file`` go as multipart form fields (what MONAI Label's infer takes;
        its label upload names the file field ``label``).

        ``raw_params`` is sent as the ``params`` form field verbatim (for malformed JSON).
        """
        headers: dict[str, str] = {}
        data = None
        if params is not None or file is not None or raw_params is not None:
            boundary = uuid.uuid4().hex
            parts = []
            text = raw_params if raw_params is not None else (json.dumps(params) if params is not None else None)
            if text is not None:
                parts.append(
                    f'--{boundary}\r\nContent-Disposition: form-data; name="params"\r\n\r\n{text}\r\n'.encode()
                )
            if file is not None:
                content = file if isinstance(file, bytes) else Path(file).read_bytes()
                parts.append(
                    f'--{boundary}\r\nContent-Disposition: form-data; name="{file_field}"; filename="{filename}"\r\n'
                    "Content-Type: application/octet-stream\r\n\r\n".encode()
                    + content
                    + b"\r\n"
                )
            data = b"".join(parts) + f"--{boundary}--\r\n".encode()
            headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
        elif body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return Response(r.status, r.read())
        except urllib.error.HTTPError as e:
            return Response(e.code, e.read())

    def infer(
        self,
        model: str,
        image: str | None = None,
        params: dict | None = None,
        file: Path | bytes | None = None,
        filename: str = "volume.nii.gz",
        raw_params: str | None = None,
        timeout: float = REQUEST_TIMEOUT,
    ) -> Response:
        query = "?output=image" + (f"&image={urllib.parse.quote(image, safe='')}" if image else "")
        return self.request(
            "POST",
            f"/infer/{model}{query}",
            params=params if params is not None or raw_params is not None else {},
            file=file,
            filename=filename,
            raw_params=raw_params,
            timeout=timeout,
        )

    def log_tail(self, n: int = 60) -> str:
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        return "\n".join(lines[-n:])

    # -- process control ---------------------------------------------------------------------
    def start(self) -> None:
        """Start the server (appending to :attr:`log`) and wait until ``/info/`` answers 200."""
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.command,
                cwd=self.cwd,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.wait_ready()

    def restart(self) -> None:
        """Start a stopped or killed server again, on a newly picked free port."""
        port = free_port()
        i = self.command.index("--port")
        self.command[i + 1] = str(port)
        self.url = f"http://127.0.0.1:{port}"
        self.start()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"monailabel start_server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if self.request("GET", self.ready_path, timeout=30).status == 200:
                    return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(2.0)
        raise RuntimeError(
            f"monailabel server did not answer {self.ready_path} within {STARTUP_TIMEOUT:.0f} s:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """SIGTERM the server's process group (SIGKILL after 30 s)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL the server's whole process group (the server and the jobs it started), as a crash would."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=60)
        # children that left the group are none of ours; wait until the group is gone
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)

    def pids(self) -> list[int]:
        """The server process and its descendants (from ``/proc``)."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        children: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        out, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo.extend(children.get(pid, []))
        return out

    def rss_bytes(self) -> int:
        """Resident memory of the server process tree now (sum of ``VmRSS``)."""
        total = 0
        for pid in self.pids():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            except OSError:
                continue
        return total


def start_label_server(
    root: Path,
    models: str | list[str] | None = None,
    variant: str = "tiny",
    studies: str | None = None,
    num_studies: int = 4,
    shape: tuple[int, int, int] = (64, 64, 24),
    env: dict[str, str] | None = None,
) -> Server:
    """Assemble the app under ``root`` (``python -m tools label_app``) and serve it on a free loopback port.

    Args:
        root: an empty folder (e.g. from ``tmp_path_factory``); the app goes to ``root/app``, the log to
            ``root/server.log``.
        models, variant, studies, num_studies, shape: as for :func:`tools.label_app.build_label_app`.
        env: extra environment variables of the server (e.g. MONAI Label settings).

    Returns:
        The started :class:`Server`; call :meth:`Server.stop` when done.
    """
    python = require_monailabel_python()
    from tools.label_app import build_label_app, start_server_command

    built = build_label_app(
        root / "app",
        models=models,
        variant=variant,
        studies=studies,
        num_studies=num_studies,
        shape=shape,
        monailabel_python=python,
    )
    port = free_port()
    command = start_server_command(built["app"], built["studies"], built["models"], host="127.0.0.1", port=port)
    server_env = dict(os.environ)
    server_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (built["app"], str(REPO), server_env.get("PYTHONPATH", "")) if p
    )
    server_env["PATH"] = os.pathsep.join((str(Path(python).parent), server_env.get("PATH", "")))
    server_env.setdefault("OMP_NUM_THREADS", "1")
    server_env.update(env or {})
    server = Server(
        url=f"http://127.0.0.1:{port}",
        app=Path(built["app"]),
        studies=Path(built["studies"]),
        log=root / "server.log",
        command=[python, "-m", "monailabel.main", *command[1:]],
        env=server_env,
        cwd=root,
    )
    try:
        server.start()
    except BaseException:
        server.kill()
        raise
    return server
