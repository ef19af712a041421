r"""Drop-in Fast Nyström Attention (FNA) and key masking for Hugging Face transformers, without editing them.

FNA replaces the attention of chosen encoder layers, per head, by

.. math::

    \hat O = \mathrm{softmax}(\tau Q \tilde k^\top)\; A^{+}\; \mathrm{softmax}(\tau \tilde q K^\top + M)\, V,
    \qquad A = \mathrm{softmax}(\tau \tilde q \tilde k^\top)

with :math:`m` landmark tokens :math:`\tilde q = Q[s]`, :math:`\tilde k = K[s]` shared by all heads and
:math:`M` the key mask (:func:`nystrom.linalg.attention.nystrom_product` evaluates it through SDPA). Shapes
follow transformers: ``(B, H, n, d)`` for queries, keys and values, ``(B, n, D)`` for a block's input hidden states.

The attention functions are reached through the handler mechanism of :mod:`nystrom.torch.dispatch`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
import weakref
from dataclasses import dataclass, replace

import array_api_compat
import torch

from ..linalg.attention import grouped_query_heads, in_query_chunks, nystrom_factors, nystrom_output
from ..linalg.landmarks.base import (
    Grouping,
    Selection,
    fold_heads,
    get_strategy,
    grouped_landmarks,
    landmarks_at,
    require,
    run_strategy,
    unfold_indices,
)
from ..linalg.numerics import segment_sum, without_padding
from ..linalg.sequence import first_token
from ..linalg.solvers import get_solver, unchecked
from ..linalg.tolerance import EXACT, search_for_tol
from ..linalg.validation import (
    SEED_LIMIT,
    check_error_control,
    check_num_landmarks,
    check_query_chunk_size,
    check_scale,
    check_seed,
    fewest_real_keys,
    warn_below_rounding,
)
from .attention import sdpa_attend
from .autocast import autocast_dtype, with_own_precision
from .dispatch import (
    Handle,
    attentions_requested,
    check_not_causal,
    check_token_spec,
    own_attention_returns_weights,
    padding_mask_from_attention_mask,
    token_mask,
    unknown_block_input,
)
from .masking import masking_handler

__all__ = ["FNAHandle", "LayerRecord", "fna", "patch"]

#: Accepted values of ``patch(resample=...)`` and ``patch(features=...)``.
RESAMPLE = ("once", "every_layer")
FEATURES = ("input", "query", "key", "value")

#: Keywords a transformers model may pass its attention function that do not change the attention of ``query``,
#: ``key`` and ``value`` under the implementations FNA reads (BERT passes ``position_ids``, already applied to its
#: embeddings; the Trainer's ``num_items_in_batch`` only scales the loss). Any other keyword that is not ``None`` or
#: ``False`` (T5's ``position_bias``, a ``sliding_window``, ``softcap``, attention sinks ``s_aux``, packed sequences'
#: ``cu_seq_lens_q``) changes it, and FNA, which cannot honour it, refuses rather than silently drop it.
HARMLESS_KEYWORDS = frozenset({
    "position_ids", "cache_position", "token_type_ids", "encoder_hidden_states", "output_attentions",
    "output_hidden_states", "output_router_logits", "return_dict", "use_cache", "num_items_in_batch",
    # A ViT's forward(interpolate_pos_encoding=True) reaches the attention function too; it acts on the embeddings.
    "interpolate_pos_encoding",
})

#: The attention implementations whose masks FNA reads (``None``: transformers' eager default). Flash attention
#: reads packed sequences from ``position_ids`` and flex attention takes a block mask: neither is a key padding mask.
IMPLEMENTATIONS = (None, "eager", "sdpa")


def fewest_eligible(xp, fewest, everything, excluded):
    """The tokens selection may take in the shortest sequence: its ``fewest`` real ones, or, with ``excluded`` tokens
    ``(B, n)``, the fewest real (``everything``) and not excluded ones (one host read)."""
    return fewest if excluded is None else fewest_real_keys(xp, everything & ~excluded)


def own_attention_answers(num_landmarks, longest, fewest, excludes=False):
    """Whether FNA leaves a layer's pass to the model's own attention: ``num_landmarks`` holds every real token of the
    ``longest`` sequence (and ``excludes``, whether ``exclude=`` leaves out a real token in this pass, is false), or a
    sequence of padding alone (``fewest`` 0) has no token a landmark could stand for. Otherwise FNA uses
    ``min(num_landmarks, fewest)`` landmarks."""
    return (not excludes and num_landmarks >= longest) or fewest == 0


@dataclass(frozen=True)
class LayerRecord:
    """What FNA did in one layer of the last forward pass.

    Attributes
    ----------
    indices : int64 Tensor, shape (B, m), or None
        Token positions of the landmarks, shared by all heads, for strategies that pick tokens (``None`` for
        strategies that group tokens, such as ``norm``, k-means and segment means, and for layers that ran exact
        attention).
    sampled : bool
        ``True`` if chosen in this layer (in some sequence of the batch), ``False`` if reused from the first FNA
        layer in every sequence (``resample="once"``).
    residual : Tensor, shape (B, H), or None
        Relative Moore–Penrose residual of the pseudo-inverse of each head's landmark kernel; ``None`` when the
        layer ran the model's exact attention, because every token would have been a landmark or because
        ``tol`` chose it, and when a solver callable reports none.
    assignment : int64 Tensor, shape (B, n), or None
        For strategies that group tokens: the landmark each token belongs to; ``-1`` for padding and, where the
        grouping ran on a sample (``norm`` and ``kmeans`` past max(1024, 16 m) tokens), for the tokens left out
        of it (each sampled token stands for several, as ``counts`` says).
    counts : Tensor, shape (B, m), or None
        For strategies that group tokens: how many tokens each landmark stands for (1 for a singleton).
    tol_steps : tuple of TolStep
        With ``patch(tol=...)``, in the pass that calibrated this layer: every step of the search, ``(m, estimate,
        solver)`` (see ``approximate(tol=...)``); empty in the other passes.
    """

    indices: torch.Tensor | None
    sampled: bool
    residual: torch.Tensor | None
    assignment: torch.Tensor | None = None
    counts: torch.Tensor | None = None
    tol_steps: tuple = ()


def _nothing():
    return None


class FNAHandle(Handle):
    """FNA installed on some layers of a model; returned by :func:`patch`, yielded by :func:`fna`.

    Attributes
    ----------
    layers : tuple of int
        The FNA layers, ascending.
    records : dict of int to LayerRecord
        Per FNA layer of the last forward pass (:class:`LayerRecord`): the landmark indices (strategies that pick
        tokens) or the grouping and its counts (strategies that group them, as the default ``norm``), whether they
        were sampled there, and the solver residual. Replaced by a new dict at the start of every forward pass: at
        an FNA layer not above the last one that ran. Blocks called by hand in ascending order, as a forward pass
        calls them, are taken as one pass, and with ``resample="once"`` (the default without ``tol``) a higher
        block reuses the lower one's landmarks even on other hidden states (a review: block 10 on image B after
        block 9 on image A); run a lower FNA block, or the model, first to start a new pass.
        Each thread has its own: the records of the last pass that the calling thread ran (passes in several
        threads at a time run apart).
    num_landmarks_per_layer : dict of int to int
        With ``tol``: the :math:`m` each FNA layer calibrated on the first forward pass that could try one, used by
        the later ones where the batch's shortest sequence holds it in tokens not excluded (exact attention
        otherwise; for a layer in ``exact_layers``, the real keys of the calibration batch's shortest sequence).
        :meth:`recalibrate` clears it.
    solver_per_layer : dict of int to Solver or str
        With ``tol``: the solver each FNA layer calibrated with (``solver``, or a stronger one where the search
        escalated, see ``approximate(tol=...)``; ``"exact"`` for a layer in ``exact_layers``), used by the later
        passes.
    exact_layers : set of int
        With ``tol``: the layers where Nyström attention could not reach ``tol`` with at most half the FLOPs of
        exact attention; they run the model's own attention in every pass.
    """

    # Besides the block inputs, a pass keeps its records, the landmarks its layers share (with the eligible and forced
    # tokens they were chosen for), its padding, read once per pass, and the first and last FNA layers it ran.
    PASS_STATE = {**Handle.PASS_STATE, "records": dict, "shared": _nothing, "shared_eligible": _nothing,
                  "shared_forced": _nothing, "padding": _nothing, "first": _nothing, "last": _nothing}

    def __init__(self, model, *, layers, num_landmarks, strategy, solver, resample, features, guarantee, exclude,
                 seed, query_chunk_size, tol=None, max_landmarks=None, strict_tol=False):
        super().__init__(model, layers)
        if resample is None:
            resample = "once" if tol is None else "every_layer"
        if resample not in RESAMPLE:
            raise ValueError(f"resample must be one of {RESAMPLE}, got {resample!r}")
        if tol is not None and resample == "once":
            raise ValueError("tol calibrates m layer by layer, so every layer chooses its own landmarks: pass "
                             "resample='every_layer' (the default with tol), not 'once'")
        self.num_landmarks = check_num_landmarks(num_landmarks, None)
        self.tol, self.max_landmarks = check_error_control(tol, max_landmarks, strict_tol, self.num_landmarks)
        self.strict_tol = strict_tol
        self.num_landmarks_per_layer: dict[int, int] = {}
        self.solver_per_layer: dict = {}
        self.exact_layers: set[int] = set()
        self._calibrating = threading.RLock()
        if features not in FEATURES:
            raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
        for name, spec in (("guarantee", guarantee), ("exclude", exclude)):
            check_token_spec(name, spec)
        self.strategy = get_strategy(strategy)
        # Every FNA layer passes the padding (and exclusions) as a key mask: the strategy must honour it.
        require(self.strategy, "masks", "patch()")
        self.solver = get_solver(solver)
        self.resample = resample
        self.features = features
        self.guarantee = guarantee
        self.exclude = exclude
        self.seed = check_seed(seed)
        self.query_chunk_size = check_query_chunk_size(query_chunk_size)

    def recalibrate(self):
        """Forget the calibration of ``tol``: the next forward pass calibrates every FNA layer again (on a more
        representative batch, say), as the first one did. Its m, solvers and exact layers are cleared together (a
        layer with an m is taken as calibrated)."""
        with self._calibrating:
            self.num_landmarks_per_layer.clear()
            self.solver_per_layer.clear()
            self.exact_layers.clear()

    @property
    def records(self) -> dict[int, LayerRecord]:
        """Per FNA layer, the :class:`LayerRecord` of the last forward pass the calling thread ran."""
        return self._pass.records

    @staticmethod
    def default_layers(num_layers):
        """The later half, ``range(L // 2, L)``: FNA leaves the early layers exact."""
        return tuple(range(num_layers // 2, num_layers))

    def remove(self):
        """Uninstall (:meth:`Handle.remove`) and drop the landmarks shared across layers; :attr:`records` stay."""
        super().remove()
        self._pass.shared = self._pass.shared_eligible = self._pass.shared_forced = self._pass.padding = None
        self._pass.first = self._pass.last = None

    def _attend(self, layer, call_next, module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                is_causal=None, **kwargs):
        if dropout:
            raise ValueError(f"FNA has no attention dropout (got dropout={dropout}); call model.eval() first")
        check_not_causal(module, is_causal, "FNA")
        changing = sorted(name for name, value in kwargs.items()
                          if name not in HARMLESS_KEYWORDS and value is not None and value is not False)
        if changing:
            raise ValueError(f"the attention function of {type(module).__name__} received {', '.join(changing)}, "
                             "which FNA does not know and cannot honour if it changes the attention (a bias, a window, "
                             "sinks): a model that passes it is not supported, and a keyword passed to model(...) "
                             "reaches the attention function too (transformers 5 forwards unknown keywords there: "
                             "leave out one the model ignores, such as head_mask)")
        implementation = getattr(getattr(module, "config", None), "_attn_implementation", None)
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"FNA reads the attention masks of the 'eager' and 'sdpa' attention implementations; "
                             f"this model runs {implementation!r}: load it with attn_implementation='sdpa'")
        if implementation != "sdpa" and isinstance(attention_mask, torch.Tensor) and attention_mask.dtype == torch.bool:
            # Eager attention adds its mask to the logits: a bool one adds 0 and 1 and masks nothing, where FNA would
            # read key padding (a review: the patched model masked padding that the model itself attends to).
            raise ValueError("this model runs 'eager' attention, which adds attention_mask to the logits, so a bool "
                             "4-D mask there masks nothing; pass the 2-D 0/1 attention_mask, from which the model "
                             "builds its additive mask, or an additive float mask (0 attend, -inf masked)")
        # A checkpointed block's recompute runs its attention without the block's input: it must not start a new
        # pass's records.
        recompute = layer not in self.inputs
        if not recompute and (self._pass.last is None or layer <= self._pass.last):
            # A pass starts at the first FNA layer it reaches: the first one, or a later block called on its own (a
            # review: block 4 run alone after a whole pass reused that pass's landmarks, or failed on another shape).
            self._pass.records = {}
            self._pass.shared = self._pass.padding = None
            self._pass.first = layer
        if not recompute:
            self._pass.last = layer
        batch, _, n, d = key.shape
        hidden = self.inputs.get(layer)
        if query.shape[-2] != n or (hidden is not None and tuple(hidden.shape[:-1]) != (batch, n)):
            # Windowed or pooled attention (Hiera, SAM 2): the attention's sequences are not the block's, and its
            # tokens are not the ones FNA selects, guarantees or excludes (a review: an IndexError deep in selection).
            raise ValueError(
                f"FNA layer {layer}: {type(module).__name__} attends over {query.shape[-2]} queries and {n} keys per "
                f"sequence in a batch of {batch}, where its block's input has shape "
                f"{tuple(getattr(hidden, 'shape', ()))} (batch, tokens, features): windowed or pooled attention, which "
                "FNA does not support")
        scale = check_scale(scaling, d)
        real, longest, fewest, everything = self._padding(attention_mask, batch, n, key.device)
        m = self.num_landmarks_per_layer.get(layer, self.num_landmarks)
        if is_causal is not None:
            kwargs["is_causal"] = is_causal

        def own_attention(q, k, v):
            return call_next(module, q, k, v, attention_mask, scaling=scaling, dropout=dropout, **kwargs)

        if recompute and self.exclude is not None:
            # Without the input the exclusion is unknown, and the recompute would choose otherwise than the forward.
            raise unknown_block_input(f"FNA layer {layer}")
        # The exclusion of this pass; one that leaves out no real token changes nothing.
        excluded = None if self.exclude is None else token_mask("exclude", self.exclude, layer, self.inputs[layer])
        excludes = excluded is not None and bool(torch.any(excluded if real is None else excluded & real))
        if layer in self.exact_layers or own_attention_answers(m, longest, fewest, excludes):
            self._pass.records[layer] = LayerRecord(None, False, None)
            return own_attention(query, key, value)
        approximate = functools.partial(self._approximate, layer, module, real=real, fewest=fewest, excluded=excluded,
                                        everything=everything, scale=scale, m=m)
        dtype = autocast_dtype(query.device)
        if dtype is not None:
            # FNA keeps its solve and A^+ (B V) in float32 (nystrom.torch.autocast): its inputs as autocast gives them
            # to SDPA and autocast off for it; on for the model's own attention (an exact step of calibration) as
            # around it.
            def own_under_autocast(q, k, v):
                with torch.autocast(query.device.type, dtype=dtype):
                    return own_attention(q, k, v)

            return with_own_precision(lambda q, k, v: approximate(own_under_autocast, q, k, v), query, key, value)
        if query.dtype == torch.float16:
            # A graph of its own, whose backward keeps float16 gradients in range (nystrom.torch.autocast).
            return with_own_precision(lambda q, k, v: approximate(own_attention, q, k, v), query, key, value)
        return approximate(own_attention, query, key, value)

    # It may answer without calling the model's own attention: it runs innermost, inside key masking and capture.
    _attend.terminal = True

    def _padding(self, attention_mask, batch, n, device):
        """``(real, longest, fewest, everything)`` of this pass's ``attention_mask``: the real tokens ``(B, n)``
        (``None`` without padding), the real tokens of the longest and of the shortest sequence, and the tokens
        eligible before exclusions (``real``, or all). The mask is read once per forward pass, not per layer (one
        host read of two ints, none without padding): the layers of a pass get the same mask object, and the
        same ``everything`` object tells :meth:`_reusable` that nothing changed since the first layer."""
        cached = self._pass.padding
        if cached is not None and (attention_mask is None) == (cached[0] is None) and cached[1] == (batch, n, device) \
                and (attention_mask is None or cached[0]() is attention_mask):
            return cached[2:]
        real = padding_mask_from_attention_mask(attention_mask, batch, n)
        if real is None:
            longest = fewest = n
            everything = torch.ones((batch, n), dtype=torch.bool, device=device)
        else:
            lengths = real.sum(dim=-1)
            longest, fewest = (int(x) for x in torch.stack((lengths.max(), lengths.min())).tolist())
            everything = real
        # A weak reference: the handle must not keep the model's B x n_q x n mask alive between passes (real is its
        # (B, n) copy).
        self._pass.padding = (None if attention_mask is None else weakref.ref(attention_mask), (batch, n, device),
                              real, longest, fewest, everything)
        return real, longest, fewest, everything

    def _approximate(self, layer, module, own_attention, query, key, value, *, real, fewest, excluded, everything,
                     scale, m):
        """FNA's answer for one layer's checked call (:meth:`_attend`): ``(output (B, n, H, d), weights)``, or the
        model's own, ``own_attention(query, key, value)``, where a ``tol`` search gives up on Nyström attention.

        A model with fewer key/value heads than query heads (grouped-query or multi-query attention) passes them as
        it has them, its own attention repeating them: FNA repeats each for the query heads it serves, as SDPA's
        ``enable_gqa``, and the model's own attention gets them as given."""
        given_key, given_value = key, value
        key, value = grouped_query_heads(query, key, value)
        if key is not given_key:
            model_attention = own_attention

            def own_attention(q, k, v):
                return model_attention(q, given_key, given_value)

        xp = array_api_compat.array_namespace(key)
        keys = None if real is None else real[:, None, :]
        key_mask = None if keys is None else keys[..., None, :]
        key, value = without_padding(xp, keys, key, value)
        attend = in_query_chunks(functools.partial(sdpa_attend, scale=scale), self.query_chunk_size)

        memo = {}  # what selection computes whatever m, shared by the steps of a tol search

        def attempt(m, solver):
            landmarks, sampled = self._landmarks(layer, query, key, value, everything, fewest, excluded, scale, m, memo)
            return (landmarks, sampled), nystrom_factors(xp, key, value, landmarks, unchecked(solver), scale=scale,
                                                         mask=key_mask, attend=attend)

        def output(landmarks, sampled, factors, steps):
            return self._output(layer, module, query, key, value, landmarks, sampled, factors, steps, xp=xp, keys=keys,
                                key_mask=key_mask, scale=scale, attend=attend)

        if self.tol is None:
            (landmarks, sampled), factors = attempt(m, self.solver)
            memo.clear()  # what selection kept is not needed for the output
            return output(landmarks, sampled, factors, ())
        found = None
        if layer not in self.num_landmarks_per_layer:
            # One calibration per layer: passes in other threads wait for it, then run at its m (a review: two threads'
            # first passes both searched, and left a layer exact with the other's m recorded beside it).
            with self._calibrating:
                if layer not in self.num_landmarks_per_layer:
                    found = self._calibrate(layer, query, key, value, attempt, xp=xp, keys=keys, attend=attend,
                                            fewest=fewest, excluded=excluded, everything=everything, scale=scale, m=m)
                    memo.clear()
        if found is None:
            # The calibrated m must fit the tokens selection may take in this pass, the real ones not excluded, as
            # _landmarks counts them (a review: a later pass that excluded all but 8 tokens ran a layer calibrated at
            # m = 16 at m = 8, 0.68 off where tol was 0.2, silently).
            return self._attend_calibrated(layer, own_attention, query, key, value,
                                           lambda: fewest_eligible(xp, fewest, everything, excluded), attempt, memo,
                                           output)
        ((landmarks, sampled), factors), steps = found
        if landmarks is None:
            # Exact attention answers: where Nyström attention does not reach tol where it pays (the layer runs the
            # model's own attention from then on), or where the pass could try no m at all (:meth:`_calibrate`).
            self._pass.records[layer] = LayerRecord(None, False, None, tol_steps=steps)
            return own_attention(query, key, value)
        return output(landmarks, sampled, factors, steps)

    def _attend_calibrated(self, layer, own_attention, query, key, value, fewest, attempt, memo, output):
        """A later pass of a calibrated layer: its m and solver, or exact attention where the layer is exact or the
        batch's shortest sequence cannot hold that m (``fewest()``: its real tokens not excluded, read only where m
        is), which would be cut to it for every sequence, and the error it was calibrated for lost, silently (a
        review: a 181-token document beside "Hi." ran at m = 4, 0.57 off where tol was 0.4)."""
        # Read once, under the lock that recalibrate() takes: a calibration it clears meanwhile is no KeyError.
        with self._calibrating:
            m, solver = self.num_landmarks_per_layer.get(layer), self.solver_per_layer.get(layer)
            exact = layer in self.exact_layers
        if exact or m is None or m > fewest():
            self._pass.records[layer] = LayerRecord(None, False, None)
            return own_attention(query, key, value)
        (landmarks, sampled), factors = attempt(m, solver)
        memo.clear()
        return output(landmarks, sampled, factors, ())

    def _calibrate(self, layer, query, key, value, attempt, *, xp, keys, attend, fewest, excluded, everything, scale,
                   m):
        """The first pass of a layer with ``tol`` (under :attr:`_calibrating`): ``(((landmarks, sampled), factors),
        steps)`` of the doubling search of ``approximate(tol=...)`` on 128 exact rows of this layer's own attention,
        ``landmarks`` ``None`` for an exact answer; what later passes reuse is recorded.

        It starts from ``num_landmarks`` clipped to the real tokens of the shortest sequence, as selection clips it,
        and never goes past them. A search that could try no :math:`m` (at most 128 real query rows, or Nyström
        attention paying at no :math:`m` from the start, in sequences this short) records nothing: the layer is
        calibrated by the first pass that can (a review: a warm-up batch of short sentences made every layer exact
        for good)."""
        # The eligible tokens bound m, as selection clips it: with exclude= fewer than the real ones (steps of an m
        # selection could not take repeated the same landmarks, and the stall rule stopped there; a review).
        eligible = fewest_eligible(xp, fewest, everything, excluded)
        if self.guarantee is not None and layer in self.inputs:
            # Guaranteed tokens are landmarks of their own: the search starts where they fit (a review: six guaranteed
            # with num_landmarks=4 raised, where the search would have raised m anyway).
            pinned = token_mask("guarantee", self.guarantee, layer, self.inputs[layer]) & everything
            m = max(m, int(pinned.sum(dim=-1).max()))
        ((landmarks, sampled), factors), steps = search_for_tol(
            xp, query, key, value, attempt, lambda: ((None, False), None),
            first=min(m, eligible), num_keys=eligible, real_keys=fewest, key_mask=keys,
            max_landmarks=self.max_landmarks, tol=self.tol, strict=self.strict_tol, solver=self.solver,
            scale=scale, seed=0, attend=attend, refine=True, where=f"FNA layer {layer}: ")
        if all(step.solver == EXACT for step in steps):
            return ((landmarks, sampled), factors), steps
        # Once per calibration, as approximate(tol=...) warns once per call; not for a pass that calibrates nothing.
        warn_below_rounding(xp, self.tol, query.dtype, where=f"FNA layer {layer}: ")
        # The m used: selection clips m to the eligible tokens (exclude= may leave fewer than the real keys; an exact
        # step records the real keys).
        used = steps[-1].m if landmarks is None else landmarks.keys.shape[-2]
        self.solver_per_layer[layer] = steps[-1].solver
        if steps[-1].solver == EXACT:
            # Nyström attention does not reach tol here where it pays: this layer runs the model's own attention.
            self.exact_layers.add(layer)
        self.num_landmarks_per_layer[layer] = used  # last: a layer in it is calibrated
        return ((landmarks, sampled), factors), steps

    def _output(self, layer, module, query, key, value, landmarks, sampled, factors, steps, *, xp, keys, key_mask,
                scale, attend):
        """The layer's record and output ``(output (B, n, H, d), weights)`` for its landmarks and factors."""
        n = key.shape[-2]
        assignment = landmarks.assignment
        counts = None
        if landmarks.counts is not None:
            counts = landmarks.counts[:, 0]
        elif assignment is not None:
            ones = torch.ones((*assignment.shape, 1), dtype=torch.float32, device=key.device)
            counts = segment_sum(xp, ones, assignment, landmarks.keys.shape[-2])
            counts = counts[..., 0]
        indices = None if landmarks.indices is None else landmarks.indices[:, 0]
        # Detached: a record outlives the pass, and must not keep its autograd graph (the whole forward's activations).
        residual = factors.solve.residual  # None from a solver callable that reports none
        self._pass.records[layer] = LayerRecord(indices, sampled, None if residual is None else residual.detach(),
                                                assignment, counts, steps)
        weights = None
        if attentions_requested() and own_attention_returns_weights(module):
            # The attention FNA applies, F A^+ B (B, H, n, n): its output with the identity for values, so that the
            # weights times V are the output. Only on request (output_attentions=True), and only where the model's
            # own attention returns weights (eager): under SDPA the exact layers return none, transformers drops
            # them from outputs.attentions, and FNA layers that kept theirs would take the exact layers' places.
            # n x n per head.
            identity = torch.eye(n, dtype=value.dtype, device=value.device).expand(*value.shape[:-2], n, n)
            implied = nystrom_factors(xp, key, without_padding(xp, keys, identity)[0], landmarks,
                                      unchecked(self.solver_per_layer.get(layer, self.solver)), scale=scale,
                                      mask=key_mask, attend=attend)
            weights = nystrom_output(xp, query, implied, attend)
        return nystrom_output(xp, query, factors, attend).transpose(1, 2).contiguous(), weights

    def _landmarks(self, layer, query, key, value, everything, fewest, excluded, scale, m, memo):
        """``(Landmarks, sampled)`` of ``m`` landmarks for one layer among ``everything`` (the real tokens
        ``(B, n)``, :meth:`_padding`; ``fewest`` in the shortest sequence) without the ``excluded`` tokens (``(B, n)``
        or ``None``); ``memo`` holds what selection computes whatever ``m``
        (:attr:`~nystrom.linalg.landmarks.Selection.memo`), for the steps of a search on the same inputs."""
        xp = array_api_compat.array_namespace(key)
        hidden = self.inputs.get(layer)
        if hidden is None:
            raise unknown_block_input(f"FNA layer {layer}")
        eligible = everything
        guaranteed = None if self.guarantee is None else token_mask("guarantee", self.guarantee, layer, hidden)
        if excluded is not None:
            # Only among the tokens there are: a guaranteed token that is padding (or masked) is dropped anyway (a
            # review: a position-0 guarantee beside exclude=padding raised under left padding).
            if guaranteed is not None and bool(torch.any(guaranteed & excluded & everything)):
                raise ValueError(f"guarantee and exclude select the same token in layer {layer}: a token cannot "
                                 "be both always and never a landmark")
            eligible = eligible & ~excluded
            fewest = fewest_real_keys(xp, eligible)  # a host read, only where tokens are excluded
        # Guaranteed tokens that are padding (or keys masked by mask_tokens) are no tokens to attend to: dropped.
        forced = None if guaranteed is None else guaranteed & eligible
        # Reused landmarks must still be eligible here and hold this layer's guaranteed tokens (exclusions,
        # guarantees and key masks given as functions may change per layer). A reused grouping takes this
        # layer's own queries and keys: only the assignment is shared, the means are this layer's (O(n d)).
        reuse = None if self._pass.shared is None else self._reusable(eligible, forced)
        # One host read: which sequences keep the shared landmarks.
        keeps = None if reuse is None or reuse is True else reuse.tolist()
        kept = key.shape[0] if reuse is True else 0 if keeps is None else sum(keeps)
        if kept == key.shape[0]:
            shared = self._pass.shared
            if shared.grouping is not None:
                m = shared.keys.shape[-2]
                weighted = shared.log_weights is not None
                return grouped_landmarks(xp, query, key, shared.grouping, m, -3, weighted=weighted), False
            return landmarks_at(xp, query, key, shared.indices), False
        landmarks = self._select(layer, query, key, value, hidden, everything, eligible, fewest, forced, scale, m,
                                 memo)
        if kept and landmarks.keys.shape[-2] == self._pass.shared.keys.shape[-2]:
            # Each sequence keeps or re-chooses its own landmarks, whatever the others do (a review: one sequence whose
            # shared landmark was excluded made every sequence re-choose). A change of m is the batch's (m stops at the
            # eligible tokens of its shortest sequence): then all re-choose.
            return self._merged(xp, reuse, keeps, landmarks, query, key), True
        if self.resample == "once" and layer == self._pass.first:
            # The pass's first FNA layer (a later block called on its own starts a pass too). Later layers reuse the
            # grouping or the indices only, with their own queries and keys: the shared copy
            # holds no autograd graph, which would keep this pass's activations alive after it.
            shared = replace(landmarks, queries=None, keys=landmarks.keys.detach(),
                             log_weights=None if landmarks.log_weights is None else landmarks.log_weights.detach(),
                             counts=None if landmarks.counts is None else landmarks.counts.detach())
            self._pass.shared, self._pass.shared_eligible, self._pass.shared_forced = shared, eligible, forced
        return landmarks, True

    def _reusable(self, eligible, forced):
        """Per sequence ``(B,)``, whether the shared landmarks fit this layer: the same eligible and guaranteed tokens
        for a grouping, eligible tokens that hold every guaranteed one for picked tokens; ``True`` for all without a
        host read where this layer has the first layer's own tokens (no exclusion, no guarantee)."""
        shared = self._pass.shared
        if eligible is self._pass.shared_eligible and forced is None and (shared.grouping is None
                                                                     or self._pass.shared_forced is None):
            return True
        if shared.grouping is not None:
            # No guarantee is no guaranteed token.
            now, before = (torch.zeros_like(eligible) if f is None else f for f in (forced, self._pass.shared_forced))
            return torch.all((now == before) & (eligible == self._pass.shared_eligible), dim=-1)
        indices = shared.indices[:, 0]
        fits = torch.all(torch.gather(eligible, -1, indices), dim=-1)
        if forced is None:
            return fits
        picked = torch.zeros_like(eligible).scatter_(-1, indices, True)
        return fits & ~torch.any(forced & ~picked, dim=-1)

    def _merged(self, xp, reuse, keeps, chosen, query, key):
        """Landmarks that are the shared ones in the sequences where ``reuse (B,)`` holds (``keeps``, its values on the
        host) and ``chosen``'s (of the same :math:`m`) in the others, with this layer's queries and keys."""
        shared = self._pass.shared
        if shared.grouping is None:
            return landmarks_at(xp, query, key, torch.where(reuse[:, None, None], shared.indices, chosen.indices))
        m, n = shared.keys.shape[-2], key.shape[-2]
        none = torch.zeros(0, dtype=torch.int64, device=key.device)

        def row(grouping, b):
            def part(x):
                return x if x is None or x.shape[0] == 1 else x[b:b + 1]

            return _with_singletons(Grouping(part(grouping.labels), part(grouping.tokens), part(grouping.token_labels),
                                             part(grouping.weights)), none, m, n)

        rows = [row(shared.grouping if keep else chosen.grouping, b) for b, keep in enumerate(keeps)]
        return grouped_landmarks(xp, query, key, _stack(rows), m, -3, weighted=shared.log_weights is not None)

    def _first_outside(self, xp, real, allowed):
        """Per sequence ``(B,)``, whether the strategy's ``first`` token (the first real token of ``real (B, n)``) is
        not among the ``allowed (B, n)`` ones (guaranteed: a landmark of its own already; excluded: never one); ``None``
        for a strategy without ``first``, or where nothing is excluded or guaranteed (the same tensor: no host read,
        as on a fake or CUDA device)."""
        first = getattr(self.strategy, "first", None)
        if first is None or allowed is real or not dataclasses.is_dataclass(self.strategy):
            return None
        at_first = first_token(xp, real.shape[-1], first, real, device=real.device)
        return torch.any(at_first & ~allowed, dim=-1)

    def _strategy_for(self, without_first):
        """The strategy, without its ``first`` token where that is outside the allowed tokens of every sequence
        (:meth:`_first_outside`). The strategy counts ``first`` among the tokens its mask allows, so it moved to
        token 1 there (a review: CLS guaranteed with ``norm`` made token 1 a singleton as well, CLS excluded made it
        FPS's first pick)."""
        return replace(self.strategy, first=None) if without_first else self.strategy

    def _select(self, layer, query, key, value, hidden, real, eligible, fewest, forced, scale, m, memo):
        xp = array_api_compat.array_namespace(key)
        features = hidden if self.features == "input" else fold_heads(
            xp, {"query": query, "key": key, "value": value}[self.features], -3)
        # num_landmarks >= n makes every eligible token a landmark (exact attention with a converged solver).
        m = min(m, fewest)
        if m < 1:
            raise ValueError(f"a sequence has no token eligible as a landmark in layer {layer} (all padded, masked "
                             "or excluded)")
        seed = None if self.seed is None else (self.seed + layer) % SEED_LIMIT
        outside = self._first_outside(xp, real, eligible) if forced is None else None
        # One host read: in how many sequences the first token is outside.
        dropped = 0 if outside is None else int(torch.sum(outside))
        if forced is None and dropped in (0, key.shape[0]):
            return run_strategy(self._strategy_for(dropped > 0), Selection(
                xp, query, key, m, eligible[:, None, :], seed, -3, features, scale, memo=memo), check_values=True)
        if forced is None:
            # The strategy's first token is excluded in some sequences only: sequence by sequence, as for guarantees
            # below (with none), so that each keeps its own first token or not (a review: one sequence excluding its
            # CLS took every sequence's CLS singleton away).
            forced = torch.zeros_like(eligible)
        # Guaranteed tokens take their own landmarks; the strategy chooses the other m - P, sequence by sequence (P
        # differs between them). A strategy that picks tokens picks m among every eligible token, the guaranteed
        # ones included, and its first m - P picks that are not guaranteed are kept: its own choice is what it would
        # make without the guarantee (FPS starting from CLS as its `first`, as without guarantee=CLS; on the other
        # tokens alone, FPS's first token was token 1, which guarantee=CLS moved into the picks). A grouping
        # strategy groups the other tokens into m - P groups.
        picks_tokens = getattr(self.strategy, "picks_tokens", False)
        chosen, weighted = [], False
        for b in range(key.shape[0]):
            pinned = torch.nonzero(forced[b])[:, 0]
            if pinned.numel() > m:
                where = ("the m this layer calibrated for tol" if layer in self.num_landmarks_per_layer
                         else "num_landmarks")
                raise ValueError(f"guarantee selects {pinned.numel()} tokens of sequence {b} in layer {layer}, more "
                                 f"than the {m} landmarks of this batch ({where}, or the real tokens of its shortest "
                                 "sequence where that has fewer)")
            rest = None
            if pinned.numel() < m:
                allowed = eligible[b:b + 1] if picks_tokens else eligible[b:b + 1] & ~forced[b:b + 1]
                outside = self._first_outside(xp, real[b:b + 1], allowed)
                rest = run_strategy(self._strategy_for(outside is not None and bool(outside[0])), Selection(
                    xp, query[b:b + 1], key[b:b + 1], m if picks_tokens else m - pinned.numel(), allowed[:, None, :],
                    seed, -3, features[b:b + 1], scale, memo=memo.setdefault(b, {})), check_values=True)
                if picks_tokens:
                    picks = rest.indices[0, 0]
                    rest = replace(rest, indices=picks[~torch.isin(picks, pinned)][None, None, :m - pinned.numel()])
                weighted = weighted or rest.log_weights is not None
            if rest is not None and rest.indices is None and rest.assignment is None:
                raise ValueError(f"guarantee needs a strategy that picks or groups tokens, got {self.strategy!r}, "
                                 "which returned landmarks with neither indices nor an assignment")
            chosen.append((pinned, rest))
        n = key.shape[-2]
        if any(rest is not None and rest.indices is None for _, rest in chosen):
            # A grouping strategy: a sequence whose guaranteed tokens fill all m landmarks is a grouping of those
            # singletons alone (every other token unlabelled), so that every sequence of the batch is one.
            nobody = Grouping(torch.full((1, n), -1, dtype=torch.int64, device=key.device))
            groupings = [_with_singletons(nobody if rest is None else rest.grouping, pinned, m, n)
                         for pinned, rest in chosen]
            return grouped_landmarks(xp, query, key, _stack(groupings), m, -3, weighted=weighted)
        rows = [pinned if rest is None else torch.cat([pinned, rest.indices[0, 0]]) for pinned, rest in chosen]
        return landmarks_at(xp, query, key, unfold_indices(xp, torch.stack(rows), key, -3))


def _with_singletons(grouping, pinned, m, n):
    """One sequence's grouping (``labels (1, n)``) with the ``pinned`` tokens as singletons in the last slots, as a
    token list ``(positions, labels, weights)`` of shape ``(r,)`` each."""
    singles = torch.arange(m - pinned.numel(), m, device=pinned.device)
    labels = grouping.labels[0].clone()
    labels[pinned] = singles
    if grouping.tokens is None:
        tokens, token_labels = torch.arange(n, device=pinned.device), labels
        weights = torch.ones(n, device=pinned.device) if grouping.weights is None else torch.broadcast_to(
            grouping.weights[0], (n,))
    else:
        tokens = torch.cat([grouping.tokens[0], pinned])
        token_labels = torch.cat([grouping.token_labels[0], singles])
        # The sample's weights in their own dtype: float64 models kept them to 1e-8 in float32 (a review).
        stands_for = torch.broadcast_to(grouping.weights[0], grouping.tokens[0].shape)
        weights = torch.cat([stands_for, torch.ones(pinned.numel(), dtype=stands_for.dtype, device=pinned.device)])
    return labels, tokens, token_labels, weights


def _stack(rows):
    """Token lists of different lengths as one :class:`Grouping`, padded with ignored entries (label -1)."""
    length = max(tokens.numel() for _, tokens, _, _ in rows)

    def pad(x, value):
        return torch.cat([x, x.new_full((length - x.numel(),), value)])

    return Grouping(torch.stack([labels for labels, _, _, _ in rows]),
                    tokens=torch.stack([pad(tokens, 0) for _, tokens, _, _ in rows]),
                    token_labels=torch.stack([pad(token_labels, -1) for _, _, token_labels, _ in rows]),
                    weights=torch.stack([pad(weights, 0) for _, _, _, weights in rows]))


def patch(model, *, layers=None, num_landmarks=64, strategy="norm", solver="newton_schulz", resample=None,
          features="input", guarantee=None, exclude=None, mask_tokens=None, seed=None,
          query_chunk_size=None, tol=None, max_landmarks=None, strict_tol=False) -> FNAHandle:
    r"""Replace the attention of the chosen layers of ``model`` by FNA until ``handle.remove()``.

    Parameters
    ----------
    model : torch.nn.Module
        ``ViTModel``, ``Dinov2Model``, ``CLIPVisionModel``, ``BertModel`` (or another transformers encoder whose
        attention modules call ``ALL_ATTENTION_FUNCTIONS``; see :func:`~nystrom.torch.dispatch.attention_layers`),
        in eval mode, with the ``"eager"`` or ``"sdpa"`` attention implementation. The first forward pass raises
        ``ValueError`` for a layer whose attention never reaches those functions, or that passes them a keyword
        changing the attention (``position_bias``, ``sliding_window``, ...).
    layers : int, iterable of int, or None
        FNA layers (negative: counted from the last, ``-1`` the last layer); default the later half,
        ``range(L // 2, L)`` for ``L`` layers (FNA leaves early layers exact).
    num_landmarks : int
        :math:`m`. Clipped to the number of eligible tokens (real, not excluded, not masked) of the shortest
        sequence of the batch. When it covers every real token of every sequence (and nothing is excluded), the
        layer runs the model's own exact attention: that is exact and cheaper, where the Nyström form with the
        default 6 Newton–Schulz steps would still add error (measured on the patching tutorial page). One
        :math:`m` serves the whole batch, so a sequence's answer depends on its batch-mates: next to a shorter one
        it gets fewer landmarks, and a sequence whose every real token is a landmark gets the Nyström form's error
        next to a longer one, where alone it gets the exact attention (a review: 1.3e-2 for 6 tokens at
        :math:`m = 6` beside 12). Batch sequences of alike lengths, or run short ones on their own.
    strategy : str or callable
        Landmark strategy (``"norm"``, ``"fps"``, ``"segment_means"``, ``"uniform"``, ``"kmeans"``,
        ``"rpcholesky"`` or an object), called with ``head_axis=-3`` so all heads share one landmark set.
    solver : str or callable
        Pseudo-inverse of :math:`A` (default 6 Newton–Schulz steps, as FNA).
    resample : {"once", "every_layer"}, optional
        Default ``"once"``, and ``"every_layer"`` with ``tol``. ``"once"`` (FNA's default): the landmarks chosen
        at the first FNA layer of each forward pass are reused by the later FNA layers (re-chosen, sequence by
        sequence, in a layer where one of a sequence's is not eligible or a guaranteed token is missing).
        ``"every_layer"``: chosen anew in each layer. Strategies that build centroids are recomputed in every layer
        either way.
    features : {"input", "query", "key", "value"}
        Per-token features for selection: the block's input hidden states ``(B, n, D)`` (FNA's default; massive
        activations show there in pre-LN blocks such as ViTs', not in post-LN ones such as BERT's, whose block
        input is a LayerNorm's output), or the head-mean of the layer's queries, keys or values ``(B, n, d)``.
    guarantee : bool Tensor or callable, optional
        Tokens that are always landmarks (FNA's ``guarantee_mask``): a bool tensor ``(n,)`` or ``(B, n)``, or
        ``select(layer_index, hidden_states) -> bool (B, n)``. Each is a landmark of its own (a one-token group for
        strategies that group tokens); the strategy fills the remaining slots: one that picks tokens keeps its first
        picks among all eligible tokens that are not guaranteed (so ``guarantee=`` CLS changes nothing for FPS, whose
        ``first`` is CLS), one that groups tokens groups the others (with its ``first`` dropped where that token is
        guaranteed: ``guarantee=`` CLS changes nothing for ``norm`` either). A strategy whose landmarks neither pick
        nor group tokens is a ``ValueError`` in the forward pass.
    exclude : bool Tensor or callable, optional
        Tokens that are never landmarks (FNA's ``exclude_mask``); same forms. They are still attended to. A token
        both guaranteed and excluded is a ``ValueError`` in the forward pass; a guaranteed token that is padding
        is dropped. A pass in which it leaves out no real token runs as without it. Excluding a strategy's ``first``
        token (CLS for ``norm`` and ``fps``) runs it with ``first=None``, not with the next token as its first.
    mask_tokens : bool Tensor or callable, optional
        As :func:`~nystrom.torch.masking.mask_keys` inside the FNA layers: the selected keys get no attention and
        are never landmarks.
    seed : int, optional
        For random strategies; layer ``l`` uses ``seed + l`` (modulo 2**63).
    query_chunk_size : int, optional
        Bound the memory of the final product; see :func:`~nystrom.torch.attention.fna_attention`.
    tol : float, optional
        Error-controlled :math:`m` per layer: on the first forward pass each FNA layer runs the doubling search of
        ``nystrom.approximate(tol=...)`` from ``num_landmarks`` (or the most ``guarantee`` tokens of a sequence, where
        more) on its own attention (128 exact query rows), with
        one more step between the last two doublings (:func:`~nystrom.linalg.tolerance.search_landmarks`'s
        ``refine``: the later passes run at that :math:`m`, so landing within :math:`\sqrt2` of the smallest pays), and
        keeps the :math:`m` it finds, and the solver where the search escalated it, for the later passes
        (``handle.num_landmarks_per_layer``, ``handle.solver_per_layer``; the steps are in that pass's
        ``records[layer].tol_steps``). Each layer then chooses its own landmarks (``resample`` must be
        ``"every_layer"``). A layer where Nyström attention cannot reach ``tol`` with at most half the FLOPs of
        exact attention runs the model's own attention from then on (``handle.exact_layers``). A pass too short to
        try any :math:`m` (at most 128 real query rows, whose estimate would be exact attention itself) answers with
        exact attention and calibrates nothing: the first pass that can calibrates. Calibrate on a representative
        batch: the error of later batches is not checked, and the search's :math:`m` stops at the real tokens of the
        batch's shortest sequence (a 3-token sentence in a batch of long ones can make a layer exact for every later
        batch). A later batch whose shortest sequence holds fewer real tokens than a layer's :math:`m`, or fewer left
        by ``exclude``, runs that layer with exact attention (one :math:`m` serves the batch, and cut to that
        sequence it would no longer meet ``tol``). ``handle.recalibrate()`` makes the next pass calibrate again.
        Passes in several threads calibrate each layer once. A ``tol`` below the rounding of exact attention in the
        layer's dtype, the reference of the estimate, warns at calibration, as ``approximate`` does.
    max_landmarks : int, optional
        A budget on the :math:`m` of the search, as for ``approximate``: below the real tokens of the
        calibration batch's shortest sequence it rules exact attention out.
    strict_tol : bool
        As for ``approximate``: with such a budget, raise instead of warning when a layer cannot reach ``tol``.

    Returns
    -------
    FNAHandle
        ``handle.records`` holds what each FNA layer of the last forward pass did (:class:`LayerRecord`: its
        landmark indices or grouping); ``handle.remove()`` restores exact attention.

    Raises
    ------
    TypeError, ValueError
        For bad arguments (named in the message), at the call; also for a layer that already runs FNA from another
        handle (one approximation per attention; :func:`~nystrom.torch.masking.mask_keys` and
        :func:`~nystrom.torch.capture.capturing` wrap FNA in either order). In the forward pass: ``ValueError``
        for a model in training mode with attention dropout, causal attention, attention masks that are not key
        padding, a keyword that reaches the attention function and that FNA does not know (``head_mask``, which
        transformers 5 forwards there and its own attention ignores: leave it out), or a ``guarantee`` larger than
        the landmark budget (with ``tol``, larger than the :math:`m` a layer calibrated, in the passes after the
        calibration, whose search starts where the guaranteed tokens fit); ``RuntimeError`` under gradient
        checkpointing, which calls the attention outside its block.

    Notes
    -----
    A batch holding a sequence of padding alone runs the model's own attention in that pass (no token to stand for),
    as does a layer whose every token would be a landmark. With ``output_attentions=True`` and a model whose
    attention is eager (``attn_implementation="eager"``), an FNA layer returns the attention it applies,
    :math:`F A^+ B` ``(B, H, n, n)`` (entries may be negative; rows sum to 1 only where :math:`A^+` is exact, as with
    ``solver="pinv"`` on a full-rank kernel: six Newton–Schulz steps leave them up to about 0.3–0.6 from 1 on
    DINOv2-S and MiniLM; the weights times ``V`` are its output in every case), formed only then, at
    :math:`O(n^2 m)`; otherwise it never forms an :math:`n \times n` matrix. Under SDPA the exact
    layers return no weights and transformers leaves them out of ``outputs.attentions``; FNA layers return none
    either, so that the tuple does not hold FNA layers in the exact layers' places.

    See Also
    --------
    fna : the same as a context manager.

    Examples
    --------
    >>> handle = patch(model, layers=range(6, 12), num_landmarks=64)   # doctest: +SKIP
    >>> out = model(pixel_values=px).last_hidden_state                  # doctest: +SKIP
    >>> handle.records[6].counts.shape         # norm: tokens per landmark  # doctest: +SKIP
    torch.Size([1, 64])
    >>> handle.remove()                                                 # doctest: +SKIP
    """
    check_token_spec("mask_tokens", mask_tokens)
    handle = FNAHandle(model, layers=layers, num_landmarks=num_landmarks, strategy=strategy, solver=solver,
                       resample=resample, features=features, guarantee=guarantee, exclude=exclude, seed=seed,
                       query_chunk_size=query_chunk_size, tol=tol, max_landmarks=max_landmarks,
                       strict_tol=strict_tol)
    handlers = [handle._attend]
    if mask_tokens is not None:
        handlers.append(functools.partial(masking_handler, "mask_tokens", mask_tokens, handle))
    return handle.install(*handlers)


@contextlib.contextmanager
def fna(model, **options):
    """Context manager form of :func:`patch`: FNA inside the ``with`` block, exact attention after it.

    Parameters
    ----------
    model : torch.nn.Module
        As for :func:`patch`.
    **options
        The keyword arguments of :func:`patch` (``layers``, ``num_landmarks``, ``strategy``, ``solver``, ``tol``,
        ...), with its defaults and meaning.

    Yields
    ------
    FNAHandle
        :func:`patch`'s handle; the model is restored on exit, also when the block raises.

    Examples
    --------
    >>> with fna(model, num_landmarks=64) as handle:           # doctest: +SKIP
    ...     out = model(pixel_values=px).last_hidden_state
    """
    handle = patch(model, **options)
    try:
        yield handle
    finally:
        handle.remove()
