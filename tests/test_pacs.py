"""``tools/pacs.py``: a real Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``) started on free loopback ports.

Skipped with the reason when Orthanc or its DICOMweb plugin is not installed (``.ci/run`` installs them
when it runs as root).
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tools import pacs

REPO = Path(__file__).resolve().parents[1]


def _require_orthanc() -> None:
    try:
        pacs.find_orthanc(), pacs.find_dicomweb_plugin()
    except FileNotFoundError as e:
        pytest.skip(f"Orthanc not installed: {e}")


def _get(url: str):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read().decode())


def test_config_keeps_orthanc_local_and_enables_dicomweb(tmp_path):
    config = pacs.orthanc_config(tmp_path / "storage", 18042, 14242, "/x/libOrthancDicomWeb.so")
    assert config["RemoteAccessAllowed"] is False and config["AuthenticationEnabled"] is False
    assert config["HttpPort"] == 18042 and config["DicomPort"] == 14242
    assert config["StorageDirectory"] == config["IndexDirectory"] == str(tmp_path / "storage")
    assert config["Plugins"] == ["/x/libOrthancDicomWeb.so"] and config["DicomWeb"]["Enable"] is True
    assert not any(config[k] for k in ("DicomAlwaysAllowStore", "DicomAlwaysAllowFind", "DicomAlwaysAllowMove"))


def test_missing_orthanc_and_plugin_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("ORTHANC", raising=False)
    monkeypatch.setattr(pacs, "DICOMWEB_PLUGIN_DIRS", (str(tmp_path),))
    if not Path("/usr/sbin/Orthanc").exists():
        with pytest.raises(FileNotFoundError, match="apt-get install orthanc orthanc-dicomweb"):
            pacs.find_orthanc()
    with pytest.raises(FileNotFoundError, match="DICOMweb plugin '/nope.so' does not exist"):
        pacs.find_dicomweb_plugin("/nope.so")
    monkeypatch.delenv("ORTHANC_DICOMWEB_PLUGIN", raising=False)
    with pytest.raises(FileNotFoundError, match="apt-get install orthanc-dicomweb"):
        pacs.find_dicomweb_plugin()


def test_start_upload_query_stop(tmp_path, real_ct):
    """Start on free ports, upload the real CT as a series, find it over DICOMweb (QIDO-RS), stop cleanly."""
    _require_orthanc()
    from shared_nets.dicom import nifti_to_dicom

    series = tmp_path / "ct_dicom"
    nifti_to_dicom(real_ct / "ct.nii.gz", series)
    with pacs.Orthanc.start(tmp_path / "pacs") as server:
        assert _get(server.url + "/system")["DicomAet"] == "SAMPACS"
        written = json.loads((tmp_path / "pacs" / "orthanc.json").read_text())
        assert written["HttpPort"] == server.http_port and written["DicomPort"] == server.dicom_port
        up = pacs.upload_series(server.url, series)
        assert up["instances"] == len(list(series.iterdir())) == 30
        found = _get(f"{server.dicomweb}/studies/{up['StudyInstanceUID']}/series")
        assert [s["0020000E"]["Value"][0] for s in found] == [up["SeriesInstanceUID"]]
        assert [s["00080060"]["Value"][0] for s in found] == ["CT"]
        assert (tmp_path / "pacs" / "orthanc.pid").is_file()
    assert not (tmp_path / "pacs" / "orthanc.pid").exists()
    assert not pacs._alive(server.pid)


def test_cli_start_and_stop(tmp_path):
    """``python -m tools pacs start`` returns with Orthanc running in the background; ``stop`` ends it."""
    _require_orthanc()
    folder = tmp_path / "pacs"
    run = dict(cwd=REPO, capture_output=True, text=True, timeout=120)
    started = subprocess.run([sys.executable, "-m", "tools", "pacs", "start", "--dir", str(folder), "--port", "0",
                              "--dicom_port", "0"], **run)  # fmt: skip
    assert started.returncode == 0, started.stderr
    pid, http_port, _ = (int(v) for v in (folder / "orthanc.pid").read_text().split())
    try:
        assert f"DICOMweb http://127.0.0.1:{http_port}/dicom-web" in started.stdout
        assert _get(f"http://127.0.0.1:{http_port}/system")["Name"] == "sam-bundles-pacs"
        again = subprocess.run([sys.executable, "-m", "tools", "pacs", "start", "--dir", str(folder)], **run)
        assert again.returncode != 0 and "is running; stop it first" in again.stderr
    finally:
        stopped = subprocess.run([sys.executable, "-m", "tools", "pacs", "stop", "--dir", str(folder)], **run)
    assert stopped.returncode == 0 and f"stopped Orthanc (pid {pid})" in stopped.stdout, stopped.stderr
    assert not (folder / "orthanc.pid").exists()
