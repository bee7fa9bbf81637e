"""detectors — per-session state and signals (extraction coverage, boundary probing, adversarial
inputs, volume), judged against each model's population (histograms, and a River HalfSpaceTrees of its
normal inputs) and combined into one calibrated score per attack kind, with the reasons behind it; API keys sharing a
source network are also judged together (Sybil attacks split over many keys)."""

from detectors.engine import SessionDetector
from detectors.scores import ATTACK_KINDS, SessionScore

__all__ = ["ATTACK_KINDS", "SessionDetector", "SessionScore"]
