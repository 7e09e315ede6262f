"""Fetching the public NIH malaria cell images: resumable, verified, safely extracted."""

from __future__ import annotations

import hashlib
import os
import shutil
import zipfile
from pathlib import Path

from .errors import MalariaCellsError

NIH_URL = "https://data.lhncbc.nlm.nih.gov/public/Malaria/cell_images.zip"
NIH_SIZE: int | None = None
NIH_SHA256: str | None = None
"""NIH publishes neither size nor checksum: the download is checked against the size the
server announces (Content-Length / Content-Range) and every member's CRC; set these (or
pass ``expected_size`` / ``sha256``) to pin a known copy."""

MAX_MEMBERS = 200_000
MAX_TOTAL_BYTES = 8 * 2**30
MAX_RATIO = 200
"""Zip-bomb limits: members, total uncompressed size, and compression ratio per member."""


def cache_dir() -> Path:
    """``$MALARIA_CELLS_HOME``, else ``~/.cache/malaria-cells``."""
    return Path(os.environ.get("MALARIA_CELLS_HOME") or Path.home() / ".cache" / "malaria-cells").expanduser()


def fetch(url: str, target: Path, *, expected_size: int | None = None, verbose: int = 1,
          chunk_size: int = 1 << 20, timeout: float = 60) -> Path:
    """Download ``url`` to ``target``, resuming from ``target.part`` when present."""
    import urllib.error  # here, not at the top: urllib.request slows every command's start
    import urllib.request

    partial = target.with_name(target.name + ".part")
    have = partial.stat().st_size if partial.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and have and (not expected_size or have == expected_size):
            # Range past the end: the partial file is already complete (the CRCs will tell).
            os.replace(partial, target)
            return target
        raise MalariaCellsError(f"{url}: download failed (HTTP {error.code} {error.reason})") from error
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise MalariaCellsError(
            f"{url}: cannot connect ({reason}); check the network, or download the file "
            f"elsewhere and unzip it into {cache_dir()}"
        ) from error
    with response:
        resumed = response.status == 206
        if not resumed:
            have = 0
        total = _announced_size(response, have) or expected_size
        if expected_size and total and total != expected_size:
            raise MalariaCellsError(
                f"{url}: server offers {total} bytes, expected {expected_size}; refusing an unexpected file"
            )
        from tqdm import tqdm

        with open(partial, "ab" if resumed else "wb") as handle, tqdm(
            total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
            disable=not verbose, desc=Path(target).name,
        ) as bar:
            while chunk := response.read(chunk_size):
                handle.write(chunk)
                have += len(chunk)
                bar.update(len(chunk))
    if total and have != total:
        raise MalariaCellsError(
            f"{url}: download ended at {have} of {total} bytes; run the command again to resume"
        )
    os.replace(partial, target)
    return target


def _announced_size(response, offset: int) -> int | None:
    content_range = response.headers.get("Content-Range", "")
    if "/" in content_range and content_range.rsplit("/", 1)[1].isdigit():
        return int(content_range.rsplit("/", 1)[1])
    length = response.headers.get("Content-Length")
    return offset + int(length) if length and length.isdigit() else None


def verify_archive(path: Path, *, expected_size: int | None = None, sha256: str | None = None) -> None:
    """Check the size, the SHA-256 (when given) and every member's CRC."""
    size = path.stat().st_size
    if expected_size and size != expected_size:
        raise MalariaCellsError(f"{path}: {size} bytes, expected {expected_size}; delete it and download again")
    if sha256:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != sha256.lower():
            raise MalariaCellsError(f"{path}: SHA-256 mismatch; delete it and download again")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except zipfile.BadZipFile as error:
        raise MalariaCellsError(f"{path}: not a valid zip archive ({error}); delete it and download again") from error
    if bad is not None:
        raise MalariaCellsError(f"{path}: member {bad} fails its CRC check; delete it and download again")


def safe_extract(path: Path, dest: Path) -> None:
    """Extract a zip into ``dest``, refusing path escapes, links and zip bombs.

    Extraction goes to a temporary folder beside ``dest`` that is renamed into place
    member by member, so an interrupted extraction never leaves a half-written dataset.
    """
    dest = Path(dest).resolve()
    with zipfile.ZipFile(path) as archive:
        members = archive.infolist()
        if len(members) > MAX_MEMBERS:
            raise MalariaCellsError(f"{path}: {len(members)} members, more than the {MAX_MEMBERS} allowed")
        total = 0
        for member in members:
            target = (dest / member.filename).resolve()
            if member.filename.startswith(("/", "\\")) or not target.is_relative_to(dest):
                raise MalariaCellsError(f"{path}: member {member.filename!r} would escape {dest}; refusing")
            if (member.external_attr >> 16) & 0o170000 == 0o120000:
                raise MalariaCellsError(f"{path}: member {member.filename!r} is a symbolic link; refusing")
            total += member.file_size
            if member.compress_size and member.file_size / member.compress_size > MAX_RATIO and member.file_size > 2**20:
                raise MalariaCellsError(f"{path}: member {member.filename!r} looks like a zip bomb; refusing")
        if total > MAX_TOTAL_BYTES:
            raise MalariaCellsError(f"{path}: would unpack to {total} bytes, over the {MAX_TOTAL_BYTES} limit; refusing")
        staging = dest.with_name(f".{dest.name}.extracting")
        shutil.rmtree(staging, ignore_errors=True)
        archive.extractall(staging)
    dest.mkdir(parents=True, exist_ok=True)
    for item in staging.iterdir():
        if (dest / item.name).exists():
            shutil.rmtree(dest / item.name) if (dest / item.name).is_dir() else (dest / item.name).unlink()
        os.replace(item, dest / item.name)
    shutil.rmtree(staging, ignore_errors=True)


def download(dest: str | os.PathLike | None = None, *, url: str = NIH_URL,
             expected_size: int | None = NIH_SIZE, sha256: str | None = NIH_SHA256,
             verbose: int = 1) -> Path:
    """Download, verify and extract the NIH cell images; return the dataset folder.

    Parameters
    ----------
    dest : path, optional
        Where to put ``cell_images/`` (default: :func:`cache_dir`).
    url : str
        Archive address; another URL skips the NIH size check.
    expected_size, sha256 : optional
        What the archive must match.

    Returns
    -------
    Path
        The folder holding ``Parasitized/`` and ``Uninfected/``.
    """
    import urllib.parse

    from .datasets import find_dataset_root

    dest = Path(dest).expanduser() if dest is not None else cache_dir()
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest / (Path(urllib.parse.urlparse(url).path).name or "cell_images.zip")
    if not archive.exists():
        fetch(url, archive, expected_size=expected_size, verbose=verbose)
    verify_archive(archive, expected_size=expected_size, sha256=sha256)
    safe_extract(archive, dest)
    return find_dataset_root(dest / "cell_images" if (dest / "cell_images").is_dir() else dest)
