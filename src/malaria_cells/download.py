"""Fetching the public NIH malaria cell images: resumable, verified, safely extracted."""

from __future__ import annotations

import hashlib
import os
import shutil
import zipfile
import zlib
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
MAX_RATIO = 100
"""Zip-bomb limits, checked from the archive's directory before any data is read: members,
total declared size, and compression ratio (of each member over 64 KiB, and of the whole);
the declared sizes are then enforced while extracting."""
_RATIO_MIN_BYTES = 64 * 2**10


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
    """Check the size and the SHA-256 (when given); each member's CRC is checked as it is extracted."""
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


def _declared_members(path: Path) -> int:
    """The member count the archive's end record declares, read without parsing its directory."""
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        handle.seek(max(0, size - (65536 + 22)))
        tail = handle.read()
        end = tail.rfind(b"PK\x05\x06")
        if end < 0 or len(tail) < end + 22:
            raise MalariaCellsError(f"{path}: not a valid zip archive (no end record); delete it and download again")
        members = int.from_bytes(tail[end + 10:end + 12], "little")
        locator = tail.rfind(b"PK\x06\x07", 0, end)
        if members == 0xFFFF and locator >= 0:  # ZIP64: the count is in the ZIP64 end record
            handle.seek(int.from_bytes(tail[locator + 8:locator + 16], "little"))
            record = handle.read(56)
            if record[:4] == b"PK\x06\x06":
                members = int.from_bytes(record[32:40], "little")
    return members


def check_archive(path: Path, dest: Path) -> list:
    """Refuse a zip that is too big, a bomb, or unsafe, from its directory alone.

    Returns the members (``zipfile.ZipInfo``) to extract.
    """
    declared = _declared_members(path)
    if declared > MAX_MEMBERS:
        raise MalariaCellsError(f"{path}: {declared} members, more than the {MAX_MEMBERS} allowed; refusing")
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except zipfile.BadZipFile as error:
        raise MalariaCellsError(f"{path}: not a valid zip archive ({error}); delete it and download again") from None
    if len(members) > MAX_MEMBERS:
        raise MalariaCellsError(f"{path}: {len(members)} members, more than the {MAX_MEMBERS} allowed; refusing")
    total = compressed = 0
    for member in members:
        target = (dest / member.filename).resolve()
        if member.filename.startswith(("/", "\\")) or not target.is_relative_to(dest):
            raise MalariaCellsError(f"{path}: member {member.filename!r} would escape {dest}; refusing")
        if (member.external_attr >> 16) & 0o170000 == 0o120000:
            raise MalariaCellsError(f"{path}: member {member.filename!r} is a symbolic link; refusing")
        if member.file_size > _RATIO_MIN_BYTES and member.file_size > MAX_RATIO * max(1, member.compress_size):
            raise MalariaCellsError(f"{path}: member {member.filename!r} looks like a zip bomb "
                                    f"(compressed {member.file_size // max(1, member.compress_size)}:1); refusing")
        total += member.file_size
        compressed += member.compress_size
    if total > MAX_TOTAL_BYTES:
        raise MalariaCellsError(f"{path}: would unpack to {total} bytes, over the {MAX_TOTAL_BYTES} limit; refusing")
    if total > _RATIO_MIN_BYTES and total > MAX_RATIO * max(1, compressed):
        raise MalariaCellsError(f"{path}: looks like a zip bomb (compressed {total // max(1, compressed)}:1 "
                                "in all); refusing")
    return members


def safe_extract(path: Path, dest: Path) -> list[Path]:
    """Extract a zip into ``dest`` without ever replacing or deleting anything already there.

    The archive is checked from its directory first (:func:`check_archive`). Members are
    extracted into a new temporary folder inside ``dest``, each within its declared size and
    CRC; then its top-level entries are moved into ``dest``. If one of them exists already,
    nothing is moved and the error names it. On any refusal or failure the temporary folder
    is removed and ``dest`` is as it was.

    Returns the top-level paths it created.
    """
    import tempfile

    dest = Path(dest).resolve()
    members = check_archive(path, dest)
    dest.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".malaria-cells-extract-", dir=dest))
    try:
        with zipfile.ZipFile(path) as archive:
            written = 0
            for member in members:
                target = staging / member.filename
                if member.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as source, open(target, "xb") as out:
                    while block := source.read(1 << 20):
                        written += len(block)
                        if written > MAX_TOTAL_BYTES:
                            raise MalariaCellsError(f"{path}: unpacks to more than {MAX_TOTAL_BYTES} bytes; refusing")
                        out.write(block)
        created = sorted(staging.iterdir())
        for item in created:
            if os.path.lexists(dest / item.name):
                raise MalariaCellsError(
                    f"{dest / item.name}: already exists and the archive holds one too; nothing was changed. "
                    f"Move it away, or choose another --dest")
        for item in created:
            os.replace(item, dest / item.name)
        return [dest / item.name for item in created]
    except (zipfile.BadZipFile, zlib.error, EOFError) as error:
        raise MalariaCellsError(f"{path}: damaged archive ({error}); delete it and download again") from None
    finally:
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
    if (dest / "cell_images").is_dir():
        try:  # already extracted by an earlier run: nothing to do
            return find_dataset_root(dest / "cell_images")
        except MalariaCellsError:
            pass
    safe_extract(archive, dest)
    return find_dataset_root(dest / "cell_images" if (dest / "cell_images").is_dir() else dest)
