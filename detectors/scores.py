"""What the detectors emit: one SessionScore per session touched by a micro-batch."""

from __future__ import annotations

import msgspec

# Attack kinds a session is scored for; an alert's `kind` is one of these.
ATTACK_KINDS = ("extraction", "boundary_probing", "adversarial_input", "volume")
# Client ids of source groups (API keys sharing a network, see ``detectors.groups``) start with this.
GROUP_PREFIX = "net:"


class SessionScore(msgspec.Struct, gc=False):
    """The state of one (model, client, session) after a micro-batch, as stored and alerted on.

    ``kind_scores`` holds one calibrated score in [0, 1] per attack kind; ``score`` is their maximum.
    ``signals`` are the raw signal values behind them and ``reasons`` the human-readable evidence
    ("312 distinct cells in 400 queries; 97th percentile of clients is 40").
    """

    model_id: str
    client_id: str
    session_id: str
    event_time: float  # event time (epoch s) of the newest record in the session
    first_seen: float  # event time of the session's first record
    n_queries: int  # queries in this session so far
    client_queries: int  # this client's queries to this model over all its sessions
    score: float
    kind_scores: dict[str, float]
    signals: dict[str, float]
    reasons: list[str]
    source_ips: list[str]
    closed: bool = False  # True on the session's final score (inactivity gap passed)
    warming_up: bool = False  # True while the model's population baseline is still warming up
    state_bytes: int = 0  # approximate bytes of detector state held for this session
    # Kinds whose score reached the alert threshold for the first time in this session at this
    # evaluation, and the highest score each kind has reached in the session so far. Both derive from
    # checkpointed session state, so a replay after a restart neither re-fires nor forgets an alert.
    crossed_kinds: list[str] = msgspec.field(default_factory=list)
    peak_kind_scores: dict[str, float] = msgspec.field(default_factory=dict)
    # Scores of a source group (client_id starting with GROUP_PREFIX) only: the member clients whose
    # own evidence made the group's score. Group scores are emitted at member evaluations only.
    members: list[str] = msgspec.field(default_factory=list)

    @property
    def top_kind(self) -> str:
        return max(self.kind_scores, key=lambda k: self.kind_scores[k]) if self.kind_scores else "volume"
