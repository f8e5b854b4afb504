"""The data layer: load member / non-member splits, validate them, plant canaries."""

from memlens.data.canaries import Canary, build_training_set, canary_from_record
from memlens.data.loading import StudyData, load_study_data, membership_assignments, read_records

__all__ = ["Canary", "StudyData", "build_training_set", "canary_from_record", "load_study_data", "membership_assignments", "read_records"]
