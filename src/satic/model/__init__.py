"""The SAT model (one class for every group size K), its config, and reference-checkpoint import."""
from satic.model.config import ModelConfig
from satic.model.transformer import SATModel

__all__ = ["ModelConfig", "SATModel"]
