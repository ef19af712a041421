r"""Floating-point operation counts of exact and Nyström attention (a multiply-add counts as 2).

Per batch element (a sequence in one head), with :math:`n_q` queries, :math:`n` keys, head sizes
:math:`d, d_v` and :math:`m` landmarks:

* exact: :math:`2 n_q n d` for the logits plus :math:`2 n_q n d_v` for the weighted sum;
* Nyström: :math:`2 m n (d + d_v)` for :math:`\mathrm{softmax}(\tilde q K^\top)V`,
  :math:`2 m^2 d` for :math:`A`, the solve, :math:`2 m^2 d_v` for :math:`A^+ (BV)` and
  :math:`2 n_q m (d + d_v)` for the output product;
* the census of an error estimate (:func:`~nystrom.linalg.bounds.interpolation_weight_norms`):
  :math:`2 n_q m (d + m)` for the logits over the landmark keys and their product with :math:`A^+`;
* the test of a row sample for self-attending queries (:func:`~nystrom.linalg.bounds.self_attending_queries`):
  :math:`2 k d (n + k) + 2 n d` for every query's logits against :math:`k` sampled keys, the sampled keys' own
  queries again, and every query's own logit.

Exponentials and normalisations (:math:`O(n_q n)` resp. :math:`O((n_q + n) m)`) are not counted,
as is usual for attention FLOP counts.
"""

from __future__ import annotations


def exact_attention_flops(batch, n_q, n, d, d_v):
    """FLOPs of exact attention, :math:`2 n_q n (d + d_v)` per sequence.

    Parameters
    ----------
    batch : int
        Independent sequences (batch times heads).
    n_q, n, d, d_v : int
        Queries, keys, query/key size, value size.

    Returns
    -------
    int
    """
    return batch * 2 * n_q * n * (d + d_v)


def nystrom_attention_flops(batch, n_q, n, d, d_v, m, solve_flops=0):
    """FLOPs of Nyström attention by stage (landmark selection not included).

    Parameters
    ----------
    batch, n_q, n, d, d_v, m : int
    solve_flops : int
        FLOPs of one :math:`m\\times m` pseudo-inverse (see the solvers' ``flops`` methods).

    Returns
    -------
    dict
        ``landmark_products``, ``solve``, ``output_product`` and ``total``.
    """
    landmark = batch * (2 * m * n * (d + d_v) + 2 * m * m * (d + d_v))
    solve = batch * solve_flops
    output = batch * 2 * n_q * m * (d + d_v)
    return {"landmark_products": landmark, "solve": solve, "output_product": output,
            "total": landmark + solve + output}


def interpolation_census_flops(batch, n_q, d, m):
    """FLOPs of what a census reads of every query row: the interpolation weights' norms, :math:`2 n_q m (d + m)`
    per sequence (:func:`~nystrom.linalg.bounds.interpolation_weight_norms`), and the queries' own logits of the test
    for queries the landmarks do not represent, :math:`2 n_q d` (:func:`~nystrom.linalg.bounds.unrepresented_queries`,
    which shares the weights' logits: :func:`~nystrom.linalg.bounds.landmark_logit_reads`).

    Parameters
    ----------
    batch, n_q, d, m : int
        Independent sequences, queries, query/key size, landmarks.

    Returns
    -------
    int
    """
    return batch * 2 * n_q * (m * (d + m) + d)


def self_attending_test_flops(batch, n, d, keys):
    """FLOPs of the test for self-attending queries of a row sample, :math:`2 k d (n + k) + 2 n d` per sequence
    (:func:`~nystrom.linalg.bounds.self_attending_queries`: every query's logits against :math:`k` = ``keys`` sampled
    keys, at most :math:`n`, the sampled keys' own queries again against them, and every query's own logit).

    Parameters
    ----------
    batch, n, d, keys : int
        Independent sequences, tokens, query/key size, sampled keys.

    Returns
    -------
    int
    """
    k = min(keys, n)
    return batch * (2 * k * d * (n + k) + 2 * n * d)
