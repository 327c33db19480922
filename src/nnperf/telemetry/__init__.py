"""Hardware telemetry: a background sampler with phases, energy and small overhead."""

from .profile import profile
from .sampler import Sampler, phase_file

__all__ = ["Sampler", "phase_file", "profile"]
