"""What a lab files with a result: who the sample is from, who screened it, where and when.

A report is only signed if it names its sample. :class:`SampleMetadata` holds the identifiers
a lab records (patient, slide, operator, collection date, site, a free note), validated once;
:func:`read_manifest` reads them per sample from a CSV file (one row per sample folder), and
:func:`attach_metadata` puts them on a screen's samples, so that the table, the JSON, the
report and the PDF all carry them.
"""

from __future__ import annotations

import csv
import datetime
import io
import os
from dataclasses import asdict, dataclass, fields, replace

from ..errors import MalariaCellsError

__all__ = ["SampleMetadata", "METADATA_FIELDS", "read_manifest", "attach_metadata", "MAX_MANIFEST_BYTES"]

MAX_MANIFEST_BYTES = 4 * 2**20
"""A manifest larger than this is refused (tens of thousands of samples fit well below it)."""
_MAX_LENGTH = {"note": 1000}
_DEFAULT_MAX_LENGTH = 200


@dataclass(frozen=True)
class SampleMetadata:
    """Identifiers of one sample, as the lab records them; every one optional.

    Parameters
    ----------
    patient : str
        Patient identifier (as the lab's records name them; no name is needed).
    slide : str
        Slide identifier.
    operator : str
        Who prepared or screened the slide.
    date : str
        Date the blood was taken, ``YYYY-MM-DD``.
    site : str
        Laboratory, clinic or field site.
    note : str
        Free text (at most 1,000 characters).

    Raises
    ------
    MalariaCellsError
        When a value is not text, is too long (200 characters; the note 1,000), holds control
        characters other than a line break in the note, or the date is not a calendar date.
    """

    patient: str = ""
    slide: str = ""
    operator: str = ""
    date: str = ""
    site: str = ""
    note: str = ""

    def __post_init__(self):
        for item in fields(self):
            value = getattr(self, item.name)
            if not isinstance(value, str):
                raise MalariaCellsError(f"{item.name}: expected text, got {type(value).__name__}")
            value = value.strip()
            limit = _MAX_LENGTH.get(item.name, _DEFAULT_MAX_LENGTH)
            if len(value) > limit:
                raise MalariaCellsError(f"{item.name}: at most {limit} characters, got {len(value)}")
            allowed = "\n" if item.name == "note" else ""
            if any((ord(c) < 32 or ord(c) == 127) and c not in allowed for c in value):
                raise MalariaCellsError(f"{item.name}: control characters are not allowed ({value[:40]!r})")
            object.__setattr__(self, item.name, value)
        if self.date:
            try:
                datetime.date.fromisoformat(self.date)
            except ValueError:
                raise MalariaCellsError(f"date: expected YYYY-MM-DD, got {self.date!r}") from None

    def __bool__(self) -> bool:
        return any(getattr(self, item.name) for item in fields(self))

    def to_dict(self) -> dict:
        """The non-empty identifiers, by name."""
        return {key: value for key, value in asdict(self).items() if value}

    def merged(self, other: SampleMetadata) -> SampleMetadata:
        """These identifiers, with ``other``'s non-empty ones taking their place."""
        return replace(self, **other.to_dict())


METADATA_FIELDS = tuple(item.name for item in fields(SampleMetadata))
"""The identifiers a sample may carry, in the order reports list them."""


def read_manifest(path: str | os.PathLike) -> dict[str, SampleMetadata]:
    """Per-sample identifiers from a CSV file with a header row.

    The ``sample`` column names each sample as ``screen`` does (a folder's name); any of
    :data:`METADATA_FIELDS` may follow, in any order. Example::

        sample,patient,slide,operator,date,site,note
        patient1,P-0193,S-22,A. Diallo,2026-11-30,Kisumu,"febrile, 3 days"

    Returns
    -------
    dict
        ``{sample name: SampleMetadata}``.

    Raises
    ------
    MalariaCellsError
        One line naming the file (and the row) when it cannot be read, is over
        :data:`MAX_MANIFEST_BYTES`, has no ``sample`` column, an unknown column, a sample twice,
        or a value :class:`SampleMetadata` refuses.
    """
    where = os.fspath(path)
    try:
        with open(path, "rb") as stream:
            data = stream.read(MAX_MANIFEST_BYTES + 1)
    except OSError as error:
        raise MalariaCellsError(f"{where}: cannot read the manifest ({error.strerror or error})") from None
    if len(data) > MAX_MANIFEST_BYTES:
        raise MalariaCellsError(f"{where}: manifest larger than {MAX_MANIFEST_BYTES // 2**20} MB")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise MalariaCellsError(f"{where}: manifest is not UTF-8 text (save the CSV as UTF-8)") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = [name.strip() for name in (reader.fieldnames or [])]
    if "sample" not in columns:
        raise MalariaCellsError(f"{where}: the manifest needs a header row with a 'sample' column "
                                f"(and any of {', '.join(METADATA_FIELDS)})")
    unknown = [name for name in columns if name not in ("sample",) + METADATA_FIELDS]
    if unknown:
        raise MalariaCellsError(f"{where}: unknown column {unknown[0]!r} (columns: sample, {', '.join(METADATA_FIELDS)})")
    reader.fieldnames = columns
    manifest: dict[str, SampleMetadata] = {}
    try:
        for row in reader:
            line = reader.line_num
            if None in row:
                raise MalariaCellsError(f"{where}, line {line}: more values than columns")
            name = (row.pop("sample") or "").strip()
            if not name:
                if any((value or "").strip() for value in row.values()):
                    raise MalariaCellsError(f"{where}, line {line}: no sample name")
                continue
            if name in manifest:
                raise MalariaCellsError(f"{where}, line {line}: sample {name!r} is listed twice")
            try:
                manifest[name] = SampleMetadata(**{key: value or "" for key, value in row.items()})
            except MalariaCellsError as error:
                raise MalariaCellsError(f"{where}, line {line}: {error}") from None
    except csv.Error as error:
        raise MalariaCellsError(f"{where}: not a readable CSV file ({error})") from None
    return manifest


def attach_metadata(result, manifest: dict[str, SampleMetadata] | None = None,
                    defaults: SampleMetadata | None = None) -> list[str]:
    """Put identifiers on each sample of a :class:`~.results.ScreenResult`, in place.

    Parameters
    ----------
    result : ScreenResult
        A screen's result; each sample's ``metadata`` is set.
    manifest : dict, optional
        ``{sample name: SampleMetadata}`` (:func:`read_manifest`).
    defaults : SampleMetadata, optional
        Identifiers for every sample (e.g. the operator and site of the run); a manifest row's
        non-empty values take their place.

    Returns
    -------
    list of str
        Warnings: manifest rows that name no screened sample, and screened samples the
        manifest does not list.
    """
    manifest = manifest or {}
    defaults = defaults or SampleMetadata()
    names = {sample.name for sample in result.samples}
    warnings = [f"manifest: sample {name!r} was not screened (no folder of that name)"
                for name in manifest if name not in names]
    for sample in result.samples:
        if manifest and sample.name not in manifest:
            warnings.append(f"manifest: no row for sample {sample.name!r}")
        metadata = defaults.merged(manifest.get(sample.name, SampleMetadata()))
        sample.metadata = metadata.to_dict() or None
    if not any(sample is result.summary for sample in result.samples):
        result.summary.metadata = defaults.to_dict() or None
    return warnings
