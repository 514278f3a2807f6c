"""Caption metrics behind the coco-caption `compute_score(gts, res)` interface, and result files."""
from satic.evaluation.cider import Cider, CiderD
from satic.evaluation.document_frequency import DocumentFrequency
from satic.evaluation.metrics import Bleu, Meteor, Rouge, Spice, coco_metrics

__all__ = ["Bleu", "Cider", "CiderD", "DocumentFrequency", "Meteor", "Rouge", "Spice", "coco_metrics"]
