"""Download and verify the official SAM checkpoints (``sam_vit_{b,l,h}_*.pth``).

Command line (from the checkout)::

    python -m tools weights --variant vit_b --dest DIR [--url URL] [--force] [--verify_only]

The file is streamed to ``DIR/<name>.part`` with a progress bar, its MD5 is checked against
``shared_nets.sam.SAM_VARIANTS[variant].md5`` and only then renamed to ``DIR/<name>``, so
``DIR/<name>`` is either absent or complete and verified. An existing file with the right MD5
is kept. Build machines are often offline: a download that cannot reach the server ends with one
line saying where to put a hand-downloaded copy and how to verify it (``--verify_only``).

We stream with ``urllib`` instead of calling ``monai.apps.download_url`` because that helper
downloads into the system temporary folder (multi-GB files may not fit there or may cross file
systems) and reports an unreachable server as a traceback; the MD5 is computed while streaming,
so the file is read once.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from shared_nets.sam.variants import SAM_VARIANTS, get_variant

__all__ = [
    "WeightsError",
    "WeightsDownloadError",
    "WeightsChecksumError",
    "md5sum",
    "download_weights",
    "main",
]

_CHUNK = 1 << 20
_MD5_RE = re.compile(r"^[0-9a-f]{32}$")


class WeightsError(RuntimeError):
    """A checkpoint could not be obtained or verified; the message is one line for the user."""


class WeightsDownloadError(WeightsError):
    """The server could not be reached or the transfer failed (offline, refused, timeout, HTTP error)."""


class WeightsChecksumError(WeightsError):
    """A downloaded or existing checkpoint does not have the expected MD5."""


def md5sum(path: str | os.PathLike, chunk_size: int = _CHUNK) -> str:
    """Hex MD5 of the file at ``path``, read in ``chunk_size`` pieces.

    Args:
        path: file to hash.
        chunk_size: bytes read at a time.

    Returns:
        32 lowercase hex digits.
    """
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def _manual_hint(url: str, final: Path, md5: str, variant: str) -> str:
    return (
        f"Download it by hand from {url} and place it at {final} (MD5 {md5}), then re-run "
        f"`python -m tools weights --variant {variant} --dest {final.parent} --verify_only`."
    )


def _stream(url: str, part: Path, timeout: float, progress: bool) -> str:
    """Stream ``url`` into ``part``; return the MD5 of the bytes written."""
    digest = hashlib.md5()
    request = urllib.request.Request(url, headers={"User-Agent": "sam-adapter-bundles-tools"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        written = 0
        with (
            open(part, "wb") as f,
            tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=part.name[: -len(".part")],
                disable=not progress,
                file=sys.stderr,
            ) as bar,
        ):
            while block := response.read(_CHUNK):
                f.write(block)
                digest.update(block)
                written += len(block)
                bar.update(len(block))
        if total is not None and written != total:
            raise http.client.IncompleteRead(b"", total - written)
    return digest.hexdigest()


def download_weights(
    variant: str = "vit_b",
    dest: str | os.PathLike = ".",
    url: str | None = None,
    md5: str | None = None,
    force: bool = False,
    verify_only: bool = False,
    timeout: float = 60.0,
    progress: bool = True,
) -> Path:
    """Make sure ``dest/<checkpoint_name>`` holds the verified official SAM checkpoint of ``variant``.

    Args:
        variant: ``vit_b``, ``vit_l`` or ``vit_h`` (``tiny`` has no official weights).
        dest: folder for the checkpoint (created if missing).
        url: download from here instead of the official address (mirrors, tests).
        md5: expected MD5 instead of the registry's (for a mirror serving another file, tests).
        force: download again even if a verified file is already there.
        verify_only: do not download; check the MD5 of the existing file.
        timeout: seconds to wait for the server on connect and on each read.
        progress: show a tqdm progress bar.

    Returns:
        Path of the verified checkpoint.

    Raises:
        ValueError: unknown variant, ``tiny``, or a malformed ``md5``.
        WeightsDownloadError: the server could not be reached or the transfer failed;
            the message says where to put a hand-downloaded copy.
        WeightsChecksumError: the downloaded or existing file has another MD5 (a downloaded one
            is deleted; nothing is left under the checkpoint's name).
    """
    v = get_variant(variant)
    if v.checkpoint_name is None or v.md5 is None:
        official = sorted(k for k, s in SAM_VARIANTS.items() if s.checkpoint_name)
        raise ValueError(
            f"variant must be one with official SAM weights {official}, got {v.name!r}: it has no "
            "pretrained checkpoint (build it with checkpoint=None for random initialisation)."
        )
    expected = (md5 if md5 is not None else v.md5).strip().lower()
    if not _MD5_RE.match(expected):
        raise ValueError(f"md5 must be 32 hex digits, got {md5!r}.")
    if timeout is None or not float(timeout) > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}.")
    url = url or v.url
    dest = Path(dest).expanduser()
    final = dest / v.checkpoint_name
    hint = _manual_hint(url, final, expected, v.name)

    if verify_only:
        if not final.is_file():
            raise WeightsError(f"{final} does not exist. {hint}")
        actual = md5sum(final)
        if actual != expected:
            raise WeightsChecksumError(
                f"{final} has MD5 {actual}, expected {expected}: the file is damaged or not the official "
                f"{v.checkpoint_name}. Delete it and download it again from {url}."
            )
        print(f"{final}: MD5 {actual} verified.", file=sys.stderr)
        return final

    if final.is_file() and not force:
        actual = md5sum(final)
        if actual == expected:
            print(f"{final} already present with the right MD5 ({actual}); keeping it.", file=sys.stderr)
            return final
        print(f"{final} has MD5 {actual}, expected {expected}; downloading it again.", file=sys.stderr)

    dest.mkdir(parents=True, exist_ok=True)
    part = final.with_name(final.name + ".part")
    print(f"Downloading {url} -> {final}", file=sys.stderr)
    try:
        actual = _stream(url, part, float(timeout), progress)
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, socket.timeout) as e:
        part.unlink(missing_ok=True)
        if isinstance(e, urllib.error.HTTPError):
            reason = f"HTTP {e.code} {e.reason}"
        else:
            reason = f"{type(e).__name__}: {getattr(e, 'reason', None) or e}"
        raise WeightsDownloadError(f"could not download {url} ({reason}). {hint}") from e
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    if actual != expected:
        part.unlink(missing_ok=True)
        raise WeightsChecksumError(
            f"the file downloaded from {url} has MD5 {actual}, expected {expected}; it was deleted and "
            f"{final} was not written. Check the URL, or {hint[0].lower()}{hint[1:]}"
        )
    os.replace(part, final)
    print(f"{final}: MD5 {actual} verified.", file=sys.stderr)
    return final


def main(
    variant: str = "vit_b",
    dest: str | None = None,
    url: str | None = None,
    force: bool = False,
    verify_only: bool = False,
    md5: str | None = None,
    timeout: float = 60.0,
    progress: bool = True,
) -> str:
    """Download (or with ``--verify_only`` just check) an official SAM checkpoint; print its path.

    Args:
        variant: ``vit_b``, ``vit_l`` or ``vit_h``.
        dest: folder for the checkpoint (required).
        url: download from here instead of the official address.
        force: download again even if a verified file is already there.
        verify_only: only check the MD5 of ``dest/<name>``.
        md5: expected MD5 instead of the official one.
        timeout: seconds to wait for the server.
        progress: show a progress bar.

    Returns:
        Path of the verified checkpoint. Expected failures (offline, wrong MD5, bad arguments)
        print one ``error:`` line and exit with status 1 (2 for bad arguments), no traceback.
    """
    try:
        if dest is None:
            raise ValueError("dest must be given: the folder to hold the checkpoint (e.g. --dest models).")
        return str(download_weights(variant, dest, url, md5, force, verify_only, timeout, progress))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except WeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
