"""A local DICOMweb PACS for trying the clinical loop: Orthanc with its DICOMweb plugin.

Command line (from the checkout; Debian/Ubuntu packages ``orthanc`` and ``orthanc-dicomweb``)::

    python -m tools pacs start --dir PACS [--port 8042] [--dicom_port 4242]   # prints the DICOMweb URL
    python -m tools pacs upload --url http://127.0.0.1:8042 --series SERIES_FOLDER
    python -m tools pacs stop --dir PACS

``start`` writes ``PACS/orthanc.json`` (a generated Orthanc configuration, see :func:`orthanc_config`),
starts ``Orthanc`` in the background with storage in ``PACS/storage``, its log in ``PACS/orthanc.log`` and
its process id in ``PACS/orthanc.pid``, and returns once the REST API answers ``/system``. Port 0 (or
an occupied default) picks a free port. ``stop`` ends it (SIGTERM: Orthanc closes its database cleanly).
``upload`` sends every file of a series folder to Orthanc's REST API (``POST /instances``).

The server is for one person's machine: HTTP answers only clients on this machine (Orthanc's
``RemoteAccessAllowed: false``; Orthanc 1.10 has no bind-address option, so the port is open but remote
requests are refused), without authentication, and its DICOM port accepts C-ECHO only (no modality is
allowed to store, find, get or move). See ``docs/clinical.md`` for what a hospital deployment changes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared_nets.io import atomic_write_json, atomic_write_text

__all__ = [
    "DICOMWEB_PLUGIN_DIRS",
    "find_orthanc",
    "find_dicomweb_plugin",
    "free_port",
    "orthanc_config",
    "Orthanc",
    "upload_series",
    "start",
    "stop",
    "upload",
    "main",
]

# where Debian/Ubuntu's orthanc-dicomweb (and Orthanc's own builds) put the plugin
DICOMWEB_PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc", "/usr/local/share/orthanc/plugins")
STARTUP_TIMEOUT = 60.0


def find_orthanc(orthanc: str | None = None) -> str:
    """The Orthanc executable: ``orthanc``, ``$ORTHANC``, ``Orthanc`` on PATH or ``/usr/sbin/Orthanc``.

    Raises:
        FileNotFoundError: naming the Debian packages to install.
    """
    candidates = [orthanc, os.environ.get("ORTHANC"), shutil.which("Orthanc"), "/usr/sbin/Orthanc"]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return str(c)
    raise FileNotFoundError(
        "Orthanc not found (looked at $ORTHANC, PATH and /usr/sbin/Orthanc); install it with "
        "`apt-get install orthanc orthanc-dicomweb` or pass --orthanc."
    )


def find_dicomweb_plugin(plugin: str | None = None) -> str:
    """The DICOMweb plugin library: ``plugin``, ``$ORTHANC_DICOMWEB_PLUGIN`` or ``libOrthancDicomWeb.so*`` in
    :data:`DICOMWEB_PLUGIN_DIRS`.

    Raises:
        FileNotFoundError: naming the Debian package to install.
    """
    for c in (plugin, os.environ.get("ORTHANC_DICOMWEB_PLUGIN")):
        if c:
            if not Path(c).is_file():
                raise FileNotFoundError(f"DICOMweb plugin '{c}' does not exist.")
            return str(c)
    for folder in DICOMWEB_PLUGIN_DIRS:
        found = sorted(Path(folder).glob("libOrthancDicomWeb.so*")) if Path(folder).is_dir() else []
        if found:
            return str(found[0])
    raise FileNotFoundError(
        f"Orthanc's DICOMweb plugin (libOrthancDicomWeb.so) not found in {list(DICOMWEB_PLUGIN_DIRS)}; install it "
        "with `apt-get install orthanc-dicomweb` or pass --plugin."
    )


def free_port(preferred: int = 0) -> int:
    """``preferred`` if it can be bound on 127.0.0.1 now, else a free port chosen by the system."""
    for port in (preferred, 0) if preferred else (0,):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError("no free TCP port on 127.0.0.1.")


def orthanc_config(
    storage: str | os.PathLike, http_port: int, dicom_port: int, plugin: str, name: str = "sam-bundles-pacs"
) -> dict[str, Any]:
    """An Orthanc configuration for a local test PACS.

    Args:
        storage: folder of Orthanc's files and index (SQLite).
        http_port: REST / DICOMweb port.
        dicom_port: DICOM (DIMSE) port; C-ECHO only.
        plugin: path of the DICOMweb plugin library.
        name: the server's name (``/system``).

    Returns:
        The configuration (JSON-serialisable).
    """
    return {
        "Name": name,
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "Plugins": [str(plugin)],
        "HttpServerEnabled": True,
        "HttpPort": int(http_port),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "HttpDescribeErrors": True,
        "DicomServerEnabled": True,
        "DicomAet": "SAMPACS",
        "DicomPort": int(dicom_port),
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": False,
        "DicomAlwaysAllowFind": False,
        "DicomAlwaysAllowGet": False,
        "DicomAlwaysAllowMove": False,
        "DicomModalities": {},
        "ConcurrentJobs": 1,
        "HttpThreadsCount": 8,
        "SaveJobs": False,
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "WadoRoot": "/wado", "Ssl": False},
    }


def _get_json(url: str, timeout: float = 10.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read().decode())


@dataclass
class Orthanc:
    """A running Orthanc started by :meth:`start` (also a context manager that stops it).

    Args:
        folder: the folder holding ``orthanc.json``, ``storage/``, ``orthanc.log`` and ``orthanc.pid``.
        http_port: its REST / DICOMweb port.
        dicom_port: its DICOM port.
        pid: its process id.
    """

    folder: Path
    http_port: int
    dicom_port: int
    pid: int

    @property
    def url(self) -> str:
        """The REST API root."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        """The DICOMweb root (what ``monailabel start_server --studies`` takes)."""
        return f"{self.url}/dicom-web"

    @classmethod
    def start(
        cls,
        folder: str | os.PathLike,
        port: int = 0,
        dicom_port: int = 0,
        orthanc: str | None = None,
        plugin: str | None = None,
        timeout: float = STARTUP_TIMEOUT,
    ) -> Orthanc:
        """Write the configuration into ``folder`` and start Orthanc; return once ``/system`` answers.

        Args:
            folder: working folder (created); an Orthanc already running from it is refused.
            port: HTTP port (0 or an occupied one: a free port).
            dicom_port: DICOM port (0 or an occupied one: a free port).
            orthanc: Orthanc executable (default: :func:`find_orthanc`).
            plugin: DICOMweb plugin library (default: :func:`find_dicomweb_plugin`).
            timeout: seconds to wait for the REST API.
        """
        exe, lib = find_orthanc(orthanc), find_dicomweb_plugin(plugin)
        folder = Path(folder).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        pid_file = folder / "orthanc.pid"
        if pid_file.is_file() and _alive(int(pid_file.read_text().split()[0])):
            raise RuntimeError(f"an Orthanc started from '{folder}' is running; stop it first (tools pacs stop).")
        http_port = free_port(port)
        dicom = free_port(dicom_port)
        if dicom == http_port:
            dicom = free_port(0)
        config = folder / "orthanc.json"
        atomic_write_json(orthanc_config(folder / "storage", http_port, dicom, lib), config)
        log = folder / "orthanc.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [exe, str(config)],
                cwd=folder,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        atomic_write_text(pid_file, f"{proc.pid} {http_port} {dicom}\n")
        server = cls(folder, http_port, dicom, proc.pid)
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                pid_file.unlink(missing_ok=True)
                raise RuntimeError(f"Orthanc exited with {proc.returncode} at start:\n{_tail(log)}")
            try:
                if _get_json(server.url + "/system", timeout=2.0).get("Name"):
                    return server
            except (urllib.error.URLError, ConnectionError, OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"Orthanc did not answer {server.url}/system within {timeout:.0f} s:\n{_tail(log)}")
            time.sleep(0.2)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (Orthanc flushes and closes its index), SIGKILL after ``timeout`` seconds."""
        _terminate(self.pid, timeout)
        (self.folder / "orthanc.pid").unlink(missing_ok=True)

    def __enter__(self) -> Orthanc:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of this process counts as ended
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return True


def _terminate(pid: int, timeout: float) -> None:
    if not _alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + timeout
        time.sleep(0.1)


def _tail(path: Path, n: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""


def upload_series(url: str, series: str | os.PathLike) -> dict[str, Any]:
    """Send every DICOM file of ``series`` (a folder) to Orthanc's ``POST /instances``.

    Args:
        url: Orthanc's REST root (``http://127.0.0.1:8042``).
        series: folder of one DICOM series (see ``shared_nets.dicom.check_dicom_series``).

    Returns:
        ``{"instances": n, "StudyInstanceUID", "SeriesInstanceUID", "study", "series"}`` (the last two are
        Orthanc's own ids).
    """
    from shared_nets.dicom import check_dicom_series

    folder = Path(series)
    check_dicom_series(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    answer: dict[str, Any] = {}
    for path in files:
        request = urllib.request.Request(
            url.rstrip("/") + "/instances",
            data=path.read_bytes(),
            headers={"Content-Type": "application/dicom"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                answer = json.loads(r.read().decode())
        except urllib.error.HTTPError as e:
            raise ValueError(f"Orthanc refused '{path}': HTTP {e.code} {e.read()[:200]!r}.") from e
    tags = _get_json(f"{url.rstrip('/')}/series/{answer['ParentSeries']}")
    study = _get_json(f"{url.rstrip('/')}/studies/{answer['ParentStudy']}")
    return {
        "instances": len(files),
        "StudyInstanceUID": study["MainDicomTags"]["StudyInstanceUID"],
        "SeriesInstanceUID": tags["MainDicomTags"]["SeriesInstanceUID"],
        "study": answer["ParentStudy"],
        "series": answer["ParentSeries"],
    }


def start(
    dir: str, port: int = 8042, dicom_port: int = 4242, orthanc: str | None = None, plugin: str | None = None
) -> str:
    """``python -m tools pacs start``: start Orthanc from ``dir``; returns (fire prints) its DICOMweb URL."""
    server = Orthanc.start(dir, port=port, dicom_port=dicom_port, orthanc=orthanc, plugin=plugin)
    return (
        f"Orthanc (pid {server.pid}) REST {server.url}  DICOMweb {server.dicomweb}  DICOM port {server.dicom_port}"
        f"\nstop it with: python -m tools pacs stop --dir {server.folder}"
    )


def stop(dir: str) -> str:
    """``python -m tools pacs stop``: stop the Orthanc started from ``dir``."""
    pid_file = Path(dir) / "orthanc.pid"
    if not pid_file.is_file():
        raise FileNotFoundError(f"'{pid_file}' not found: no Orthanc was started from '{dir}'.")
    pid = int(pid_file.read_text().split()[0])
    _terminate(pid, 30.0)
    pid_file.unlink(missing_ok=True)
    return f"stopped Orthanc (pid {pid})"


def upload(url: str, series: str) -> str:
    """``python -m tools pacs upload``: upload a series folder; returns its study and series UIDs as JSON."""
    return json.dumps(upload_series(url, series))


main = {"start": start, "stop": stop, "upload": upload}
