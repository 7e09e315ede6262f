"""Screening whole smear photographs: every red cell found, classified and counted.

The rooms, one concern each:

- :mod:`.detection`: the :class:`Detector` protocol and the shipped :class:`ClassicalDetector`;
- :mod:`.applicability`: whether a field can be read at all, and why not;
- :mod:`.stain`: each field's cells brought to the stain of the model's reference;
- :mod:`.crops`: cutting each counted cell as the cell model's training crops look;
- :mod:`.figures`: :class:`FieldFigures`, a classifier's counting threshold and measured figures;
- :mod:`.call`: the sample call (positive / negative / review) and the corrected parasitemia;
- :mod:`.screener`: :class:`Screener`, which composes the three and runs the one loop;
- :mod:`.distributed`: the samples of a screen spread over Dask workers (imported on its own:
  it needs ``distributed``);
- :mod:`.results`: the typed results and their JSON;
- :mod:`.formats`: the output formats (table, JSON, CSV) in one registry;
- :mod:`.gallery`: each sample's best counted cells and near misses (report and review);
- :mod:`.report`: the report folder (overlays, HTML);
- :mod:`.truth`: ground-truth readers and scores;
- :mod:`.training`: making a field model (crops, nested cross-validation, threshold, shipping).

Interval and tail statistics live in :mod:`malaria_cells.proportions`.
"""

from .call import MIN_CELLS, NEGATIVE_P, POSITIVE_P, RULE_OUT, call_sample
from .detection import ClassicalDetector, Detector, FieldDetection, FieldObject, detect_cells
from .figures import FieldFigures
from .formats import FORMATS, render
from .gallery import Gallery
from .results import CellResult, FieldResult, SampleResult, ScreenResult
from .screener import DECODE_SIDE, FieldTimeout, Screener, counting_probability, group_samples, pool_fields, screen, screen_image

__all__ = ["Screener", "FieldTimeout", "screen", "screen_image", "Detector", "ClassicalDetector", "FieldDetection", "FieldObject",
           "detect_cells", "FieldFigures", "CellResult", "FieldResult", "SampleResult", "ScreenResult", "FORMATS",
           "render", "call_sample", "counting_probability", "group_samples", "pool_fields", "MIN_CELLS", "POSITIVE_P",
           "NEGATIVE_P", "RULE_OUT", "DECODE_SIDE", "Gallery"]
