"""Screening's public names under the module name ``malaria_cells.screening``: see
:mod:`malaria_cells.fields`, where they live."""

from .fields import (DECODE_SIDE, MIN_CELLS, NEGATIVE_P, POSITIVE_P, RULE_OUT, CellResult, FieldResult,  # noqa: F401
                     SampleResult, ScreenResult, Screener, call_sample, counting_probability, group_samples,
                     pool_fields, screen, screen_image)

__all__ = ["CellResult", "FieldResult", "SampleResult", "ScreenResult", "Screener", "screen", "screen_image",
           "call_sample", "group_samples", "pool_fields", "counting_probability", "MIN_CELLS", "POSITIVE_P",
           "NEGATIVE_P", "RULE_OUT", "DECODE_SIDE"]
