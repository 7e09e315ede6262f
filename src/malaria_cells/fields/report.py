"""A screen's report folder: one report per sample (HTML and PDF), an index, overlays, CSV, JSON.

What a microscopist signs is one sample: its report opens with the sample's identifiers, the
call and its reasons, the parasitemia (raw and corrected, each with its interval), parasites
per microlitre and the life stages; then the cells that drove the call, each at the field's own
resolution beside a heat map of what the classifier looked at, with the counting threshold
drawn between counted cells and near misses; then the fields and their overlays. Several
samples get an index. A pooled figure over samples is shown only when asked for
(``pooled=True``): pooling a healthy and an infected patient describes neither.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import os
import re
from pathlib import Path
from typing import Callable

import numpy as np

from ..files import atomic_path, write_json, write_text
from .formats import format_density, format_interval, format_percent, write_cells_csv
from .gallery import GALLERY_SIZE, NEAR_MISSES, Gallery, png_bytes
from .results import FieldResult, SampleResult, ScreenResult

__all__ = ["draw_overlay", "field_pictures", "overlay_data_url", "ReportWriter", "OVERLAY_SIDE", "THUMBNAIL_SIDE", "GALLERY_SIZE",
           "NEAR_MISSES", "PDF_OVERLAYS", "write_pdf"]

OVERLAY_SIDE = 4096
"""Longer side of the overlay files: the field's own resolution up to this, to zoom into a cell."""
INLINE_OVERLAY_SIDE = 1024
"""Longer side of the one overlay per field a report held in memory carries (a server's answer)."""
THUMBNAIL_SIDE = 640
"""Longer side of the overlay pictures shown in the report (each links to its full overlay)."""
PDF_OVERLAYS = 6
"""Overlays in a PDF (the fields with most Parasitized cells first); the HTML report has all."""
COLLAPSE_OVERLAYS = 12
"""Above this many fields, the report's overlays are folded (one click shows them)."""


def _encode(image: np.ndarray, fmt: str = ".jpg", quality: int = 85) -> bytes:
    import cv2

    options = [cv2.IMWRITE_JPEG_QUALITY, quality] if fmt == ".jpg" else []
    ok, buffer = cv2.imencode(fmt, np.ascontiguousarray(image[..., ::-1]), options)
    return buffer.tobytes()


def _png_url(image: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def overlay_data_url(overlay: np.ndarray) -> str:
    """An overlay as a ``data:image/jpeg;base64,...`` URL (for the web page and REST answers)."""
    return "data:image/jpeg;base64," + base64.b64encode(_encode(overlay)).decode()


def draw_overlay(image: np.ndarray, item: FieldResult, *, side: int = OVERLAY_SIDE) -> np.ndarray:
    """The field with every counted cell outlined (Parasitized in red with its probability) and
    excluded objects marked; returned at most ``side`` pixels on its longer side."""
    import cv2

    from ..images import resize

    scale = min(1.0, side / max(image.shape[:2]))
    canvas = resize(image, (round(image.shape[1] * scale), round(image.shape[0] * scale))).copy()
    factor = canvas.shape[1] / item.width
    thickness = max(1, round(canvas.shape[1] / 800))
    for obj in item.excluded:
        x, y = round(obj["x"] * factor), round(obj["y"] * factor)
        cv2.drawMarker(canvas, (x, y), (90, 90, 90), cv2.MARKER_TILTED_CROSS, max(6, round(8 * thickness)), thickness)
    for cell in item.cells:
        x0, y0, x1, y1 = (round(v * factor) for v in cell.bbox)
        centre, axes = ((x0 + x1) // 2, (y0 + y1) // 2), (max(1, (x1 - x0) // 2), max(1, (y1 - y0) // 2))
        infected = cell.label == "Parasitized"
        cv2.ellipse(canvas, centre, axes, 0, 0, 360, (230, 0, 0) if infected else (0, 170, 60),
                    2 * thickness if infected else thickness)
        if infected:
            cv2.putText(canvas, f"{cell.probability:.2f}", (x0, max(10, y0 - 3)), cv2.FONT_HERSHEY_SIMPLEX,
                        0.4 * thickness, (230, 0, 0), thickness, cv2.LINE_AA)
    return canvas


def field_pictures(image: np.ndarray, item: FieldResult) -> tuple[bytes, bytes]:
    """A field's overlay (up to :data:`OVERLAY_SIDE` pixels) and its thumbnail, as JPEG bytes:
    what :meth:`ReportWriter.add_pictures` writes."""
    from ..images import resize

    overlay = draw_overlay(image, item)
    scale = min(1.0, THUMBNAIL_SIDE / max(overlay.shape[:2]))
    small = resize(overlay, (round(overlay.shape[1] * scale), round(overlay.shape[0] * scale))) \
        if scale < 1 else overlay
    return _encode(overlay), _encode(small, quality=80)


def write_pdf(page: str, target: str | os.PathLike, *, base_url: str | os.PathLike) -> None:
    """Render an HTML page to a PDF file with WeasyPrint (atomically).

    Raises
    ------
    OSError
        When WeasyPrint's libraries (Pango) cannot be loaded on this computer.
    """
    HTML = _weasyprint_html()
    with atomic_path(target) as temporary:
        HTML(string=_printable(page), base_url=str(base_url),
             url_fetcher=_local_fetcher(Path(base_url))).write_pdf(str(temporary))


def _local_fetcher(folder: Path | None):
    """A WeasyPrint URL fetcher allowed only inline ``data:`` URLs and files inside ``folder``:
    a report never reaches the network or another folder."""
    from urllib.parse import unquote, urlparse

    from weasyprint.urls import URLFetcher

    root = None if folder is None else folder.resolve()

    class LocalOnly(URLFetcher):
        def fetch(self, url, headers=None):
            inside = (root is not None and url.startswith("file://")
                      and Path(unquote(urlparse(url).path)).resolve().is_relative_to(root))
            if not (url.startswith("data:") or inside):
                raise ValueError(f"not fetched: {url[:80]}")
            return super().fetch(url, headers)

    return LocalOnly(allowed_protocols=("data", "file"))


def _weasyprint_html():
    """WeasyPrint's ``HTML``, imported without letting it loosen Pillow for everyone else.

    Importing WeasyPrint sets Pillow's global ``ImageFile.LOAD_TRUNCATED_IMAGES``: from then on
    every truncated upload would be decoded as if whole. The flag is put back as it was.
    """
    from PIL import ImageFile

    before = ImageFile.LOAD_TRUNCATED_IMAGES
    try:
        from weasyprint import HTML
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before
    return HTML


def _printable(page: str) -> str:
    """The page with any undecodable file-name bytes (surrogates) shown as U+FFFD, as a PDF needs."""
    return page.encode("utf-8", "replace").decode("utf-8")


def _slug(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name).strip("._")[:80] or "sample"


class ReportWriter:
    """Writes a screen's report folder as fields arrive, then the reports once all are done.

    The folder holds ``overlays/`` (each field at up to :data:`OVERLAY_SIDE` pixels, and a
    thumbnail), ``cells.csv``, ``report.json`` and, for one sample, ``report.html`` and
    ``report.pdf``; for several, ``index.html`` and each sample's ``<sample>.html`` and
    ``<sample>.pdf``. Every file is written atomically; a non-empty folder is written into
    only with ``overwrite``, never through a link.

    Parameters
    ----------
    out : path
        The report folder.
    overwrite : bool
        Write into a non-empty folder.
    pdf : bool
        Write each sample's report as PDF too (WeasyPrint); where it cannot be loaded, the
        HTML is written and :attr:`warnings` says why there is no PDF.
    pooled : bool
        Show the pooled figures of all samples in the index.
    explain : callable, optional
        ``explain(crops) -> heat`` (``(n, size, size)`` in [0, 1]) for the classifier's crops
        of the gallery cells, e.g. :func:`malaria_cells.explain.explain` bound to the model;
        without it the gallery has no heat maps.
    stage_figures : dict, optional
        The stage model's measured figures, shown beside the stage counts.
    """

    def __init__(self, out: str | os.PathLike | None, *, overwrite: bool = False, pdf: bool = True,
                 pooled: bool = False, explain: Callable[[np.ndarray], np.ndarray] | None = None,
                 stage_figures: dict | None = None):
        from ..errors import MalariaCellsError

        self.pdf, self.pooled, self.explain, self.stage_figures = pdf, pooled, explain, stage_figures
        self.overlays: dict[str, tuple[str, str]] = {}
        self.gallery = Gallery()
        """The cells of each sample's gallery (also what the records keep for review)."""
        self.warnings: list[str] = []
        self.started = datetime.datetime.now(datetime.timezone.utc).astimezone()
        self._fields_added = 0
        self._written: set[str] = set()
        self.out = None if out is None else Path(out)
        if self.out is None:  # in memory (a server's answer): pictures become data URLs
            return
        if self.out.exists() and not self.out.is_dir():
            raise MalariaCellsError(f"{self.out}: is a file; --out names a folder for the report (never "
                                    "written over a file): choose another --out")
        if self.out.is_dir() and any(self.out.iterdir()) and not overwrite:
            raise MalariaCellsError(f"{self.out}: already exists and is not empty; choose another --out "
                                    "or pass --overwrite")
        overlays = self.out / "overlays"
        for folder in (overlays, overlays / "small"):
            if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
                # files are written into it: a link could lead them out of --out
                raise MalariaCellsError(f"{folder}: is a link or a file, not a folder; choose another --out")
        (overlays / "small").mkdir(parents=True, exist_ok=True)

    def add(self, item: FieldResult, crops: np.ndarray, image: np.ndarray) -> None:
        """Write a field's overlay and keep its best cells for its sample's gallery."""
        if self.out is None:  # one picture per field, inline: a request's answer stays small
            picture = overlay_data_url(draw_overlay(image, item, side=INLINE_OVERLAY_SIDE))
            self.overlays[item.path] = (picture, picture)
            self._fields_added += 1
        else:
            self.add_pictures(item, field_pictures(image, item))
        self.gallery.add(item, crops, image)

    def add_pictures(self, item: FieldResult, pictures: tuple[bytes, bytes]) -> None:
        """Write a field's overlay and thumbnail made elsewhere (:func:`field_pictures`, e.g. on
        the Dask worker that screened it); its gallery cells are added apart."""
        if self.out is None:
            from ..errors import MalariaCellsError

            raise MalariaCellsError("this report is held in memory (no folder given): use add()")
        # the field's own name, shortened, in characters every file system takes (a name may
        # be long, hold ':' or '?', or not be UTF-8)
        stem = re.sub(r"[^\w.-]+", "_", Path(item.path).stem)[:80]
        name = f"{self._fields_added:03d}-{stem}.jpg"
        overlay, small = pictures
        with atomic_path(self.out / "overlays" / name) as temporary:
            temporary.write_bytes(overlay)
        with atomic_path(self.out / "overlays" / "small" / name) as temporary:
            temporary.write_bytes(small)
        self.overlays[item.path] = (f"overlays/{name}", f"overlays/small/{name}")
        self._fields_added += 1

    def finish(self, result: ScreenResult) -> Path:
        """Write ``report.json``, ``cells.csv`` and the reports; returns the page to open first."""
        if self.out is None:
            from ..errors import MalariaCellsError

            raise MalariaCellsError("this report is held in memory (no folder given): use build()")
        data = result.to_dict()
        for entry in data["fields"]:
            entry["overlay"] = self.overlays.get(entry["path"], (None,))[0]
        write_json(self.out / "report.json", data)
        buffer = io.StringIO()
        write_cells_csv(result, buffer)
        write_text(self.out / "cells.csv", buffer.getvalue())
        single = len(result.samples) <= 1
        samples = result.samples or [result.summary]
        names = self._file_names(samples, single)
        for sample, name in zip(samples, names):
            fields = [f for f in result.fields if f.sample == sample.name or single]
            gallery = self._gallery(sample.name if not single else None)
            self._write_sample(result, sample, fields, gallery, name)
        if single:
            return self.out / f"{names[0]}.html"
        write_text(self.out / "index.html", self._index_html(result, names))
        return self.out / "index.html"

    def build(self, result: ScreenResult, *, deadline: float | None = None) -> dict:
        """The report of a one-sample screen in memory, self-contained (pictures inlined):
        ``{"html": str, "pdf": bytes or None, "gallery": [...]}``, each gallery cell as
        ``{"probability", "counted", "field", "x", "y", "stage", "stage_probability", "image", "heat"}``
        with its pictures as data URLs. Past ``deadline`` (``time.perf_counter()``), the heat
        maps and then the PDF are left out, each with a warning, so a request stays in time."""
        import time

        def late(what: str) -> bool:
            if deadline is not None and time.perf_counter() > deadline:
                self.warnings.append(f"{what} left out: the request's time limit was reached")
                return True
            return False

        sample = result.summary
        gallery = self._gallery(None, heat=self.explain is not None and not late("heat maps"))
        page = self._sample_html(result, sample, result.fields, gallery)
        pdf = None
        if self.pdf and not late("the PDF"):
            try:
                printed = self._sample_html(result, sample, result.fields, gallery, printed=True)
                pdf = _weasyprint_html()(string=_printable(printed), url_fetcher=_local_fetcher(None)).write_pdf()
            except (OSError, ImportError) as error:
                self.warnings.append(f"no PDF: WeasyPrint cannot run here ({str(error).splitlines()[0]})")
        cells = [{"probability": round(float(e["cell"].probability), 6), "counted": e["cell"].counted,
                  "field": e["cell"].field, "x": e["cell"].x, "y": e["cell"].y, "stage": e["cell"].stage,
                  "stage_probability": e["cell"].stage_probability, "image": e["native"], "heat": e["heat"]}
                 for e in gallery]
        return {"html": page, "pdf": pdf, "gallery": cells}

    @staticmethod
    def _file_names(samples, single: bool) -> list[str]:
        """Each sample's report file name (without suffix), in order, never two alike."""
        if single:
            return ["report"]
        names, taken = [], {"index", "report", "cells"}
        for sample in samples:
            slug = base = _slug(sample.name)
            k = 2
            while slug.lower() in taken:
                slug, k = f"{base}-{k}", k + 1
            taken.add(slug.lower())
            names.append(slug)
        return names

    def _gallery(self, sample: str | None, *, heat: bool = True) -> list[dict]:
        """The sample's gallery (every sample's with None), highest first, each cell with its
        pictures (its heat map too, with ``heat`` and an ``explain``)."""
        entries = self.gallery.cells(sample)
        maps = None
        if heat and self.explain is not None and entries:
            try:
                maps = self.explain(np.stack([c.crop for c in entries]))
            except Exception as error:  # noqa: BLE001 - the report stands without its heat maps
                self.warnings.append(f"heat maps not drawn ({type(error).__name__}: "
                                     f"{str(error).splitlines()[0] if str(error) else 'no detail'})")
        out = []
        for k, cell in enumerate(entries):
            picture = {"cell": cell, "native": _png_url(cell.native), "heat": None}
            if maps is not None:
                from ..explain import heat_overlay

                picture["heat"] = _png_url(heat_overlay(cell.crop, maps[k]))
            out.append(picture)
        return out

    def _write_sample(self, result, sample, fields, gallery, name: str) -> None:
        write_text(self.out / f"{name}.html", self._sample_html(result, sample, fields, gallery))
        if not self.pdf:
            return
        try:
            write_pdf(self._sample_html(result, sample, fields, gallery, printed=True), self.out / f"{name}.pdf",
                      base_url=self.out)
            self._written.add(f"{name}.pdf")
        except (OSError, ImportError) as error:  # Pango missing: the HTML report stands, and says how to print
            self.warnings.append(f"{name}.pdf not written: WeasyPrint cannot run here ({str(error).splitlines()[0]}); "
                                 f"print {name}.html from a browser instead")

    def _sample_html(self, result: ScreenResult, sample: SampleResult, fields, gallery, *, printed: bool = False) -> str:
        colour = {"positive": "#b00020", "negative": "#1b7f3b", "review": "#a15c00"}[sample.call]
        model = result.model
        figures = model.get("field_figures") or {}
        identity = "".join(f"<tr><th>{html.escape(key)}</th><td>{html.escape(value)}</td></tr>"
                           for key, value in _identity(sample, self.started).items())
        overlays = [f for f in fields if f.path in self.overlays]
        if printed:
            overlays = sorted(overlays, key=lambda f: -f.n_parasitized)[:PDF_OVERLAYS]
        def picture(f):
            img = f"<img src=\"{html.escape(self.overlays[f.path][1])}\" alt=\"overlay\">"
            # a PDF travels without the folder, and an inline report has one picture: no links
            return img if printed or self.out is None else f"<a href=\"{html.escape(self.overlays[f.path][0])}\">{img}</a>"

        overlay_html = "".join(
            f"<figure>{picture(f)}<figcaption>{html.escape(Path(f.path).name)}: {f.n_parasitized} of {f.n_cells} "
            "cells</figcaption></figure>" for f in overlays)
        more = (f"<p>{len(overlays)} of {len([f for f in fields if f.path in self.overlays])} overlays (those with the "
                "most Parasitized cells); the HTML report has every field.</p>"
                if printed and len(overlays) < len([f for f in fields if f.path in self.overlays]) else "")
        field_rows = "".join(
            f"<tr><td>{html.escape(Path(f.path).name)}</td><td>{f.n_cells}</td><td>{f.n_parasitized}</td>"
            f"<td>{format_percent(f.parasitemia)}</td><td>{format_interval(f.parasitemia_ci)}</td>"
            f"<td>{'ok' if f.quality.get('ok') else html.escape('; '.join(f.quality.get('reasons', [])))}</td></tr>"
            for f in fields)
        return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>malaria-cells: {html.escape(sample.name)} {sample.call.upper()}</title>
<style>{_CSS}
.call {{ color: {colour}; }}</style></head><body>
<header><h1>Thin-smear malaria screen: {html.escape(sample.name)}</h1>
<table class="identity">{identity}</table></header>
<p class="call">{sample.call.upper()}</p>
<ul class="reasons">{''.join(f'<li>{html.escape(r)}</li>' for r in sample.reasons)}</ul>
{_figures_table(sample)}
{self._stages_html(sample)}
<h2>Cells that drove the call</h2>
{_gallery_html(gallery, model['counting_threshold'])}
<h2>Fields ({sample.fields})</h2>
<table class="fields"><tr><th>field</th><th>cells</th><th>parasitized</th><th>parasitemia</th><th>95% CI % (raw)</th><th>quality</th></tr>{field_rows}</table>
<h2>Overlays</h2><p>Counted red cells outlined in green; cells called Parasitized in red with their probability;
excluded objects (cut by the edge, clumps of overlapping cells, platelets, white cells, printed marks) crossed in grey.
{'Click an overlay to open it at the photograph&#39;s resolution.' if not printed else ''}</p>
{more}{_collapsed(f'<div class="overlays{" many" if len(overlays) > 4 else ""}">{overlay_html}</div>',
                  len(overlays), printed)}
{_model_html(model, figures, result)}
</body></html>
"""

    def _stages_html(self, sample: SampleResult) -> str:
        stages = getattr(sample, "stages", None)
        if not stages:
            return ""
        figures = self.stage_figures or {}
        rare = set(figures.get("too_rare", []))
        rows = []
        for stage, count in stages.items():
            recall, precision = (figures.get("recall") or {}).get(stage), (figures.get("precision") or {}).get(stage)
            support = (figures.get("support") or {}).get(stage)
            quality = (f"leave-slide-out recall {recall:.0%}, precision {precision:.0%} ({support} training cells)"
                       if recall is not None and precision is not None else "")
            if stage in rare:
                quality = (f"{support} training cell{'s' if support != 1 else ''}: " if support is not None else "") + \
                    "too rarely seen in training to be told reliably; treat as unconfirmed"
            rows.append(f"<tr><td>{html.escape(stage)}</td><td>{count}</td><td>{html.escape(quality)}</td></tr>")
        gametocytes = stages.get("gametocyte", 0)
        line = (f"<p class=\"gametocytes\">Gametocytes seen: {gametocytes} (the patient can infect mosquitoes).</p>"
                if gametocytes else "<p class=\"gametocytes\">No gametocytes among the counted cells.</p>")
        return (f"<h2>Life stages of the Parasitized cells</h2><table class=\"stages\"><tr><th>stage</th><th>cells</th>"
                f"<th>how well the stage model tells it</th></tr>{''.join(rows)}</table>{line}"
                "<p class=\"small\">Species is not claimed: no data this model was trained on tells species apart.</p>")

    def _index_html(self, result: ScreenResult, names: list[str]) -> str:
        rows = []
        entries = list(zip(result.samples, names)) + ([(result.summary, None)] if self.pooled else [])
        for sample, name in entries:
            link = (f"<a href=\"{html.escape(name)}.html\">{html.escape(sample.name)}</a>"
                    + (f" (<a href=\"{html.escape(name)}.pdf\">PDF</a>)" if f"{name}.pdf" in self._written else "")
                    ) if name else "all samples pooled"
            meta = "; ".join(f"{k} {v}" for k, v in (sample.metadata or {}).items() if k in ("patient", "slide"))
            density = format_density(sample.density) if sample.density else "-"
            rows.append(f"<tr><td>{link}</td><td>{html.escape(meta)}</td><td class=\"c-{sample.call}\">"
                        f"{sample.call.upper()}</td><td>{format_percent(sample.parasitemia)}</td>"
                        f"<td>{format_interval(sample.parasitemia_ci)}</td><td>{html.escape(density)}</td>"
                        f"<td>{sample.n_cells}</td><td>{sample.fields}</td></tr>")
        skipped = "".join(f"<li>{html.escape(p)}: {html.escape(r)}</li>" for p, r in result.skipped)
        return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>malaria-cells: {len(result.samples)} samples</title>
<style>{_CSS}</style></head><body>
<h1>Thin-smear malaria screen: {len(result.samples)} samples</h1>
<p>Screened {self.started:%Y-%m-%d %H:%M %Z}. Each sample has its own report; open it to see the cells behind its call.</p>
<table><tr><th>sample</th><th>identifiers</th><th>call</th><th>parasitemia</th><th>95% CI % (raw)</th>
<th>parasites per microlitre</th><th>cells</th><th>fields</th></tr>{''.join(rows)}</table>
{f'<h2>Not screened</h2><ul>{skipped}</ul>' if skipped else ''}
{_model_html(result.model, result.model.get('field_figures') or {}, result)}
</body></html>
"""


def _collapsed(block: str, count: int, printed: bool) -> str:
    """Many overlays folded away behind one line, so the report stays short (a PDF shows a few)."""
    if printed or count <= COLLAPSE_OVERLAYS:
        return block
    return f"<details><summary>Show all {count} overlays</summary>{block}</details>"


def _identity(sample: SampleResult, started: datetime.datetime) -> dict:
    metadata = sample.metadata or {}
    labels = {"patient": "patient", "slide": "slide", "date": "blood taken", "operator": "operator", "site": "site",
              "note": "note"}
    out = {"sample": sample.name}
    out.update({labels[key]: value for key, value in metadata.items() if key in labels})
    out["screened"] = f"{started:%Y-%m-%d %H:%M %Z}"
    return out


def _figures_table(sample: SampleResult) -> str:
    rows = [("parasitemia (raw)", f"{format_percent(sample.parasitemia)} ({sample.n_parasitized} of {sample.n_cells} "
             f"red cells)", f"{format_interval(sample.parasitemia_ci)}%")]
    if sample.corrected:
        rows.append(("parasitemia corrected for the classifier's measured sensitivity and false positives",
                     format_percent(sample.corrected["parasitemia"]), f"{format_interval(sample.corrected['parasitemia_ci'])}%"))
    if sample.density:
        low, high = sample.density["per_ul_ci"]
        rows.append(("parasites per microlitre", f"{sample.density['per_ul']:,.0f}", f"{low:,.0f} to {high:,.0f}"))
    body = "".join(f"<tr><td>{html.escape(a)}</td><td>{html.escape(b)}</td><td>{html.escape(c)}</td></tr>"
                   for a, b, c in rows)
    note = (f"<p class=\"small\">Parasites per microlitre: the raw parasitemia and its interval times "
            f"{sample.density['rbc_per_ul']:,.0f} red cells per microlitre (WHO's thin-film convention of 5,000,000 "
            "unless the patient's own count was given).</p>") if sample.density else ""
    return (f"<table class=\"figures\"><tr><th></th><th>estimate</th><th>95% interval</th></tr>{body}</table>{note}"
            "<p class=\"small\">Coordinates are pixels of the images as stored (EXIF orientation not applied).</p>")


def _gallery_html(gallery: list[dict], threshold: float) -> str:
    if not gallery:
        return "<p>No cell scored high enough to show.</p>"
    parts, marked = [], False
    for entry in gallery:  # highest first: the cut-off is drawn once, where it falls
        cell = entry["cell"]
        if not cell.counted and not marked:
            parts.append(f"<p class=\"cutoff\">counting threshold {threshold:.3f}: the cells above were counted "
                         "Parasitized; those below are near misses, not counted</p>")
            marked = True
        stage = (f"<br>{html.escape(cell.stage)} {cell.stage_probability:.2f}"
                 if cell.counted and cell.stage and cell.stage_probability is not None else "")
        heat = f"<img class=\"heat\" src=\"{entry['heat']}\" alt=\"heat map\">" if entry["heat"] else ""
        parts.append(f"<figure class=\"cell\"><img src=\"{entry['native']}\" alt=\"cell\">{heat}"
                     f"<figcaption>{cell.probability:.3f}{stage}<br>{html.escape(cell.field)} "
                     f"({cell.x:.0f}, {cell.y:.0f})</figcaption></figure>")
    if any(entry["heat"] for entry in gallery):
        parts.insert(0, "<p class=\"small\">Each cell as photographed, and beside it a heat map of the parts of the "
                        "cell that raised its score most (red: most).</p>")
    return f"<div class=\"gallery\">{''.join(parts)}</div>"


def _model_html(model: dict, figures: dict, result: ScreenResult) -> str:
    from .. import __version__

    nested = figures.get("nested") or {}
    found = nested.get("found_of_annotated_infected")
    measured = ""
    if nested:
        measured = (f" Measured by leave-slide-out cross-validation on {nested.get('fields', '?')} fields of the "
                    f"shared IML P. vivax slides: {found[0]} of {found[1]} infected cells found, "
                    if found else " Measured by leave-slide-out cross-validation: ")
        measured += (f"{100 * nested.get('false_positive_rate', 0):.2f}% of uninfected cells called Parasitized, "
                     f"parasitemia off by {nested.get('parasitemia_mae_points', 0):.2f} points per field on average.")
    trained = f", trained {html.escape(str(model['trained_at'])[:10])}" if model.get("trained_at") else ""
    return (f"<footer><p class=\"small\">malaria-cells {html.escape(__version__)}; field model "
            f"{html.escape(str(model.get('path')))}{trained}, counting threshold {model['counting_threshold']:.4f}."
            f"{html.escape(measured)} Slides unlike those may score lower: the reasons above say when a field could not "
            "be read. A screening aid: a microscopist confirms every call.</p></footer>")


_CSS = """
body { font: 13px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.5em; margin: 0 0 .3em; } h2 { font-size: 1.15em; margin: 1.2em 0 .4em; }
.call { font-size: 2.2em; font-weight: bold; margin: .2em 0; }
.reasons { margin: 0 0 .6em; padding-left: 1.2em; }
table { border-collapse: collapse; margin: .5em 0; } td, th { border: 1px solid #ccc; padding: 2px 8px; text-align: right; }
td:first-child, th:first-child { text-align: left; } .identity th { text-align: left; background: #f4f4f4; }
.stages td:last-child, .stages th:last-child { text-align: left; }
.identity td { text-align: left; } .figures td:first-child { max-width: 28em; }
.small { font-size: 11px; color: #555; }
.c-positive { color: #b00020; font-weight: bold; } .c-negative { color: #1b7f3b; font-weight: bold; }
.c-review { color: #a15c00; font-weight: bold; }
figure { display: inline-block; margin: 4px; vertical-align: top; } figure img { max-width: 100%; }
.overlays figure { width: 48%; } .overlays.many figure { width: 23%; font-size: 11px; }
.cell img { width: 96px; height: 96px; object-fit: contain; background: #000; }
.cell img.heat { margin-left: 2px; }
.cell figcaption { font-size: 11px; text-align: center; width: 196px; overflow-wrap: anywhere; }
.cutoff { border-top: 2px dashed #b00020; color: #b00020; margin: 6px 0; padding-top: 2px; }
footer { margin-top: 2em; border-top: 1px solid #ccc; }
@page { size: A4; margin: 14mm 12mm; @bottom-right { content: "page " counter(page) " of " counter(pages); font-size: 9px; } }
@media print { body { margin: 0; } .overlays figure { width: 48%; page-break-inside: avoid; }
  .cell { page-break-inside: avoid; } }
"""
