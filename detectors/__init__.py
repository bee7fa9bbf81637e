"""detectors — per-session state and signals (extraction coverage, boundary probing, adversarial
inputs, volume) combined into one score per attack kind, with the reasons behind it."""

from detectors.engine import SessionDetector
from detectors.scores import ATTACK_KINDS, SessionScore

__all__ = ["ATTACK_KINDS", "SessionDetector", "SessionScore"]
