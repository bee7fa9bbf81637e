"""Cross-client evidence: API keys that share a source network are judged together too (Sybil).

Real attackers split their query budget over many API keys, so that no key alone looks like much:
a KnockoffNets extraction spread over 8 keys gives each key a 150-query history whose coverage sits
at the population's 96th percentile (tail p ≈ 0.04), well short of an alert, while together they
are plainly one actor. Blacklight keeps one store for all accounts for this reason.

A *source group* is the network of a client's latest source IP (IPv4 /24, IPv6 /48 by default).
Per (model, group) we keep each member's latest calibrated tail probability per attack kind (from
its own scheduled evaluation, so nothing here depends on batch cuts). The group's evidence for a
kind is a binomial test: of the ``m`` members with a judged history, ``k`` are *suspicious* (p ≤
``SUSPICIOUS_P``); if members were honest and their p-values calibrated, k would be Binomial(m,
``SUSPICIOUS_P``), so P(K ≥ k) is the group's tail probability, mapped to a score exactly like a
client's. Honest clients behind one NAT or proxy each look ordinary (their p-values are spread out),
so many of them do not add up to an alert; a handful of keys that each look a little like an attack
do. At least ``MIN_SUSPICIOUS`` members must be suspicious, so one client alone never raises its group.

With N workers a group's keys are spread over them (records are keyed by client). Workers that
share their population baselines share their groups through the same population log: for each
source partition it owns, a worker publishes a *digest* of a group (how many of its members are on
that partition, and those that are suspicious) whenever that changes, and every worker folds every
digest, in log order, into a :class:`SharedSourceGroup` that it judges. All workers thus judge the
same evidence at the same log offset; one of them, the owner of the group's *home* partition (the
first to publish it), emits the group's scores, so its incidents are one worker's and move with that
partition. A network of one client that looks honest stays off the log, as most networks are; a
worker with several clients of one network publishes it at once, so that a suspicion elsewhere is
judged against all its members.

Limits, by design: keys spread over unrelated networks are not linked (fingerprint overlap across
clients is not implemented).
"""

from __future__ import annotations

import functools
import ipaddress
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any, NamedTuple

from detectors.population import binomial_tail
from detectors.scores import ATTACK_KINDS, GROUP_PREFIX, SessionScore

# A member is suspicious for a kind when its own tail probability is at most this.
SUSPICIOUS_P = 0.05
# A group needs at least this many suspicious members before it can score at all.
MIN_SUSPICIOUS = 3
# Members kept per group (the most recently evaluated); bounds state for a huge NAT.
MAX_MEMBERS = 256
# Kinds judged across clients: volume never alerts alone, and a NAT's summed rate is not evidence.
GROUP_KINDS = ("extraction", "boundary_probing", "adversarial_input")

# A member's latest evaluation: (tail p per kind in GROUP_KINDS order, its event time, the client's queries then).
Member = tuple[tuple[float, ...], float, int]


@functools.lru_cache(maxsize=65_536)
def source_group(
    ip: str, v4_prefix: int = 24, v6_prefix: int = 48, label: Callable[[str], str] | None = None
) -> str | None:
    """The network of ``ip`` as a group id (``net:203.0.113.0/24``, or ``net:<label(network)>``, e.g.
    a keyed hash where source IPs must not be stored); None for a malformed address or a prefix of 0
    (grouping off for that family)."""
    try:
        address = ipaddress.ip_address(ip.strip())
    except ValueError:
        return None
    prefix = v4_prefix if address.version == 4 else v6_prefix
    if prefix <= 0:
        return None
    network = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
    return f"{GROUP_PREFIX}{label(str(network)) if label else network}"


def is_suspicious(kind_p: tuple[float, ...]) -> bool:
    """Whether a member counts as suspicious for any kind judged across clients."""
    return min(kind_p, default=1.0) <= SUSPICIOUS_P


def binomial_evidence(judged: int, members: Iterable[tuple[str, Member]]) -> dict[str, tuple[float, list[str], int]]:
    """Per kind: (group tail probability, suspicious members, members judged), of ``judged`` members
    among which ``members`` holds (at least) every suspicious one."""
    rows = list(members)
    out: dict[str, tuple[float, list[str], int]] = {}
    for i, kind in enumerate(GROUP_KINDS):
        suspicious = sorted(c for c, (ps, _, _) in rows if ps[i] <= SUSPICIOUS_P)
        k = len(suspicious)
        p = binomial_tail(k, judged, SUSPICIOUS_P) if k >= MIN_SUSPICIOUS else 1.0
        out[kind] = (p, suspicious, judged)
    return out


class _JudgedGroup(ABC):
    """Scoring a group; SourceGroup (a worker's members) and SharedSourceGroup (every worker's
    digests) say where the evidence comes from."""

    __slots__ = ()
    kind_max: dict[str, float]

    @abstractmethod
    def evidence(self) -> dict[str, tuple[float, list[str], int]]:
        """Per kind: (group tail probability, suspicious members, members judged)."""

    @abstractmethod
    def member_count(self) -> int: ...

    @abstractmethod
    def queries(self) -> int: ...

    @property
    @abstractmethod
    def first_seen(self) -> float: ...

    @abstractmethod
    def nbytes(self) -> int: ...

    def judge(
        self, model_id: str, group_id: str, now: float, score_of: Callable[[float], float], threshold: float
    ) -> SessionScore | None:
        """The group's score (client ``group_id``, as of event time ``now``), or None while no kind has
        enough suspicious members. ``score_of`` maps a tail probability onto the detector's scale."""
        evidence = self.evidence()
        scores = {kind: round(score_of(evidence[kind][0]), 6) if kind in evidence else 0.0 for kind in ATTACK_KINDS}
        if max(scores.values()) <= 0.0:
            return None
        top = max(scores, key=lambda k: scores[k])
        network = group_id.removeprefix(GROUP_PREFIX)
        reasons = []
        for kind in GROUP_KINDS:
            p, suspicious, m = evidence[kind]
            if scores[kind] >= 0.5 * threshold:
                shown = ", ".join(suspicious[:8]) + (f" (+{len(suspicious) - 8} more)" if len(suspicious) > 8 else "")
                reasons.append(
                    f"{kind}: {len(suspicious)} of the {m} API keys from {network} each show {kind} evidence "
                    f"at tail p ≤ {SUSPICIOUS_P} ({shown}); by chance P ≈ {p:.0e}"
                )
        queries = self.queries()
        score = SessionScore(
            model_id=model_id,
            client_id=group_id,
            session_id="group",
            event_time=now,
            first_seen=self.first_seen,
            n_queries=queries,
            client_queries=queries,
            score=scores[top],
            kind_scores=scores,
            signals={
                "group_members": float(self.member_count()),
                **{f"suspicious_{k}": float(len(evidence[k][1])) for k in GROUP_KINDS},
            },
            reasons=reasons,
            source_ips=[],
            state_bytes=self.nbytes(),
            members=evidence[top][1][:32],
        )
        for kind, value in scores.items():
            if value >= threshold > self.kind_max.get(kind, 0.0):
                score.crossed_kinds.append(kind)
            self.kind_max[kind] = max(self.kind_max.get(kind, 0.0), value)
        score.peak_kind_scores = dict(self.kind_max)
        return score


class GroupDigest(NamedTuple):
    """A group's members on one source partition, as its owner publishes them to the other workers:
    how many there are, their queries, and the suspicious ones with their latest evaluations."""

    members: int
    queries: int
    suspicious: dict[str, Member]

    def signature(self) -> tuple[int, frozenset[tuple[str, tuple[bool, ...]]]]:
        """What judging the group reads of it: a digest is published again only when this changes."""
        flags = frozenset((c, tuple(p <= SUSPICIOUS_P for p in ps)) for c, (ps, _, _) in self.suspicious.items())
        return self.members, flags

    def state(self) -> list[Any]:
        return [self.members, self.queries, {c: list(m) for c, m in self.suspicious.items()}]

    @classmethod
    def from_state(cls, data: list[Any]) -> GroupDigest:
        members, queries, suspicious = data
        return cls(
            int(members),
            int(queries),
            {str(c): (tuple(float(p) for p in ps), float(ts), int(q)) for c, (ps, ts, q) in suspicious.items()},
        )


EMPTY_DIGEST = GroupDigest(0, 0, {})


class SourceGroup(_JudgedGroup):
    """One (model, source network) as one worker sees it: its members' latest per-kind tail probabilities."""

    __slots__ = ("_oldest", "_suspicious", "kind_max", "members")

    def __init__(self) -> None:
        # client id -> its latest evaluation (Member); insertion order is recency of evaluation, oldest first.
        self.members: dict[str, Member] = {}
        self.kind_max: dict[str, float] = {}
        # Kept as members come and go, so that an evaluation in a large network (a NAT of hundreds of
        # keys) scans the members only when something can come of it: per kind, how many members
        # are suspicious, and a lower bound on the members' evaluation times.
        self._suspicious = [0] * len(GROUP_KINDS)
        self._oldest = float("inf")

    def update(self, client_id: str, kind_p: tuple[float, ...], event_time: float, queries: int) -> None:
        self.forget(client_id)
        self.members[client_id] = (kind_p, event_time, queries)
        self._count(kind_p, 1)
        self._oldest = min(self._oldest, event_time)
        if len(self.members) > MAX_MEMBERS:
            self.forget(next(iter(self.members)))

    def forget(self, client_id: str) -> None:
        member = self.members.pop(client_id, None)
        if member is not None:
            self._count(member[0], -1)

    def _count(self, kind_p: tuple[float, ...], step: int) -> None:
        for i, p in enumerate(kind_p):
            if p <= SUSPICIOUS_P:
                self._suspicious[i] += step

    def expire(self, before: float) -> None:
        """Forget members whose latest evaluation is older than ``before`` (event time)."""
        if self._oldest >= before:
            return  # none is
        for client_id in [c for c, (_, ts, _) in self.members.items() if ts < before]:
            self.forget(client_id)
        self._oldest = self.first_seen if self.members else float("inf")

    @property
    def first_seen(self) -> float:
        return min((ts for _, ts, _ in self.members.values()), default=0.0)

    def member_count(self) -> int:
        return len(self.members)

    def has_suspicious(self) -> bool:
        """Whether any member is suspicious for any kind (is_suspicious), without a scan."""
        return max(self._suspicious) > 0

    def queries(self) -> int:
        return sum(q for _, _, q in self.members.values())

    def evidence(self) -> dict[str, tuple[float, list[str], int]]:
        return binomial_evidence(len(self.members), self.members.items())

    def judge(
        self, model_id: str, group_id: str, now: float, score_of: Callable[[float], float], threshold: float
    ) -> SessionScore | None:
        if max(self._suspicious) < MIN_SUSPICIOUS:
            return None  # every kind's tail probability is 1 (see evidence): every score is 0
        return super().judge(model_id, group_id, now, score_of, threshold)

    def digests(self, partition_of: Callable[[str], int | None]) -> dict[int, GroupDigest]:
        """The members per source partition (``partition_of`` a member's; None: not this worker's)."""
        counts: dict[int, list[int]] = {}  # partition -> [members, their queries]
        suspicious: dict[int, dict[str, Member]] = {}
        for client_id, member in self.members.items():
            partition = partition_of(client_id)
            if partition is None:
                continue
            count = counts.setdefault(partition, [0, 0])
            count[0] += 1
            count[1] += member[2]
            if is_suspicious(member[0]):
                suspicious.setdefault(partition, {})[client_id] = member
        return {p: GroupDigest(m, q, suspicious.get(p, {})) for p, (m, q) in counts.items()}

    def nbytes(self) -> int:
        return 120 + len(self.members) * (100 + 8 * len(GROUP_KINDS))


class SharedSourceGroup(_JudgedGroup):
    """One (model, source network) as all the workers sharing a population log see it: per source
    partition, the latest digest its owner published. Folded in log order on every worker, so all of
    them judge it alike (``kind_max`` included: a kind crosses the threshold once in the group)."""

    __slots__ = ("digests", "home", "kind_max")

    def __init__(self) -> None:
        self.digests: dict[int, GroupDigest] = {}
        self.kind_max: dict[str, float] = {}
        # The source partition whose owner emits the group's scores, so that its incidents live in
        # one worker's alert policy and move only with that partition: the first to publish, for as
        # long as members of the group are there, then the lowest partition that has some.
        self.home: int | None = None

    def replace(self, partition: int, digest: GroupDigest) -> None:
        if digest.members:
            self.digests[partition] = digest
        else:
            self.digests.pop(partition, None)
        if self.home not in self.digests:
            self.home = min(self.digests, default=None)

    def _suspicious_members(self) -> Iterable[tuple[str, Member]]:
        return chain.from_iterable(d.suspicious.items() for d in self.digests.values())

    def latest_evaluation(self) -> float:
        """The event time of the newest suspicious member's evaluation: the group's 'now' when judged."""
        return max((ts for _, (_, ts, _) in self._suspicious_members()), default=0.0)

    @property
    def first_seen(self) -> float:
        """The earliest evaluation of a suspicious member (the members whose times are published)."""
        return min((ts for _, (_, ts, _) in self._suspicious_members()), default=0.0)

    def member_count(self) -> int:
        return sum(d.members for d in self.digests.values())

    def queries(self) -> int:
        return sum(d.queries for d in self.digests.values())

    def evidence(self) -> dict[str, tuple[float, list[str], int]]:
        return binomial_evidence(self.member_count(), self._suspicious_members())

    def nbytes(self) -> int:
        return 120 + sum(64 + len(d.suspicious) * (100 + 8 * len(GROUP_KINDS)) for d in self.digests.values())

    def state(self) -> dict[str, Any]:
        return {"d": {p: d.state() for p, d in self.digests.items()}, "kind_max": self.kind_max, "home": self.home}

    @classmethod
    def from_state(cls, data: dict[str, Any]) -> SharedSourceGroup:
        group = cls()
        group.digests = {int(p): GroupDigest.from_state(d) for p, d in data["d"].items()}
        group.kind_max = {str(k): float(v) for k, v in data["kind_max"].items()}
        group.home = None if data["home"] is None else int(data["home"])
        return group
