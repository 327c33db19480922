"""Training, evaluation and inference."""

from ..lines import test_line
from .infer import predict, test
from .loop import fit

__all__ = ["fit", "predict", "test", "test_line"]
