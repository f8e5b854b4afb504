"""The data layer: load member / non-member splits, validate them, plant canaries."""

from memlens.data.loading import (
    StudyData,
    check_record_source,
    load_study_data,
    membership_assignments,
    read_records,
)
from memlens.data.overlap import refuse_shared_texts
from memlens.data.repeated_canary import Canary, build_training_set, canary_from_record

__all__ = ["Canary", "StudyData", "build_training_set", "canary_from_record", "check_record_source", "load_study_data",
           "membership_assignments", "read_records", "refuse_shared_texts"]
