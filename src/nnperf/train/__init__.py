"""Training, evaluation and inference."""

from .infer import predict, test, test_line
from .loop import fit

__all__ = ["fit", "predict", "test", "test_line"]
