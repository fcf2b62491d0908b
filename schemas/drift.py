"""The drift rule shared by ``clipn history --check`` and the scoring job's ``alerts:`` section."""

from __future__ import annotations

from pydantic import Field

from schemas.common import StrictModel


class DriftRule(StrictModel):
    """When a night leaves the band of the nights before it (:mod:`jobs.history.check`).

    For each metric (the OOD share of ok rows, each predicted class's OOD share, the share of non-ok rows)
    the trailing nights are the up to ``nights`` nights before tonight that have the share over at least
    ``min_rows`` rows (tonight's too, or it is not checked). With at least ``min_nights`` of them a
    night is flagged when ``|x - median| > max(z * 1.4826 * MAD, min_change)`` (a robust z-score; the floor
    keeps a flat history from flagging noise); with fewer, when ``|x - median| > band``. The non-ok share is
    flagged only when it rises."""

    nights: int = Field(14, ge=1, description="trailing nights the band is computed over")
    z: float = Field(4.0, gt=0, description="robust z-score threshold: |x - median| / (1.4826 MAD)")
    min_nights: int = Field(5, ge=1, description="below this many trailing nights the absolute band applies")
    band: float = Field(0.10, gt=0, le=1, description="absolute band (share points) while fewer than min_nights "
                        "trailing nights exist")
    min_change: float = Field(0.02, ge=0, le=1, description="smallest change (share points) the z-score rule flags")
    min_rows: int = Field(20, ge=1, description="a share is checked, and a trailing night's counts, only with this many "
                          "rows behind it: ok rows for an OOD share (overall or a class's), all rows for the error share")


class AlertsConfig(DriftRule):
    """The scoring job's ``alerts:``: run the drift check on the published night at the job's end and record its
    findings in the manifest (``alerts``)."""

    fail: bool = Field(False, description="fail the job (exit 3) when the check finds something; the night stays "
                       "published either way")
