"""What a model's normal inputs look like: a River HalfSpaceTrees over per-query input summaries.

Each query's input is summarised by a few numbers that crafted inputs push to the extremes (features
pinned at the clip bounds, high-frequency energy, a norm far from the population's, a large single
coordinate, many coordinates in the tails) plus its first eight standardised coordinates (where in the
input space it lies), all squashed into [0, 1] as HalfSpaceTrees expects. The trees
are refitted to the model's published reference sample at every publish of its population: a pure
function of checkpointed state, so a restart rebuilds the same model (no pickled estimator in the
changelog) and a replay of the log reads the same scores however it is cut into batches.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

N_SUMMARIES = 5
N_TREES = 15
TREE_HEIGHT = 6
SEED = 20261129


@functools.cache
def river_anomaly() -> Any:
    """River's anomaly module, imported on first use: River pulls in pandas and scikit-learn and takes
    seconds, which `probewatch --help` and the commands that score nothing should not pay. The
    detector imports it when it is built, so a run does not pause for it at its first publish."""
    from river import anomaly

    return anomaly


def _squash(x: np.ndarray) -> np.ndarray:
    """[0, inf) onto [0, 1), monotone, so that no value falls outside the trees' limits."""
    x = np.maximum(x, 0.0)
    return x / (1.0 + x)


def pinned_at_bounds(raw: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Per query and feature (bool, shaped as ``raw``): at (or beyond) the model's input bounds.

    At a bound means equal to it up to float32 rounding: clipped values sit exactly there. A tolerance
    relative to the box's width would let one client with wild values (the box is learned from the
    reference sample) put ordinary inputs "at the bounds"."""
    at_low = raw <= low + 1e-6 * np.maximum(np.abs(low), 1.0)
    at_high = raw >= high - 1e-6 * np.maximum(np.abs(high), 1.0)
    return (at_low | at_high) & (high - low > 1e-6)


def input_summaries(pinned: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Per query (rows of ``pinned``, from :func:`pinned_at_bounds`, and of the standardised input
    ``z``): pinned-at-bounds share, roughness, RMS of z, max |z|, share of |z| > 3 (the
    ``N_SUMMARIES`` summaries), then z's first eight coordinates. Column 1 is also the value behind
    ``InputShapeSignal``'s roughness (before squashing); ``tree_features`` squashes the rest."""
    z = z.astype(np.float64)
    if z.shape[1] > 1:
        num = (np.diff(z, axis=1) ** 2).sum(axis=1)
        den = ((z - z.mean(axis=1, keepdims=True)) ** 2).sum(axis=1) * 2.0 + 1e-6
        rough = num / den
    else:
        rough = np.zeros(len(z))
    absz = np.abs(z)
    return np.column_stack(
        [
            pinned.mean(axis=1),
            rough,
            _squash(np.sqrt((z * z).mean(axis=1)) / 2.0),
            _squash(absz.max(axis=1) / 4.0),
            (absz > 3.0).mean(axis=1),
            z[:, :8],
        ]
    )


def tree_features(summaries: np.ndarray) -> np.ndarray:
    """The summaries as the trees see them: roughness squashed too (it is unbounded)."""
    out = summaries.copy()
    out[:, 1] = _squash(out[:, 1])
    # The logistic of z / 1.5, written with tanh: equal, and it cannot overflow for a far-out z.
    out[:, N_SUMMARIES:] = 0.5 + 0.5 * np.tanh(out[:, N_SUMMARIES:] / 3.0)
    return out


@functools.cache
def _tree_shapes(n_features: int) -> tuple[np.ndarray, np.ndarray]:
    """River's trees for inputs of ``n_features`` columns: split feature and threshold per node, in
    heap order (the trees are complete binary trees of TREE_HEIGHT levels; the children of node i are
    2i+1, for values below its threshold, and 2i+2). River draws them from the seed and the [0, 1]
    limits alone, so they are the same at every rebuild: drawn once per input width."""
    trees = river_anomaly().HalfSpaceTrees(
        n_trees=N_TREES, height=TREE_HEIGHT, window_size=1, seed=SEED, limits={i: (0.0, 1.0) for i in range(n_features)}
    )
    trees.learn_one(dict.fromkeys(range(n_features), 0.5))  # River draws the trees at the first row
    size = 2 ** (TREE_HEIGHT + 1) - 1
    feature = np.zeros((N_TREES, size), dtype=np.int64)
    threshold = np.zeros((N_TREES, size), dtype=np.float64)
    for t, root in enumerate(trees.trees):
        stack = [(root, 0)]
        while stack:
            node, i = stack.pop()
            if hasattr(node, "threshold"):
                feature[t, i], threshold[t, i] = node.feature, node.threshold
                stack += [(node.children[0], 2 * i + 1), (node.children[1], 2 * i + 2)]
    return feature, threshold


class InputDensityModel:
    """River's HalfSpaceTrees fitted on one window of normal inputs; ``score`` is River's anomaly
    score (higher: fewer normal inputs fell into the same half-spaces).

    River draws the trees. Fitting and scoring walk them for a whole batch of rows in numpy: River's
    ``learn_one`` and ``score_one`` walk one row at a time in Python, and the model is refitted at
    every publish and scores every query. Fitting one window is counting the rows that pass through
    each node (River's mass after the window pivots); the masses are integers and the depth weights
    powers of two, so the sums are exact in float64 and the scores equal those of River's
    HalfSpaceTrees fed the same window with ``learn_one`` (tested)."""

    def __init__(self, reference: np.ndarray) -> None:
        rows = tree_features(reference)
        self.window_size = len(rows)
        self._feature, self._threshold = _tree_shapes(rows.shape[1])
        size = self._feature.shape[1]
        counts = np.bincount(self._paths(rows).ravel(), minlength=N_TREES * size)
        self._mass = counts.reshape(N_TREES, size).astype(np.float64)

    def _paths(self, x: np.ndarray) -> np.ndarray:
        """The node each row reaches in each tree at each depth, (TREE_HEIGHT + 1, N_TREES, rows), as
        an index into the flattened (tree, node) arrays. Walked with flat ``take``: two-dimensional
        fancy indexing of the trees and the rows cost twice as much."""
        n_rows, n_features = x.shape
        tree_start = (np.arange(N_TREES) * self._feature.shape[1])[:, None]
        row_start = (np.arange(n_rows) * n_features)[None, :]
        features, thresholds, values = self._feature.ravel(), self._threshold.ravel(), x.ravel()
        nodes = np.zeros((TREE_HEIGHT + 1, N_TREES, n_rows), dtype=np.int64)
        for depth in range(TREE_HEIGHT):
            node = nodes[depth] + tree_start
            left = values.take(row_start + features.take(node)) < thresholds.take(node)
            nodes[depth + 1] = 2 * nodes[depth] + 2 - left  # children 2i+1 (left) and 2i+2
        return nodes + tree_start

    def score(self, summaries: np.ndarray) -> np.ndarray:
        x = tree_features(summaries)
        mass = self._mass.ravel().take(self._paths(x))
        # River stops walking where the mass gets too small: a depth counts while every node above
        # it had at least the size limit.
        enough = mass[:-1] >= 0.1 * self.window_size
        walking = np.concatenate([np.ones((1, *mass.shape[1:]), dtype=bool), np.cumprod(enough, axis=0, dtype=bool)])
        depth_weight = (2.0 ** np.arange(TREE_HEIGHT + 1))[:, None, None]
        # Times the 0/1 mask: np.where's values (masses are finite and never negative), at less cost.
        total = (mass * depth_weight * walking).sum(axis=(0, 1))
        max_score = N_TREES * self.window_size * (2 ** (TREE_HEIGHT + 1) - 1)
        return 1.0 - total / max_score
