"""A screen's report folder: overlays, cell CSV, JSON and a printable HTML report."""

from __future__ import annotations

import base64
import html
import io
import os
import re
from pathlib import Path

import numpy as np

from ..files import atomic_path, write_json, write_text
from .formats import format_density, format_interval, format_percent, write_cells_csv
from .results import FieldResult, SampleResult, ScreenResult

__all__ = ["draw_overlay", "overlay_data_url", "ReportWriter", "OVERLAY_SIDE", "GALLERY_SIZE"]

OVERLAY_SIDE = 1600
"""Longer side of the overlay images: enough to see each cell, light enough to print."""
GALLERY_SIZE = 24
"""Highest-scoring cells shown as crops in the report, for a microscopist to confirm."""


def _encode(image: np.ndarray, fmt: str = ".jpg") -> bytes:
    import cv2

    options = [cv2.IMWRITE_JPEG_QUALITY, 85] if fmt == ".jpg" else []
    ok, buffer = cv2.imencode(fmt, np.ascontiguousarray(image[..., ::-1]), options)
    return buffer.tobytes()


def overlay_data_url(overlay: np.ndarray) -> str:
    """An overlay as a ``data:image/jpeg;base64,...`` URL (for the web page and REST answers)."""
    return "data:image/jpeg;base64," + base64.b64encode(_encode(overlay)).decode()


def draw_overlay(image: np.ndarray, item: FieldResult) -> np.ndarray:
    """The field with every counted cell outlined (Parasitized in red with its probability) and
    excluded objects marked; returned at most :data:`OVERLAY_SIDE` pixels on its longer side."""
    import cv2

    from ..images import resize

    scale = min(1.0, OVERLAY_SIDE / max(image.shape[:2]))
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


class ReportWriter:
    """Writes a screen's report folder as fields arrive: ``overlays/``, then ``cells.csv``,
    ``report.json`` and ``report.html`` once all are done. Every file is written atomically."""

    def __init__(self, out: str | os.PathLike, *, overwrite: bool = False):
        from ..errors import MalariaCellsError

        self.out = Path(out)
        if self.out.exists() and not self.out.is_dir():
            raise MalariaCellsError(f"{self.out}: is a file; --out names a folder for the report (never "
                                    "written over a file): choose another --out")
        if self.out.is_dir() and any(self.out.iterdir()) and not overwrite:
            raise MalariaCellsError(f"{self.out}: already exists and is not empty; choose another --out "
                                    "or pass --overwrite")
        overlays = self.out / "overlays"
        if overlays.is_symlink() or (overlays.exists() and not overlays.is_dir()):
            # overlays are written into it: a link could lead them out of --out
            raise MalariaCellsError(f"{overlays}: is a link or a file, not a folder; choose another --out")
        overlays.mkdir(parents=True, exist_ok=True)
        self.overlays: dict[str, str] = {}
        self.gallery: list[tuple[float, str, bytes]] = []

    def add(self, item: FieldResult, crops: np.ndarray, image: np.ndarray) -> None:
        # the field's own name, shortened, in characters every file system takes (a name may
        # be long, hold ':' or '?', or not be UTF-8)
        stem = re.sub(r"[^\w.-]+", "_", Path(item.path).stem)[:80]
        name = f"{len(self.overlays):03d}-{stem}.jpg"
        with atomic_path(self.out / "overlays" / name) as temporary:
            temporary.write_bytes(_encode(draw_overlay(image, item)))
        self.overlays[item.path] = f"overlays/{name}"
        for cell, crop in zip(item.cells, crops):
            if len(self.gallery) < GALLERY_SIZE or cell.probability > self.gallery[-1][0]:
                self.gallery.append((cell.probability, f"{Path(item.path).name} ({cell.x:.0f}, {cell.y:.0f})",
                                     _encode(crop, ".png")))
                self.gallery.sort(key=lambda entry: -entry[0])
                del self.gallery[GALLERY_SIZE:]

    def finish(self, result: ScreenResult) -> Path:
        data = result.to_dict()
        for entry in data["fields"]:
            entry["overlay"] = self.overlays.get(entry["path"])
        write_json(self.out / "report.json", data)
        buffer = io.StringIO()
        write_cells_csv(result, buffer)
        write_text(self.out / "cells.csv", buffer.getvalue())
        write_text(self.out / "report.html", self._html(result))
        return self.out / "report.html"

    def _html(self, result: ScreenResult) -> str:
        summary = result.summary
        colour = {"positive": "#b00020", "negative": "#1b7f3b", "review": "#a15c00"}[summary.call]
        samples = result.samples if len(result.samples) > 1 else [summary]
        rows = "".join(self._sample_row(s) for s in samples)
        fields = "".join(
            f"<tr><td>{html.escape(Path(f.path).name)}</td><td>{f.n_cells}</td><td>{f.n_parasitized}</td>"
            f"<td>{format_percent(f.parasitemia)}</td><td>{format_interval(f.parasitemia_ci)}</td>"
            f"<td>{'ok' if f.quality.get('ok') else html.escape('; '.join(f.quality.get('reasons', [])))}</td></tr>"
            for f in result.fields)
        # each overlay opens at full size; many fields are shown as thumbnails, so the page stays short
        overlays = "".join(
            f"<figure><a href=\"{html.escape(self.overlays[f.path])}\"><img src=\"{html.escape(self.overlays[f.path])}\" "
            f"alt=\"overlay\"></a><figcaption>{html.escape(Path(f.path).name)}: {f.n_parasitized} of {f.n_cells} "
            "cells</figcaption></figure>"
            for f in result.fields if f.path in self.overlays)
        layout = "overlays many" if len(self.overlays) > 4 else "overlays"
        threshold = result.model["counting_threshold"]
        gallery, marked = [], False
        for probability, where, png in self.gallery:  # highest first: the cut-off is drawn once, where it falls
            if probability < threshold and not marked:
                gallery.append(f"<p class=\"cutoff\">counting threshold {threshold:.3f}: the cells above were "
                               "counted Parasitized; those below are near misses, not counted</p>")
                marked = True
            gallery.append(
                f"<figure class=\"cell\"><img src=\"data:image/png;base64,{base64.b64encode(png).decode()}\" "
                f"alt=\"cell\"><figcaption>{probability:.3f}<br>{html.escape(where)}</figcaption></figure>")
        gallery = "".join(gallery)
        density = (f" {html.escape(format_density(summary.density))} (the red-cell count is the WHO thin-film "
                   "convention unless the patient's own was given)." if summary.density else "")
        corrected = (f" (corrected for the classifier: {format_percent(summary.corrected['parasitemia'])}, 95% CI "
                     f"{format_interval(summary.corrected['parasitemia_ci'])}%)") if summary.corrected else ""
        return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>malaria-cells screen: {html.escape(summary.name)}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }}
.call {{ font-size: 2em; font-weight: bold; color: {colour}; }}
table {{ border-collapse: collapse; margin: 1em 0; }} td, th {{ border: 1px solid #ccc; padding: 3px 8px; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
figure {{ display: inline-block; margin: 4px; vertical-align: top; }} figure img {{ max-width: 100%; }}
.overlays figure {{ width: 48%; }} .overlays.many figure {{ width: 23%; font-size: 11px; }} .cell img {{ width: 96px; height: 96px; image-rendering: pixelated; }}
.cutoff {{ border-top: 2px dashed #b00020; color: #b00020; margin: 6px 0; padding-top: 2px; }}
.cell figcaption {{ font-size: 11px; text-align: center; width: 96px; overflow-wrap: anywhere; }}
@media print {{ .overlays figure {{ width: 100%; page-break-inside: avoid; }} }}
</style></head><body>
<h1>Thin-smear screen: {html.escape(summary.name)}</h1>
<p class="call">{summary.call.upper()}</p>
<p>{html.escape('; '.join(summary.reasons))}</p>
<p>Parasitemia {format_percent(summary.parasitemia)} ({summary.n_parasitized} of {summary.n_cells} red cells), 95% CI
{format_interval(summary.parasitemia_ci)}%{corrected}.{density} Coordinates are pixels of the images as stored (EXIF orientation not applied).</p>
<table><tr><th>sample</th><th>fields</th><th>cells</th><th>parasitized</th><th>parasitemia</th><th>95% CI %</th><th>call</th></tr>{rows}</table>
<h2>Fields</h2>
<table><tr><th>field</th><th>cells</th><th>parasitized</th><th>parasitemia</th><th>95% CI %</th><th>quality</th></tr>{fields}</table>
<h2>Highest-scoring cells</h2><div>{gallery}</div>
<h2>Overlays</h2><p>Counted cells outlined in green; cells called Parasitized in red with their probability; excluded objects (cut by the edge, clumps of overlapping cells, platelets, white cells, printed marks) crossed in grey.</p>
<p>Click an overlay to open it at full size.</p><div class="{layout}">{overlays}</div>
<p><small>malaria-cells, model {html.escape(os.path.basename(result.model['path']))}, counting threshold
{result.model['counting_threshold']:.4f}. A screening aid: a microscopist confirms every call.</small></p>
</body></html>
"""

    @staticmethod
    def _sample_row(sample: SampleResult) -> str:
        return (f"<tr><td>{html.escape(sample.name)}</td><td>{sample.fields}</td><td>{sample.n_cells}</td>"
                f"<td>{sample.n_parasitized}</td><td>{format_percent(sample.parasitemia)}</td>"
                f"<td>{format_interval(sample.parasitemia_ci)}</td><td>{sample.call}</td></tr>")

