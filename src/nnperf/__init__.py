"""nnperf: train image classifiers and see what the hardware did while they trained."""

__version__ = "0.1.0"
