"""Synthetic query-log traffic against a real model, with ground truth.

Victims
    ``gaussian`` (default, numpy only): a softmax classifier over a Gaussian-mixture input space, so
    ``probewatch simulate`` works with the core dependencies alone (it makes the shipped sample log).
    ``digits``, ``breast_cancer``, ``wine``: scikit-learn models trained on the data sets that ship with
    scikit-learn (no downloads); these need the ``probewatch[simulate]`` extra.

Benign clients (``variant`` in the truth file) include the hard cases real deployments have: a heavy
batch scorer, retries of identical inputs, near-duplicate sensor-like streams, slowly drifting data,
health-check canaries, bursty clients and several API keys behind one corporate NAT (one /24).

Attackers, one client each unless multi-key:

* extraction: ``random`` (uniform queries over the input box), ``knockoff`` (KnockoffNets-style:
  natural public data of every class), ``copycat`` (CopycatCNN-like: non-problem-domain data — the
  public data with its features shuffled independently, so marginals look natural, joints do not);
* boundary probing (evasion attacks as they look in the log): ``hopskipjump`` and ``boundary``
  (decision-based, label only), ``simba`` and ``square`` (score-based);
* adversarial inputs: ``transfer`` (FGSM examples crafted offline on a surrogate, sent for real);
* variants: ``slow`` (long pauses, sessions split by the inactivity gap), ``interleaved`` (attack
  queries mixed with the client's ordinary traffic), ``sybil`` (one attack split over many API keys in
  one /24).

With IBM's adversarial-robustness-toolbox installed and a scikit-learn victim, HopSkipJump and the
Boundary Attack run through ART (the model wrapped in ART's ScikitlearnClassifier; every query the
attack makes is logged). SimBA and Square need a neural-network estimator in ART, so they, and every
attack when ART is absent, use the self-contained numpy implementations here. The truth file says
which implementation made each attacker's traffic (``impl``).
"""

from __future__ import annotations

import gzip
import logging
import math
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import msgspec
import numpy as np

log = logging.getLogger(__name__)

START = datetime(2026, 11, 1, tzinfo=UTC).timestamp()
MODEL_ID = "fraud-v3"
VICTIMS = ("gaussian", "digits", "breast_cancer", "wine")
EXTRACTION = ("random", "knockoff", "copycat")
BOUNDARY = ("hopskipjump", "boundary", "simba", "square")
ADVERSARIAL = ("transfer",)
ATTACK_VARIANTS: dict[str, str] = {
    **{v: "extraction" for v in EXTRACTION},
    **{v: "boundary_probing" for v in BOUNDARY},
    **{v: "adversarial_input" for v in ADVERSARIAL},
}
BENIGN_VARIANTS = ("normal", "batch_scorer", "retrying", "sensor", "drifting", "canary", "bursty", "nat")
MODES = ("slow", "interleaved", "sybil")


class SimulationPlan(msgspec.Struct):
    benign_clients: int = 40
    attackers_per_kind: int = 4  # attackers per attack variant
    queries_per_client: int = 400
    malformed: int = 20
    seed: int = 7
    dim: int = 8  # gaussian victim only
    classes: int = 4  # gaussian victim only
    victim: str = "gaussian"
    attacks: tuple[str, ...] = ("random", "hopskipjump")  # attack variants to include
    modes: tuple[str, ...] = ()  # extra slow / interleaved / sybil attackers (one per variant and mode)
    outputs: str = "probs"  # probs | label (label-only outputs) ; vectors omitted with include_vectors
    include_vectors: bool = True
    use_art: str = "auto"  # auto | yes | no
    model_id: str = MODEL_ID
    sybil_keys: int = 8
    # Attackers start this long after the log does (a deployed model has a history of ordinary traffic;
    # the detectors' population baselines warm up from it).
    attack_delay_s: float = 1800.0


class MissingExtra(RuntimeError):
    """A scikit-learn victim was asked for without the `simulate` extra installed."""


# ---------------------------------------------------------------------------------------------- victims
class Victim:
    """What the simulator needs from a model: probabilities, natural data, public data, the input box."""

    name = "victim"
    integer_inputs = False

    def __init__(self) -> None:
        self.low = np.zeros(1)
        self.high = np.ones(1)
        self.n_classes = 2
        self.sklearn_model: Any = None

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def natural(self, rng: np.random.Generator, n: int, classes: np.ndarray | None = None) -> np.ndarray:
        raise NotImplementedError

    def public(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Natural data of every class, as an attacker could collect (KnockoffNets' transfer set)."""
        return self.natural(rng, n)

    def clip(self, x: np.ndarray) -> np.ndarray:
        x = np.clip(x, self.low, self.high)
        return np.round(x) if self.integer_inputs else x

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.predict_proba(np.atleast_2d(x)).argmax(axis=1)

    @property
    def dim(self) -> int:
        return len(self.low)


class GaussianVictim(Victim):
    """A softmax classifier whose classes sit on Gaussian clusters of the input space (numpy only)."""

    name = "gaussian"

    def __init__(self, rng: np.random.Generator, dim: int, classes: int) -> None:
        super().__init__()
        self.centres = rng.normal(0.0, 3.0, size=(classes, dim))
        self.weights = self.centres * 1.5
        self.bias = -0.5 * (self.weights * self.centres).sum(axis=1) / 1.5
        self.low = self.centres.min(axis=0) - 4.0
        self.high = self.centres.max(axis=0) + 4.0
        self.n_classes = classes

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        logits = np.atleast_2d(x) @ self.weights.T + self.bias
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)

    def natural(self, rng: np.random.Generator, n: int, classes: np.ndarray | None = None) -> np.ndarray:
        chosen = rng.choice(classes if classes is not None else len(self.centres), size=n)
        return self.centres[chosen] + rng.normal(0.0, 1.0, size=(n, self.centres.shape[1]))


class SklearnVictim(Victim):
    """A scikit-learn classifier trained on a data set shipped with scikit-learn."""

    def __init__(self, name: str, rng: np.random.Generator) -> None:
        super().__init__()
        try:
            from sklearn import datasets
            from sklearn.linear_model import LogisticRegression
            from sklearn.model_selection import train_test_split
            from sklearn.pipeline import make_pipeline
            from sklearn.preprocessing import StandardScaler
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise MissingExtra(
                f"victim {name!r} needs scikit-learn: pip install 'probewatch[simulate]' "
                "(or use the numpy-only default victim 'gaussian')"
            ) from exc
        loader: Callable[..., Any] = {
            "digits": datasets.load_digits,
            "breast_cancer": datasets.load_breast_cancer,
            "wine": datasets.load_wine,
        }[name]
        x, y = loader(return_X_y=True)
        x = x.astype(np.float64)
        seed = int(rng.integers(0, 2**31 - 1))
        # The victim's private training data, and a disjoint "public" half the world can also collect.
        self.x_train, self.x_public, self.y_train, self.y_public = train_test_split(
            x, y, test_size=0.5, random_state=seed, stratify=y
        )
        self.sklearn_model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, C=0.5))
        self.sklearn_model.fit(self.x_train, self.y_train)
        self.name = name
        self.integer_inputs = name == "digits"
        self.low = x.min(axis=0)
        self.high = x.max(axis=0)
        self.n_classes = int(y.max()) + 1
        self.scale = x.std(axis=0) + 1e-9

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.sklearn_model.predict_proba(np.atleast_2d(x)), dtype=np.float64)

    def natural(self, rng: np.random.Generator, n: int, classes: np.ndarray | None = None) -> np.ndarray:
        pool = self.x_train if classes is None else self.x_train[np.isin(self.y_train, classes)]
        base = pool[rng.integers(0, len(pool), size=n)]
        # Real traffic is never the training set: jitter each input a little (on the data's own grid).
        noisy = base + rng.normal(0.0, 0.08, size=base.shape) * self.scale
        return self.clip(noisy)

    def public(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return self.x_public[rng.integers(0, len(self.x_public), size=n)]


def make_victim(plan: SimulationPlan, rng: np.random.Generator) -> Victim:
    if plan.victim == "gaussian":
        return GaussianVictim(rng, plan.dim, plan.classes)
    if plan.victim in VICTIMS:
        return SklearnVictim(plan.victim, rng)
    raise ValueError(f"unknown victim {plan.victim!r}; choose from {', '.join(VICTIMS)}")


def art_available() -> bool:
    try:
        import art  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------------------- benign
def _times(rng: np.random.Generator, n: int, start: float, mean_gap: float) -> np.ndarray:
    return start + np.cumsum(rng.exponential(mean_gap, size=n))


def _benign(kind: str, v: Victim, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    start = START + rng.uniform(0, 3600)
    own = rng.choice(v.n_classes, size=min(2, v.n_classes), replace=False)
    if kind == "batch_scorer":  # a heavy customer scoring its own natural data fast
        return v.natural(rng, n * 3, own), _times(rng, n * 3, start, 0.05)
    if kind == "retrying":  # every input sent 1-3 times
        base = v.natural(rng, n // 2 + 1, own)
        x = np.repeat(base, rng.integers(1, 4, size=len(base)), axis=0)[:n]
        return x, _times(rng, len(x), start, 4.0)
    if kind == "sensor":  # a slowly drifting reading: consecutive inputs nearly identical
        scale = (v.high - v.low) / 8.0
        steps = rng.normal(0.0, 0.01, size=(n, v.dim)) * scale
        x = v.natural(rng, 1, own[:1]) + np.cumsum(steps, axis=0)
        return v.clip(x) if not v.integer_inputs else np.clip(x, v.low, v.high), _times(rng, n, start, 2.0)
    if kind == "drifting":  # the client's data drifts away from what the model was trained on
        x = v.natural(rng, n, own)
        drift = np.linspace(0.0, 1.0, n)[:, None] * rng.normal(0.0, 0.15, size=v.dim) * (v.high - v.low)
        return v.clip(x + drift) if not v.integer_inputs else np.clip(x + drift, v.low, v.high), _times(
            rng, n, start, 6.0
        )
    if kind == "canary":  # the same health-check input every 10 s
        x = np.repeat(v.natural(rng, 1), n, axis=0)
        return x, start + 10.0 * np.arange(n)
    if kind == "bursty":  # idle, then bursts of many queries within seconds
        x = v.natural(rng, n, own)
        burst = np.repeat(np.arange(math.ceil(n / 50)), 50)[:n]
        ts = start + burst * 900.0 + np.cumsum(rng.exponential(0.02, size=n)) - burst * 0.0
        return x, np.sort(ts)
    return v.natural(rng, n, own), _times(rng, n, start, 6.0)


# --------------------------------------------------------------------------------------- extraction
def _extraction(variant: str, v: Victim, rng: np.random.Generator, n: int) -> np.ndarray:
    if variant == "random":
        return v.clip(rng.uniform(v.low, v.high, size=(n, v.dim)))
    public = v.public(rng, n)
    if variant == "knockoff":
        return public
    # copycat: non-problem-domain data with natural-looking marginals (each feature shuffled alone)
    return np.stack([rng.permutation(public[:, j]) for j in range(public.shape[1])], axis=1)


# ---------------------------------------------------------------------------- evasion (numpy versions)
class _Oracle:
    """The victim as the attacker sees it; every call is one logged query."""

    def __init__(self, v: Victim) -> None:
        self.v = v
        self.queries: list[np.ndarray] = []

    def probs(self, x: np.ndarray) -> np.ndarray:
        x = np.atleast_2d(x)
        self.queries.extend(x)
        return self.v.predict_proba(x)

    def label(self, x: np.ndarray) -> np.ndarray:
        return self.probs(x).argmax(axis=1)


def _start_pair(v: Victim, rng: np.random.Generator, oracle: _Oracle) -> tuple[np.ndarray, int, np.ndarray]:
    """An original input of the attacker's and an initial adversarial point (another class)."""
    x0 = v.natural(rng, 1)[0]
    y0 = int(oracle.label(x0)[0])
    for _ in range(50):
        cand = v.natural(rng, 1)[0]
        if int(oracle.label(cand)[0]) != y0:
            return x0, y0, cand
    return x0, y0, v.clip(rng.uniform(v.low, v.high, size=v.dim))


def _binary_search(oracle: _Oracle, x0: np.ndarray, y0: int, adv: np.ndarray, steps: int) -> np.ndarray:
    lo, hi = 0.0, 1.0  # fraction of the way from x0 to adv; hi stays adversarial
    for _ in range(steps):
        mid = (lo + hi) / 2
        if int(oracle.label(x0 + mid * (adv - x0))[0]) == y0:
            lo = mid
        else:
            hi = mid
    return x0 + hi * (adv - x0)


def _search_widths(v: Victim) -> np.ndarray:
    """Per-feature scale of a boundary search's distances and steps: the input range, or 1 where the
    range is empty (digits' always-blank pixels), where dividing by it made the distance NaN."""
    width = v.high - v.low
    return np.where(width > 0, width, 1.0)


def _hopskipjump(v: Victim, rng: np.random.Generator, n: int) -> np.ndarray:
    """HopSkipJump (Chen et al. 2020), label-only: boundary search, Monte-Carlo gradient estimate
    at the boundary, geometric step search, repeat."""
    oracle = _Oracle(v)
    x0, y0, adv = _start_pair(v, rng, oracle)
    adv = _binary_search(oracle, x0, y0, adv, 10)
    width = _search_widths(v)
    it = 1
    while len(oracle.queries) < n:
        dist = float(np.linalg.norm((adv - x0) / width))
        delta = max(dist, 1e-3) * 0.1 / math.sqrt(it)
        batch = int(min(100, 10 * math.sqrt(it)))
        u = rng.normal(size=(batch, v.dim))
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        signs = np.where(oracle.label(adv + delta * u * width) != y0, 1.0, -1.0)
        grad = (signs[:, None] * u).mean(axis=0)
        grad /= np.linalg.norm(grad) + 1e-12
        step = dist / math.sqrt(it)
        while len(oracle.queries) < n:  # geometric step search
            cand = adv + step * grad * width
            if int(oracle.label(cand)[0]) != y0:
                adv = cand
                break
            step /= 2
            if step < 1e-6:
                break
        adv = _binary_search(oracle, x0, y0, adv, 8)
        it += 1
    return np.array(oracle.queries[:n])


def _boundary(v: Victim, rng: np.random.Generator, n: int) -> np.ndarray:
    """Boundary Attack (Brendel et al. 2018), label-only: from an adversarial start, random
    orthogonal steps along the boundary and small steps towards the original, adapting both."""
    oracle = _Oracle(v)
    x0, y0, adv = _start_pair(v, rng, oracle)
    width = _search_widths(v)
    spherical, source = 0.1, 0.1
    while len(oracle.queries) < n:
        diff = (x0 - adv) / width
        dist = float(np.linalg.norm(diff))
        eta = rng.normal(size=v.dim)
        eta -= eta @ diff / (diff @ diff + 1e-12) * diff
        eta *= spherical * dist / (np.linalg.norm(eta) + 1e-12)
        cand = adv + eta * width
        cand = x0 + (cand - x0) * (dist / (np.linalg.norm((cand - x0) / width) + 1e-12))
        ok = int(oracle.label(cand)[0]) != y0
        spherical *= 1.05 if ok else 0.95
        if not ok:
            continue
        toward = cand + source * (x0 - cand)
        if len(oracle.queries) < n and int(oracle.label(toward)[0]) != y0:
            adv = toward
            source *= 1.05
        else:
            adv = cand
            source *= 0.9
    return np.array(oracle.queries[:n])


def _margin_loss(p: np.ndarray, y0: int) -> float:
    other = np.delete(p, y0)
    return float(p[y0] - other.max())


def _simba(v: Victim, rng: np.random.Generator, n: int) -> np.ndarray:
    """SimBA (Guo et al. 2019), score-based, pixel basis: try ±ε along one random coordinate at a
    time, keep the change when the true class's probability drops."""
    oracle = _Oracle(v)
    x = v.natural(rng, 1)[0]
    p = oracle.probs(x)[0]
    y0 = int(p.argmax())
    eps = 0.2 * (v.high - v.low)
    for i in np.resize(rng.permutation(v.dim), n):
        if len(oracle.queries) >= n:
            break
        for sign in (1.0, -1.0):
            cand = x.copy()
            cand[i] += sign * eps[i]
            cand = v.clip(cand)
            q = oracle.probs(cand)[0]
            if q[y0] < p[y0]:
                x, p = cand, q
                break
    return np.array(oracle.queries[:n])


def _square(v: Victim, rng: np.random.Generator, n: int) -> np.ndarray:
    """Square Attack (Andriushchenko et al. 2020), score-based L∞: random windows of features set
    to the original ± ε (clipped), kept when the margin loss drops."""
    oracle = _Oracle(v)
    x0 = v.natural(rng, 1)[0]
    p = oracle.probs(x0)[0]
    y0 = int(p.argmax())
    eps = 0.15 * (v.high - v.low)
    x = v.clip(x0 + eps * rng.choice([-1.0, 1.0], size=v.dim))  # the L∞ attack starts at the ε-box corner
    best = _margin_loss(oracle.probs(x)[0], y0)
    it = 0
    while len(oracle.queries) < n:
        size = max(1, round(v.dim * 0.3 * 0.9 ** (it // 10)))
        start = int(rng.integers(0, v.dim - size + 1))
        cand = x.copy()
        cand[start : start + size] = x0[start : start + size] + eps[start : start + size] * rng.choice([-1.0, 1.0])
        cand = v.clip(cand)
        loss = _margin_loss(oracle.probs(cand)[0], y0)
        if loss < best:
            x, best = cand, loss
        it += 1
    return np.array(oracle.queries[:n])


def _transfer(v: Victim, rng: np.random.Generator, n: int) -> np.ndarray:
    """Adversarial inputs crafted offline: FGSM on a softmax-regression surrogate trained on public
    data labelled by the victim; every query is one such example (no probing of the victim)."""
    public = v.public(rng, 400)
    y = v.predict(public)
    mu, sd = public.mean(axis=0), public.std(axis=0) + 1e-9
    z = (public - mu) / sd
    w = np.zeros((v.dim, v.n_classes))
    onehot = np.eye(v.n_classes)[y]
    for _ in range(200):  # a few hundred steps of gradient descent: a rough surrogate is enough
        logits = z @ w
        logits -= logits.max(axis=1, keepdims=True)
        prob = np.exp(logits)
        prob /= prob.sum(axis=1, keepdims=True)
        w -= 0.5 * z.T @ (prob - onehot) / len(z)
    x = v.natural(rng, n)
    labels = v.predict(x)
    zx = (x - mu) / sd
    logits = zx @ w
    prob = np.exp(logits - logits.max(axis=1, keepdims=True))
    prob /= prob.sum(axis=1, keepdims=True)
    grad = (prob - np.eye(v.n_classes)[labels]) @ w.T / sd  # d loss / d x
    eps = 0.12 * (v.high - v.low)
    return v.clip(x + eps * np.sign(grad))


def _art_evasion(variant: str, v: Victim, rng: np.random.Generator, n: int) -> np.ndarray:
    """HopSkipJump / Boundary Attack from ART against the scikit-learn victim, every query logged."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from art.attacks.evasion import BoundaryAttack, HopSkipJump
        from art.estimators.classification.scikitlearn import ScikitlearnClassifier

    queries: list[np.ndarray] = []

    class _Logged:
        def __init__(self, model: Any) -> None:
            self.model = model
            self.classes_ = model.classes_
            self.n_features_in_ = v.dim

        def predict_proba(self, x: np.ndarray) -> np.ndarray:
            queries.extend(np.asarray(x, dtype=np.float64))
            return np.asarray(self.model.predict_proba(x))

        def fit(self, x: np.ndarray, y: np.ndarray) -> None:  # ART's interface; never called here
            raise NotImplementedError

    classifier = ScikitlearnClassifier(_Logged(v.sklearn_model), clip_values=(float(v.low.min()), float(v.high.max())))
    seed = int(rng.integers(0, 2**31 - 1))
    np_state = np.random.get_state()
    np.random.seed(seed)  # ART draws from numpy's global generator
    try:
        while len(queries) < n:
            x0 = v.natural(rng, 1).astype(np.float32)
            if variant == "hopskipjump":
                attack: Any = HopSkipJump(classifier, max_iter=50, max_eval=100, init_eval=10, verbose=False)
            else:
                attack = BoundaryAttack(
                    classifier, targeted=False, max_iter=200, num_trial=5, sample_size=5, verbose=False
                )
            before = len(queries)
            attack.generate(x0)
            if len(queries) == before:
                break
    finally:
        np.random.set_state(np_state)
    return np.array(queries[:n])


NUMPY_ATTACKS: dict[str, Callable[[Victim, np.random.Generator, int], np.ndarray]] = {
    "hopskipjump": _hopskipjump,
    "boundary": _boundary,
    "simba": _simba,
    "square": _square,
    "transfer": _transfer,
}


def attack_queries(variant: str, v: Victim, rng: np.random.Generator, n: int, use_art: bool) -> tuple[np.ndarray, str]:
    """The queries one attacker sends, and which implementation made them ("art" or "numpy")."""
    if variant in EXTRACTION:
        return _extraction(variant, v, rng, n), "numpy"
    if use_art and variant in ("hopskipjump", "boundary") and v.sklearn_model is not None:
        return _art_evasion(variant, v, rng, n), "art"
    return NUMPY_ATTACKS[variant](v, rng, n), "numpy"


# --------------------------------------------------------------------------------------------- output
def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _records(
    client: str,
    ip: str,
    x: np.ndarray,
    ts: np.ndarray,
    v: Victim,
    rng: np.random.Generator,
    plan: SimulationPlan,
) -> Iterator[tuple[float, dict[str, Any]]]:
    probs = v.predict_proba(x)
    for i in range(len(x)):
        record: dict[str, Any] = {
            "ts": _iso(float(ts[i])),
            "client_id": client,
            "model_id": plan.model_id,
            "request_id": f"{client}-{i}",
            "source_ip": ip,
            "latency_ms": round(float(rng.gamma(4.0, 3.0)), 2),
            "status": 200,
        }
        if plan.include_vectors:
            record["input"] = {"vector": [round(float(val), 5) for val in x[i]]}
        if plan.outputs == "label":
            record["output"] = {"label": int(probs[i].argmax())}
        else:
            record["output"] = {"probs": [round(float(p), 5) for p in probs[i]]}
        yield float(ts[i]), record


MALFORMED = [
    b"{not json",
    b'{"ts": "2026-11-01T00:00:00Z", "model_id": "fraud-v3"}',
    b'{"ts": "yesterday", "client_id": "x", "model_id": "fraud-v3"}',
    b'{"ts": 1793491200, "client_id": "x", "model_id": "fraud-v3", "input": {"vector": [1, 2]}}',
    b'{"ts": 1793491200, "client_id": "x", "model_id": "fraud-v3", "output": {"probs": [1e999]}}',
]


def _attack_times(mode: str, rng: np.random.Generator, n: int, start: float) -> np.ndarray:
    if mode == "slow":  # a query a minute, and a pause longer than the session gap every 60 queries
        ts = _times(rng, n, start, 60.0)
        return ts + (np.arange(n) // 60) * 4 * 3600.0
    return _times(rng, n, start, 0.5)


def _benign_ip(rng: np.random.Generator) -> str:
    return f"{rng.integers(11, 120)}.{rng.integers(0, 255)}.{rng.integers(0, 255)}.{rng.integers(1, 254)}"


def write_simulation(plan: SimulationPlan, out: str, truth: str | None = None) -> dict[str, Any]:
    """Write the simulated log (time-ordered JSON lines) and optionally the ground truth per client."""
    rng = np.random.default_rng(plan.seed)
    victim = make_victim(plan, rng)
    # ART only drives attacks on the scikit-learn victims; don't pay its import otherwise.
    use_art = plan.use_art == "yes" or (plan.use_art == "auto" and victim.sklearn_model is not None and art_available())
    if plan.use_art == "yes" and not art_available():
        raise MissingExtra("use_art='yes' needs adversarial-robustness-toolbox: pip install 'probewatch[simulate]'")
    unknown = [a for a in plan.attacks if a not in ATTACK_VARIANTS]
    if unknown:
        raise ValueError(f"unknown attack variant(s) {unknown}; choose from {', '.join(ATTACK_VARIANTS)}")
    rows: list[tuple[float, dict[str, Any]]] = []
    labels: list[dict[str, Any]] = []
    n = plan.queries_per_client
    nat_ip = "192.0.2."
    for i in range(plan.benign_clients):
        kind = BENIGN_VARIANTS[1 + (i // 2) % (len(BENIGN_VARIANTS) - 1)] if i % 2 else "normal"
        client = f"acct-{i:03d}"
        x, ts = _benign("normal" if kind == "nat" else kind, victim, rng, n)
        ip = f"{nat_ip}{10 + i % 200}" if kind == "nat" else _benign_ip(rng)
        rows.extend(_records(client, ip, x, ts, victim, rng, plan))
        labels.append({"client_id": client, "model_id": plan.model_id, "label": "benign", "variant": kind})
    implementations: dict[str, str] = {}
    for variant in plan.attacks:
        kind = ATTACK_VARIANTS[variant]
        for mode in ("", *plan.modes):
            count = plan.attackers_per_kind if not mode else 1
            for j in range(count):
                client = f"{variant[:4]}{'-' + mode if mode else ''}-{j:02d}"
                total = n * (plan.sybil_keys // 2) if mode == "sybil" else n
                x, impl = attack_queries(variant, victim, rng, total, use_art)
                implementations[variant] = impl
                start = START + plan.attack_delay_s + rng.uniform(0, 3600)
                ts = _attack_times(mode, rng, len(x), start)
                ip_base = f"203.0.{113 + len(labels) % 100}."
                if mode == "interleaved":  # the attacker's queries hidden among its ordinary traffic
                    cover, cover_ts = _benign("normal", victim, rng, len(x))
                    x = np.concatenate([x, cover])
                    ts = np.concatenate(
                        [
                            ts,
                            start
                            + (cover_ts - cover_ts.min())
                            * (ts.max() - start)
                            / max(cover_ts.max() - cover_ts.min(), 1e-9),
                        ]
                    )
                if mode == "sybil":
                    keys = rng.integers(0, plan.sybil_keys, size=len(x))
                    for k in range(plan.sybil_keys):
                        sub = f"{client}-key{k}"
                        pick = keys == k
                        rows.extend(_records(sub, f"{ip_base}{20 + k}", x[pick], ts[pick], victim, rng, plan))
                        labels.append(
                            {
                                "client_id": sub,
                                "model_id": plan.model_id,
                                "label": kind,
                                "variant": f"{variant}-sybil",
                                "impl": impl,
                                "group": client,
                            }
                        )
                    continue
                rows.extend(_records(client, f"{ip_base}{10 + j}", x, ts, victim, rng, plan))
                labels.append(
                    {
                        "client_id": client,
                        "model_id": plan.model_id,
                        "label": kind,
                        "variant": f"{variant}{'-' + mode if mode else ''}",
                        "impl": impl,
                    }
                )
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
        Path(truth).parent.mkdir(parents=True, exist_ok=True)
        Path(truth).write_text("".join(msgspec.json.encode(x).decode() + "\n" for x in labels))
    return {
        "records": len(lines),
        "clients": len(labels),
        "victim": victim.name,
        "implementations": implementations,
    }
