"""The FNA authors' landmark rule (``FPS(from_guaranteed=False, use_queries=True)``, :data:`nystrom.FNA_AUTHORS`)
against landmark sets worked out by hand from their ``sample_landmarks``: CLS guaranteed and kept out of the
farthest-point sampling, which runs on the head-averaged queries and starts at the first eligible token."""

import array_api_compat
import numpy as np
import pytest
import torch

import nystrom
from nystrom import FNA_AUTHORS, FPS, NewtonSchulz
from nystrom.linalg.landmarks import farthest_point_sampling
from nystrom.linalg.landmarks.fps import _fps_on_device

# One feature per token, head-averaged query x = (q_head0 + q_head1) / 2:
#   token:  0 (CLS)  1   2   3   4   5
#   x:      10       0   1   5   9   2
X = np.array([10.0, 0.0, 1.0, 5.0, 9.0, 2.0])


def _heads(x, spread=3.0):
    """(1, 2, n, 1) with head mean ``x``: the two heads differ, so a rule on one head alone would differ."""
    x = torch.as_tensor(x, dtype=torch.float64)[:, None]
    return torch.stack([x + spread, x - spread])[None]


def test_the_authors_rule_by_hand():
    # Authors: CLS guaranteed; FPS over tokens 1-5 from token 1 (x = 0). Squared distances to {0}:
    # t2 1, t3 25, t4 81, t5 4 -> token 4. To {0, 9}: t2 1, t3 16, t5 4 -> token 3. To {0, 9, 5}: t2 1, t5 4 -> 5.
    points = X[:, None]
    score = np.where(np.arange(6) == 0, 0.0, -np.inf)
    for m, expected in ((2, [0, 1]), (3, [0, 1, 4]), (4, [0, 1, 4, 3]), (5, [0, 1, 4, 3, 5])):
        assert farthest_point_sampling(points, m, guarantee_score=score, from_guaranteed=False).tolist() == expected
        assert _fps_on_device(np, points, m, None, score, None, False).tolist() == expected
        # The accelerator loop in torch's namespace (run here on the CPU), batched over two equal rows.
        on_torch = _fps_on_device(array_api_compat.array_namespace(torch.zeros(1)), torch.from_numpy(points)
                                  .expand(2, 6, 1), m, None, torch.from_numpy(score).expand(2, 6), None, False)
        assert on_torch.tolist() == [expected, expected]
    # The library's default starts the distances at CLS (x = 10): t1 100 is farthest, then from {10, 0}:
    # t2 1, t3 25, t4 1, t5 4 -> token 3. Another set: the difference the docs describe.
    assert farthest_point_sampling(points, 3, guarantee_score=score).tolist() == [0, 1, 3]


def test_a_padded_token_moves_the_start_to_the_next_eligible_one():
    # Token 1 is padding: FPS starts at token 2 (x = 1). To {1}: t3 16, t4 64, t5 1 -> token 4; to {1, 9}:
    # t3 16, t5 1 -> token 3.
    mask = np.array([True, False, True, True, True, True])
    score = np.where(np.arange(6) == 0, 0.0, -np.inf)
    expected = [0, 2, 4, 3]
    assert farthest_point_sampling(X[:, None], 4, mask=mask, guarantee_score=score,
                                   from_guaranteed=False).tolist() == expected
    assert _fps_on_device(np, X[:, None], 4, mask, score, None, False).tolist() == expected


def test_the_recipe_selects_on_head_averaged_queries():
    # Queries carry X; keys carry another order (x reversed), so selecting on keys would give another set.
    Q, K = _heads(X), _heads(X[::-1].copy())
    V = torch.randn(1, 2, 6, 4, dtype=torch.float64)
    strategy = FNA_AUTHORS["strategy"]
    # One set per sequence, the same for both heads, in selection order (see test_the_authors_rule_by_hand).
    picked = strategy(Q, K, 4, head_axis=-3).indices
    assert picked[0, 0].tolist() == picked[0, 1].tolist() == [0, 1, 4, 3]
    # On the head-averaged keys x' = (2, 9, 5, 1, 0, 10) the same start gives another set: from token 1 (9),
    # t2 16, t3 64, t4 81, t5 1 -> token 4; to {9, 0}: t2 16, t3 1, t5 1 -> token 2.
    on_keys = FPS(first=0, from_guaranteed=False)(Q, K, 4, head_axis=-3).indices
    assert on_keys[0, 0].tolist() == [0, 1, 4, 2]
    # The whole recipe runs through approximate, with 6 Newton-Schulz steps.
    out, info = nystrom.approximate(Q, K, V, num_landmarks=4, return_info=True, **FNA_AUTHORS)
    assert out.shape == V.shape and info.solver_iterations == 6
    assert FNA_AUTHORS["solver"] == NewtonSchulz(iters=6)


def test_recipe_options_are_checked():
    with pytest.raises(TypeError, match="from_guaranteed"):
        FPS(from_guaranteed=1)
    with pytest.raises(TypeError, match="use_queries"):
        FPS(use_queries="q")


@pytest.mark.parametrize("dtype", [bool, np.int64])
def test_a_guarantee_score_must_be_floating(dtype):
    # A review: an integer 0/1 score guaranteed every token (no -inf to say "not guaranteed"), a bool one failed inside
    # numpy; the array API named a promotion rule.
    points = np.random.default_rng(0).standard_normal((10, 3))
    with pytest.raises(TypeError, match="guarantee_score must have dtype float"):
        farthest_point_sampling(points, 3, guarantee_score=np.zeros(10, dtype=dtype))
