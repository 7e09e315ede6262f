"""The sample call: positive, negative or review, with its reasons.

- ``review`` when fewer than :data:`MIN_CELLS` cells were counted on fields of good quality,
  or when half the fields or more are of low quality;
- ``positive`` when the number of Parasitized cells is too large to be false alarms alone:
  under the classifier's field false-positive rate, the chance of seeing that many or more is
  below :data:`POSITIVE_P` (so a healthy patient's scattered false alarms stay negative);
- ``negative`` when the count is what false alarms alone would give (chance at least
  :data:`NEGATIVE_P`) and the parasitemia's upper 95% bound (corrected for the classifier
  where its figures are known) is below :data:`RULE_OUT`, so an infection at or above that
  level is ruled out;
- ``review`` otherwise (borderline), and in place of ``negative`` when most good fields are
  out of focus (blur loses infected cells, so their absence proves little; a positive stands,
  since blur adds no false alarm).
"""

from __future__ import annotations

from ..proportions import binomial_tail, rogan_gladen, wilson_interval

__all__ = ["call_sample", "corrected_parasitemia", "parasitemia_interval", "parasite_density", "MIN_CELLS",
           "POSITIVE_P", "NEGATIVE_P", "RULE_OUT", "RBC_PER_UL"]

MIN_CELLS = 200
"""Fewest counted cells (on good fields) for a positive or negative call."""
POSITIVE_P = 0.001
"""Chance under false alarms alone below which a count is called positive."""
NEGATIVE_P = 0.05
"""Chance under false alarms alone at or above which a count may be called negative."""
RULE_OUT = 0.01
"""Parasitemia that a negative call rules out (upper 95% bound of the corrected estimate)."""


RBC_PER_UL = 5_000_000
"""Red cells per microlitre assumed when the patient's own count is not given: the WHO
thin-film convention (parasites/uL = parasitized red cells / red cells x 5,000,000)."""


def parasite_density(n_parasitized: int, n_cells: int, rbc_per_ul: float = RBC_PER_UL) -> dict | None:
    """Parasites per microlitre of blood, with the parasitemia's 95% Wilson interval carried
    through: ``{"per_ul", "per_ul_ci", "rbc_per_ul"}`` (None with no cells).

    Parameters
    ----------
    rbc_per_ul : float
        The patient's red-cell count per microlitre (default :data:`RBC_PER_UL`).
    """
    if not n_cells:
        return None
    low, high = wilson_interval(n_parasitized, n_cells)
    return {"per_ul": n_parasitized / n_cells * rbc_per_ul, "per_ul_ci": [low * rbc_per_ul, high * rbc_per_ul],
            "rbc_per_ul": rbc_per_ul}


def parasitemia_interval(n_parasitized: int, n_cells: int) -> list[float] | None:
    """The 95% Wilson interval of ``n_parasitized / n_cells`` (None with no cells)."""
    return wilson_interval(n_parasitized, n_cells) if n_cells else None


def corrected_parasitemia(n_parasitized: int, n_cells: int, figures) -> dict | None:
    """Rogan-Gladen parasitemia and interval, given the classifier's field figures.

    Parameters
    ----------
    figures : FieldFigures or None
        The classifier's measured field sensitivity and specificity (None: no correction).

    Returns
    -------
    dict or None
        ``{"parasitemia", "parasitemia_ci", "sensitivity", "specificity"}``.
    """
    if figures is None or not n_cells:
        return None
    sensitivity, specificity = figures.sensitivity, figures.specificity
    point = rogan_gladen(n_parasitized / n_cells, sensitivity, specificity)
    if point is None:
        return None
    low, high = wilson_interval(n_parasitized, n_cells)
    return {"parasitemia": point, "parasitemia_ci": [rogan_gladen(low, sensitivity, specificity),
                                                     rogan_gladen(high, sensitivity, specificity)],
            "sensitivity": sensitivity, "specificity": specificity}


def call_sample(n_parasitized: int, n_cells: int, *, false_positive_rate: float, good_fields: int = 1,
                fields: int = 1, corrected: dict | None = None, unsure_fields: int = 0,
                unsure_reason: str = "out of focus") -> tuple[str, list[str]]:
    """The sample call and its reasons, by the rule in this module's docstring.

    Parameters
    ----------
    n_parasitized, n_cells : int
        Counts on the sample's good fields.
    false_positive_rate : float
        The classifier's rate of false alarms on uninfected field cells.
    good_fields, fields : int
        Fields of good quality, and all fields.
    corrected : dict, optional
        :func:`corrected_parasitemia`'s result; its upper bound is the one a negative call
        must clear (else the raw Wilson bound).
    unsure_fields : int
        Good fields that may hide pale parasites (out of focus, over-exposed); when they are
        half or more, a negative becomes ``review``, saying why with ``unsure_reason`` (what
        those fields are: "out of focus (...)").
    """
    if n_cells < MIN_CELLS:
        return "review", [f"only {n_cells} cells counted on good fields (at least {MIN_CELLS} needed)"]
    if fields and good_fields * 2 <= fields:
        return "review", [f"{fields - good_fields} of {fields} fields are of low quality"]
    chance = binomial_tail(n_parasitized, n_cells, false_positive_rate)
    expected = n_cells * false_positive_rate
    if chance < POSITIVE_P:
        return "positive", [f"{n_parasitized} parasitized cells where false alarms alone would give about "
                            f"{expected:.1f} (chance {chance:.1e})"]
    upper = corrected["parasitemia_ci"][1] if corrected else wilson_interval(n_parasitized, n_cells)[1]
    # say which bound: the corrected one differs from the raw interval shown beside it
    bound = "upper 95% bound, corrected for the model's sensitivity and specificity" if corrected else "upper 95% bound"
    if chance >= NEGATIVE_P and upper < RULE_OUT and unsure_fields and unsure_fields * 2 >= good_fields:
        return "review", [f"{unsure_fields} of {good_fields} fields {unsure_reason}: blur and glare hide ring "
                          f"stages, so {n_parasitized} parasitized cell{'s' if n_parasitized != 1 else ''} cannot rule "
                          "an infection out; photograph again in focus and without glare"]
    if chance >= NEGATIVE_P and upper < RULE_OUT:
        return "negative", [f"{n_parasitized} parasitized cells, as false alarms alone would give "
                            f"(about {expected:.1f}); parasitemia below {RULE_OUT:.0%} ({bound} {upper:.2%})"]
    return "review", [f"borderline: {n_parasitized} parasitized cells where false alarms alone would give about "
                      f"{expected:.1f} (chance {chance:.2g}); {bound} {upper:.2%}"]
