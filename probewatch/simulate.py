"""Synthetic query-log traffic against a small real model, with ground truth (numpy only).

The victim is a softmax classifier over a Gaussian-mixture input space. Benign clients include the
hard cases real deployments have (a heavy batch scorer, retries of identical inputs, near-duplicate
sensor streams, health-check canaries); attackers run random-query model extraction and a
HopSkipJump-style boundary walk (binary search to the boundary, then geometrically shrinking steps
along it). Every query an attacker sends becomes one record.
"""

from __future__ import annotations

import gzip
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import msgspec
import numpy as np

log = logging.getLogger(__name__)

START = datetime(2026, 11, 1, tzinfo=UTC).timestamp()
MODEL_ID = "fraud-v3"


class SimulationPlan(msgspec.Struct):
    benign_clients: int = 40
    attackers_per_kind: int = 4
    queries_per_client: int = 400
    malformed: int = 20
    seed: int = 7
    dim: int = 8
    classes: int = 4


class VictimModel:
    """A softmax classifier whose classes sit on Gaussian clusters of the input space."""

    def __init__(self, rng: np.random.Generator, dim: int, classes: int) -> None:
        self.centres = rng.normal(0.0, 3.0, size=(classes, dim))
        self.weights = self.centres * 1.5
        self.bias = -0.5 * (self.weights * self.centres).sum(axis=1) / 1.5
        self.low = self.centres.min(axis=0) - 4.0
        self.high = self.centres.max(axis=0) + 4.0

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        logits = np.atleast_2d(x) @ self.weights.T + self.bias
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)

    def natural(self, rng: np.random.Generator, n: int, classes: np.ndarray | None = None) -> np.ndarray:
        chosen = rng.choice(classes if classes is not None else len(self.centres), size=n)
        return self.centres[chosen] + rng.normal(0.0, 1.0, size=(n, self.centres.shape[1]))


def _times(rng: np.random.Generator, n: int, start: float, mean_gap: float) -> np.ndarray:
    return start + np.cumsum(rng.exponential(mean_gap, size=n))


def _benign(kind: str, model: VictimModel, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    start = START + rng.uniform(0, 3600)
    own_classes = rng.choice(len(model.centres), size=2, replace=False)
    if kind == "batch_scorer":  # a heavy customer scoring its own natural data fast
        return model.natural(rng, n * 3, own_classes), _times(rng, n * 3, start, 0.05)
    if kind == "retrying":  # every input sent 1-3 times
        base = model.natural(rng, n // 2, own_classes)
        x = np.repeat(base, rng.integers(1, 4, size=len(base)), axis=0)[:n]
        return x, _times(rng, len(x), start, 4.0)
    if kind == "sensor":  # a slowly drifting reading: consecutive inputs nearly identical
        steps = rng.normal(0.0, 0.02, size=(n, model.centres.shape[1]))
        x = model.centres[own_classes[0]] + np.cumsum(steps, axis=0)
        return x, _times(rng, n, start, 2.0)
    if kind == "canary":  # the same health-check input every 10 s
        x = np.repeat(model.natural(rng, 1), n, axis=0)
        return x, start + 10.0 * np.arange(n)
    return model.natural(rng, n, own_classes), _times(rng, n, start, 6.0)


def _extraction(model: VictimModel, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    x = rng.uniform(model.low, model.high, size=(n, len(model.low)))
    return x, _times(rng, n, START + rng.uniform(0, 3600), 1.0)


def _boundary_walk(model: VictimModel, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """HopSkipJump-like: start from a natural input, binary-search towards an input of another class,
    then step along the boundary with shrinking steps, re-projecting onto it by binary search."""
    a, b = model.natural(rng, 2, rng.choice(len(model.centres), size=2, replace=False))
    label_a = int(model.predict_proba(a).argmax())
    queries: list[np.ndarray] = [a, b]
    lo, hi = a, b
    step = 0.5
    while len(queries) < n:
        for _ in range(8):  # binary search between the two sides
            mid = (lo + hi) / 2
            queries.append(mid)
            if int(model.predict_proba(mid).argmax()) == label_a:
                lo = mid
            else:
                hi = mid
        direction = rng.normal(size=a.shape)
        lo = lo + step * direction / np.linalg.norm(direction) * 0.1
        queries.append(lo)
        step *= 0.9
    x = np.array(queries[:n])
    return x, _times(rng, n, START + rng.uniform(0, 3600), 0.5)


def _records(
    client: str, ip: str, x: np.ndarray, ts: np.ndarray, model: VictimModel, rng: np.random.Generator
) -> Iterator[dict[str, Any]]:
    probs = model.predict_proba(x)
    for i in range(len(x)):
        yield {
            "ts": datetime.fromtimestamp(float(ts[i]), UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "client_id": client,
            "model_id": MODEL_ID,
            "request_id": f"{client}-{i}",
            "source_ip": ip,
            "input": {"vector": [round(float(v), 5) for v in x[i]]},
            "output": {"probs": [round(float(p), 5) for p in probs[i]]},
            "latency_ms": round(float(rng.gamma(4.0, 3.0)), 2),
            "status": 200,
        }


MALFORMED = [
    b"{not json",
    b'{"ts": "2026-11-01T00:00:00Z", "model_id": "fraud-v3"}',
    b'{"ts": "yesterday", "client_id": "x", "model_id": "fraud-v3"}',
    b'{"ts": 1793491200, "client_id": "x", "model_id": "fraud-v3", "input": {"vector": [1, 2]}}',
    b'{"ts": 1793491200, "client_id": "x", "model_id": "fraud-v3", "output": {"probs": [1e999]}}',
]


def write_simulation(plan: SimulationPlan, out: str, truth: str | None = None) -> dict[str, int]:
    """Write the simulated log (time-ordered JSON lines) and optionally the ground truth per client."""
    rng = np.random.default_rng(plan.seed)
    model = VictimModel(rng, plan.dim, plan.classes)
    benign_kinds = ["normal"] * 6 + ["batch_scorer", "retrying", "sensor", "canary"]
    rows: list[tuple[float, dict[str, Any]]] = []
    labels: list[dict[str, str]] = []
    for i in range(plan.benign_clients):
        kind = benign_kinds[i % len(benign_kinds)]
        client = f"acct-{i:03d}"
        x, ts = _benign(kind, model, rng, plan.queries_per_client)
        rows.extend((r_ts, r) for r_ts, r in zip(ts, _records(client, f"198.51.100.{i % 250}", x, ts, model, rng), strict=True))
        labels.append({"client_id": client, "model_id": MODEL_ID, "label": "benign", "variant": kind})
    attacks = {"extraction": _extraction, "boundary_probing": _boundary_walk}
    for kind, attack in attacks.items():
        for j in range(plan.attackers_per_kind):
            client = f"{kind[:3]}-{j:02d}"
            x, ts = attack(model, rng, plan.queries_per_client)
            ip = f"203.0.113.{10 * j + len(kind)}"
            rows.extend((r_ts, r) for r_ts, r in zip(ts, _records(client, ip, x, ts, model, rng), strict=True))
            labels.append({"client_id": client, "model_id": MODEL_ID, "label": kind, "variant": attack.__name__[1:]})
    rows.sort(key=lambda item: item[0])
    encoder = msgspec.json.Encoder()
    lines = [encoder.encode(r) for _, r in rows]
    for k in range(plan.malformed):
        lines.insert(int(rng.integers(0, len(lines))), MALFORMED[k % len(MALFORMED)])
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    opener: Any = gzip.open if out.endswith(".gz") else open
    handle: IO[bytes]
    with opener(out, "wb") as handle:
        handle.write(b"\n".join(lines) + b"\n")
    if truth:
        Path(truth).write_text("".join(msgspec.json.encode(x).decode() + "\n" for x in labels))
    return {"records": len(lines), "clients": len(labels)}
