"""The compiled forest's level-by-level walk reaches the same leaves, bit for bit.

``_Forest.margin`` walks each level's splits in their own arrays and gathers only the
leaves' values; here the session-4 walk over the flat node table (children from
``left``, values from ``val``) recomputes the margins of shipped-model feature rows,
perturbed and with missing values, for batches of several sizes and for single rows.
"""

from __future__ import annotations

import numpy as np
import pytest
from goodserve.dispatcher.predictor import features as F
from goodserve.dispatcher.predictor.model import OutputLengthPredictor, PredictorInput, _Forest


def _flat_walk(forest: _Forest, x: np.ndarray) -> np.ndarray:
    """The walk over the flat node table (node i of tree t at t * S + i)."""
    n_rows, n_feat = x.shape
    flat = x.reshape(-1)
    rowoff = (np.arange(n_rows, dtype=np.intp) * n_feat)[:, None]
    k = np.broadcast_to(forest.roots, (n_rows, forest.n_trees))
    for _ in range(forest.depth):
        k = forest.left.take(k) + (flat.take(forest.feat.take(k) + rowoff) >= forest.thr.take(k))
    leaves = np.ascontiguousarray(forest.val.take(k, axis=1)).reshape(-1, forest.n_trees)
    out: np.ndarray = leaves.sum(axis=-1).reshape(forest.n_out, n_rows).T + forest.base_score
    return out


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    p = OutputLengthPredictor.default()
    xs = [
        PredictorInput(
            input_tokens=n,
            task=F.TASKS[n % len(F.TASKS)],
            model=f"m{n % 5}",
            prompt="explain the plan step by step " * (n % 13),
            step=n % 4,
        )
        for n in range(1, 4000, 37)
    ]
    return np.asarray([p.features(x) for x in xs], dtype=np.float32)


def test_level_walk_reaches_the_flat_walks_leaves(rows: np.ndarray) -> None:
    forest = OutputLengthPredictor.default()._forest
    assert forest.depth > 0
    rng = np.random.default_rng(3)
    for trial in range(40):
        x = rows[rng.integers(0, len(rows), int(rng.integers(1, 100)))].copy()
        if trial % 2:
            x += (rng.normal(size=x.shape) * rng.uniform(0.0, 2.0)).astype(np.float32)
        if trial % 5 == 0:
            x[rng.random(x.shape) < 0.05] = np.nan
        want = _flat_walk(forest, x)
        assert forest.margin(x).tobytes() == want.tobytes()
        for r in range(min(3, len(x))):
            assert forest.margin_row(x[r]).tobytes() == want[r].tobytes()
