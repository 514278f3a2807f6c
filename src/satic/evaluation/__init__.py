"""Caption metrics behind the coco-caption `compute_score(gts, res)` interface, and result files."""
from satic.evaluation.cider import Cider, CiderD
from satic.evaluation.document_frequency import DocumentFrequency

__all__ = ["Cider", "CiderD", "DocumentFrequency"]
