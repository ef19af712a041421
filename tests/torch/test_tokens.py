"""Tests for ``nystrom.torch.tokens`` (outlier-token detectors, per-layer analysis, suppression experiment)
and ``nystrom.experiments.token_plots``.

The detectors are checked on synthetic tokens with injected outliers and on plain Gaussian tokens; the
analysis against what transformers itself returns (``output_hidden_states``, ``output_attentions``) on tiny
random models, then on the real all-MiniLM-L6-v2 and DINOv2-S, whose measured token structure it must
reproduce. The real-model tests skip without the weight packages.
"""

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

transformers = pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
from model_packages import requires_dinov2, requires_minilm  # noqa: E402
from plot_checks import unreadable_axes  # noqa: E402

import nystrom  # noqa: E402
from nystrom.experiments import pretrained  # noqa: E402
from nystrom.experiments import token_plots as plots  # noqa: E402
from nystrom.linalg import tokens as detectors  # noqa: E402
from nystrom.linalg.numerics import softmax  # noqa: E402
from nystrom.torch import dispatch, tokens  # noqa: E402

SEEDS = range(5)


@pytest.fixture(params=["numpy", "torch"])
def to_array(request):
    """The detectors are array-API functions: every synthetic test runs on numpy and on torch."""
    if request.param == "numpy":
        return np.asarray
    return torch.as_tensor


def as_numpy(a):
    return a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


# --------------------------------------------------------------------------------------------------------------
# detect_massive_activations
# --------------------------------------------------------------------------------------------------------------


class TestMassive:
    def test_finds_injected_activation(self, to_array):
        hidden = np.random.default_rng(0).standard_normal((2, 32, 64))
        hidden[1, 5, 17] = -5000.0  # ~7000x the median |a| of a standard normal (0.674)
        found = detectors.detect_massive_activations(to_array(hidden))
        expected = np.zeros((2, 32), dtype=bool)
        expected[1, 5] = True
        np.testing.assert_array_equal(as_numpy(found.mask), expected)
        assert int(found.channel[1, 5]) == 17 and float(found.value[1, 5]) == -5000.0
        assert 0.6 < float(found.median[1]) < 0.75

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    def test_a_half_precision_peak_is_compared_with_the_threshold_unrounded(self, dtype):
        # 1,000 times a bfloat16 median of 1.171875 is 1,171.875, which bfloat16 rounds to 1,168: a peak of 1,168 was
        # flagged, 0.33 % under the threshold (a review). Both dtypes hold 1,168 and 1,176 exactly.
        hidden = torch.full((1, 5, 4), 1.171875, dtype=dtype)
        for peak, massive in ((1168.0, False), (1176.0, True)):
            hidden[0, 2, 1] = peak
            assert bool(detectors.detect_massive_activations(hidden).mask[0, 2]) is massive

    def test_needs_both_rules(self, to_array):
        hidden = np.random.default_rng(1).standard_normal((1, 32, 64))
        hidden[0, 3, 0] = 500.0  # above 100 but only ~740x the median
        assert not as_numpy(detectors.detect_massive_activations(to_array(hidden)).mask).any()
        assert as_numpy(detectors.detect_massive_activations(to_array(hidden), median_ratio=500).mask)[0, 3]
        small = 0.01 * hidden
        small[0, 3, 0] = 90.0  # ~13000x the median but below 100
        assert not as_numpy(detectors.detect_massive_activations(to_array(small)).mask).any()
        assert as_numpy(detectors.detect_massive_activations(to_array(small), abs_threshold=50).mask)[0, 3]

    def test_padding_is_neither_flagged_nor_in_the_median(self, to_array):
        hidden = 0.01 * np.random.default_rng(2).standard_normal((1, 16, 8))
        hidden[0, 2, 4] = 200.0
        hidden[0, 6:] = 1000.0  # padding: would make the median 1000 if it counted
        real = np.arange(16)[None] < 6
        found = detectors.detect_massive_activations(to_array(hidden), attention_mask=to_array(real))
        expected = np.zeros((1, 16), dtype=bool)
        expected[0, 2] = True
        np.testing.assert_array_equal(as_numpy(found.mask), expected)
        assert not as_numpy(detectors.detect_massive_activations(to_array(hidden)).mask).any()

    @pytest.mark.parametrize("seed", SEEDS)
    def test_nothing_on_gaussian_tokens(self, seed):
        # Over 50 seeds the largest |a| of (4, 64, 128) standard normals is < 7.6x the median (and < 7 absolute).
        hidden = np.random.default_rng(seed).standard_normal((4, 64, 128))
        assert not detectors.detect_massive_activations(hidden, abs_threshold=1.0, median_ratio=20).mask.any()


# --------------------------------------------------------------------------------------------------------------
# detect_high_norm_tokens
# --------------------------------------------------------------------------------------------------------------


class TestHighNorm:
    @pytest.mark.parametrize("scale", [1e-25, 1e20, 1e30])
    def test_the_same_tokens_at_any_scale(self, scale):
        # A review: [7] at scale 1 but none at 1e20 or 1e-25 in float32, whose sums of squares overflowed or vanished.
        hidden = np.random.default_rng(0).standard_normal((1, 20, 16)).astype(np.float32)
        hidden[0, 7] *= 30
        scaled = (hidden * np.float32(scale)).astype(np.float32)
        assert np.flatnonzero(detectors.detect_high_norm_tokens(scaled)[0]).tolist() == [7]

    def test_finds_injected_patch_tokens_but_not_cls(self, to_array):
        hidden = np.random.default_rng(3).standard_normal((2, 65, 64))
        hidden[0, [3, 17, 40]] *= 10
        hidden[:, 0] *= 10  # the CLS token is excluded by default
        expected = np.zeros((2, 65), dtype=bool)
        expected[0, [3, 17, 40]] = True
        np.testing.assert_array_equal(as_numpy(detectors.detect_high_norm_tokens(to_array(hidden))), expected)
        expected[:, 0] = True
        np.testing.assert_array_equal(as_numpy(detectors.detect_high_norm_tokens(to_array(hidden), exclude=())),
                                      expected)
        by_mask = np.zeros((2, 65), dtype=bool)
        by_mask[:, [0, 17]] = True
        expected[:, 0] = expected[:, 17] = False
        np.testing.assert_array_equal(
            as_numpy(detectors.detect_high_norm_tokens(to_array(hidden), exclude=to_array(by_mask))), expected)

    def test_float16_norms_past_256_are_measured(self, to_array):
        # A float16 sum of squares overflows past norms of 256: the median was inf and nothing was flagged.
        hidden = np.random.default_rng(6).standard_normal((1, 20, 64)) * 39  # norms about 310
        hidden[0, 5] *= 10
        got = detectors.detect_high_norm_tokens(to_array(hidden.astype(np.float16)))
        assert np.flatnonzero(as_numpy(got)[0]).tolist() == [5]

    def test_a_sequence_left_without_tokens_names_what_was_passed(self):
        # One token and the default exclude=(0,): the message named an attention_mask nobody passed (review).
        with pytest.raises(ValueError, match=r"^exclude leaves a sequence without any token to test \(exclude=\(0,\)"):
            detectors.detect_high_norm_tokens(np.ones((1, 1, 4)))
        with pytest.raises(ValueError, match="^exclude and attention_mask leave a sequence without any token"):
            detectors.detect_high_norm_tokens(np.ones((1, 3, 4)), attention_mask=np.array([[True, False, False]]))

    def test_ratio_is_the_threshold(self):
        hidden = np.random.default_rng(4).standard_normal((1, 65, 256))  # norms within ~10 % of 16
        hidden[0, 9] *= 3
        assert not detectors.detect_high_norm_tokens(hidden).any()
        assert np.flatnonzero(detectors.detect_high_norm_tokens(hidden, ratio=2.0)[0]).tolist() == [9]

    def test_padding(self, to_array):
        hidden = np.random.default_rng(5).standard_normal((1, 40, 32))
        hidden[0, 30:] *= 100  # padding with huge norms: ignored, and kept out of the median
        hidden[0, 7] *= 10
        real = np.arange(40)[None] < 30
        found = as_numpy(detectors.detect_high_norm_tokens(to_array(hidden), attention_mask=to_array(real)))
        assert np.flatnonzero(found[0]).tolist() == [7]

    def test_positions_count_among_the_real_tokens(self, to_array):
        # Left padding: position 0 of the shorter row is padding and its [CLS] (rank 0, ten times the others' norm,
        # as CLS often is) sits at position 3. The default exclude=(0,) is [CLS] in both rows; it tested the CLS of
        # the left-padded row as an artifact. -1 is each row's last real token (BERT's [SEP]), not the last position.
        hidden = np.random.default_rng(7).standard_normal((2, 12, 32))
        real = np.ones((2, 12), dtype=bool)
        real[1, :3] = False
        hidden[0, 0] *= 10
        hidden[1, 3] *= 10
        hidden[1, :3] *= 100  # padding with huge norms
        found = as_numpy(detectors.detect_high_norm_tokens(to_array(hidden), attention_mask=to_array(real)))
        assert not found.any()
        hidden[:, -1] *= 10
        right = np.ones((2, 12), dtype=bool)
        right[0, 9:] = False  # right padding in row 0: its last real token is at 8
        hidden[0, 8] *= 10
        mask = to_array(right & real)
        found = as_numpy(detectors.detect_high_norm_tokens(to_array(hidden), attention_mask=mask))
        assert [np.flatnonzero(row).tolist() for row in found] == [[8], [11]]
        assert not as_numpy(detectors.detect_high_norm_tokens(to_array(hidden), exclude=(0, -1),
                                                              attention_mask=mask)).any()
        # Without a mask positions are positions: the CLS at 3 is flagged (and the last token, 11).
        found = as_numpy(detectors.detect_high_norm_tokens(to_array(hidden[1:, 3:]), exclude=(1,)))
        assert np.flatnonzero(found[0]).tolist() == [0, 8]

    def test_one_sequence_mask_serves_the_batch(self, to_array):
        # An (n,) mask broadcasts over a batch (numpy's rule); the detectors refused it for (B, n, D) tokens.
        hidden = np.random.default_rng(8).standard_normal((3, 20, 16))
        hidden[:, 15:] *= 100
        hidden[:, 4] *= 2000
        share = softmax(np, hidden[..., 0], None)
        real = np.arange(20) < 15
        batched = np.broadcast_to(real, (3, 20)).copy()
        for detect, x in ((detectors.detect_high_norm_tokens, hidden), (detectors.detect_sinks, share),
                          (lambda h, **k: detectors.detect_massive_activations(h, **k).mask, hidden)):
            one = as_numpy(detect(to_array(x), attention_mask=to_array(real)))
            np.testing.assert_array_equal(one, as_numpy(detect(to_array(x), attention_mask=to_array(batched))))
            assert one[:, 4].all() and not one[:, 15:].any()

    @pytest.mark.parametrize("seed", SEEDS)
    def test_nothing_on_gaussian_tokens(self, seed):
        # Over 50 seeds the largest norm of (4, 64, 128) standard normals is < 1.26x the median.
        hidden = np.random.default_rng(seed).standard_normal((4, 64, 128))
        assert not detectors.detect_high_norm_tokens(hidden, ratio=1.5).any()


# --------------------------------------------------------------------------------------------------------------
# detect_sinks
# --------------------------------------------------------------------------------------------------------------


def gaussian_share(seed, n=64, d=64, bias=None):
    """Exact attention share of each key for Gaussian queries and keys, optionally with per-key logit bias."""
    rng = np.random.default_rng(seed)
    Q, K = rng.standard_normal((2, n, d))
    logits = Q @ K.T / np.sqrt(d)
    if bias is not None:
        logits = logits + bias
    return softmax(np, logits, None).mean(axis=0)


class TestSinks:
    def test_a_batch_mask_of_per_head_shares_must_name_the_head_axis(self):
        # A review: a (B, n) mask of (B, H, n) shares broadcast to the right, B read as H; with B == H the sink of
        # batch 0, head 1 was lost silently. The mask must have the shares' dimensions.
        share = np.full((2, 2, 6), 0.04)
        share[0, :, 5] = 0.8
        mask = np.array([[1] * 6, [1, 1, 1, 0, 0, 0]])
        with pytest.raises(ValueError, match="is ambiguous: broadcasting aligns it to the right"):
            detectors.detect_sinks(share, attention_mask=mask)
        found = detectors.detect_sinks(share, attention_mask=mask[:, None, :])
        assert found[0, :, 5].all() and found.sum() == 2
        # A (B, n) mask of (layers, B, n) values fits only aligned to the right, as documented: taken.
        stacked = np.stack([share[:, 0]] * 3)
        np.testing.assert_array_equal(detectors.detect_sinks(stacked, attention_mask=mask),
                                      detectors.detect_sinks(stacked, attention_mask=np.stack([mask] * 3)))

    def test_finds_a_token_that_takes_half_the_attention(self, to_array):
        bias = np.zeros(48)
        # Equal odds against the 47 other keys, whose N(0, 1) logits weigh E[e^x] = e^(1/2) each.
        bias[7] = np.log(47.0) + 0.5
        share = gaussian_share(6, n=48, d=32, bias=bias)
        assert 0.4 < share[7] < 0.6
        found = as_numpy(detectors.detect_sinks(to_array(share)))
        assert np.flatnonzero(found).tolist() == [7]

    def test_a_float16_share_counts_more_real_keys_than_float16_holds(self):
        # The real keys were counted in the share's dtype: past 65,504 the count was inf, the threshold 0, and every
        # key a sink (a review).
        n = 70000
        share = torch.full((n,), 1 / n).half()
        assert not detectors.detect_sinks(share, attention_mask=torch.ones(n, dtype=torch.bool)).any()

    @pytest.mark.parametrize("masked", [False, True])
    def test_a_half_precision_share_is_compared_with_the_threshold_unrounded(self, masked):
        # float16 holds 2/3 as 0.66650 < 2/3: compared with rho / n rounded to float16 it was a sink, and only without a
        # mask (a review); 0.66699 > 2/3 is one either way.
        mask = torch.ones(1, 3, dtype=torch.bool) if masked else None
        for value, sink in ((2 / 3, False), (0.667, True)):
            share = torch.tensor([[value, 0.2, 0.1]], dtype=torch.float16)
            assert bool(detectors.detect_sinks(share, ratio=2.0, attention_mask=mask)[0, 0]) is sink

    def test_uniform_share_counts_real_keys_only(self, to_array):
        share = np.zeros(40)
        share[:20] = 0.85 / 19
        share[0] = 0.15  # 3x the uniform 1/20 of the real keys, 6x 1/40
        real = np.arange(40) < 20
        assert not as_numpy(detectors.detect_sinks(to_array(share), attention_mask=to_array(real))).any()
        assert as_numpy(detectors.detect_sinks(to_array(share)))[0]

    @pytest.mark.parametrize("seed", SEEDS)
    def test_nothing_on_gaussian_attention(self, seed):
        # Over 50 seeds no key of Gaussian attention (n = d = 64) gets more than 2.1x the uniform share.
        assert not detectors.detect_sinks(gaussian_share(seed), ratio=3.0).any()


class TestValidation:
    @pytest.mark.parametrize("call", [
        lambda h: detectors.detect_massive_activations(h, abs_threshold=0),
        lambda h: detectors.detect_massive_activations(h, median_ratio=-1),
        lambda h: detectors.detect_high_norm_tokens(h, ratio=float("inf")),
        lambda h: detectors.detect_sinks(h[..., 0], ratio=0),
    ])
    def test_non_positive_thresholds(self, call):
        with pytest.raises(ValueError, match="abs_threshold|median_ratio|ratio"):
            call(np.ones((2, 4, 3)))

    def test_messages_name_the_argument(self):
        h = np.ones((2, 4, 3))
        with pytest.raises(TypeError, match="ratio"):
            detectors.detect_high_norm_tokens(h, ratio="4")
        with pytest.raises(TypeError, match="hidden"):
            detectors.detect_massive_activations(np.ones((2, 4, 3), dtype=np.int64))
        with pytest.raises(ValueError, match="hidden"):
            detectors.detect_massive_activations(np.ones(3))
        with pytest.raises(ValueError, match="attention_mask"):
            detectors.detect_sinks(h[..., 0], attention_mask=np.ones(5, dtype=bool))
        with pytest.raises(ValueError, match="exclude"):
            detectors.detect_high_norm_tokens(h, exclude=(4,))
        with pytest.raises(TypeError, match="exclude"):
            detectors.detect_high_norm_tokens(h, exclude=np.zeros(4))
        with pytest.raises(ValueError, match="without any token"):
            detectors.detect_high_norm_tokens(h, exclude=range(4))


# --------------------------------------------------------------------------------------------------------------
# analyze_tokens on tiny random models: the fields are the tensors the docs say they are
# --------------------------------------------------------------------------------------------------------------


def tiny_bert(attn_implementation="eager"):
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32,
                                     attn_implementation=attn_implementation)
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


# Pre-LayerNorm vision encoders and the name of the norm in front of their attention. CLIP also normalises
# the embeddings before the first block (pre_layrnorm), which must not be mistaken for a post-LN layout.
TINY_VISION = {
    "dinov2": ("Dinov2Model", "Dinov2Config", "norm1"),
    "vit": ("ViTModel", "ViTConfig", "layernorm_before"),
    "clip": ("CLIPVisionModel", "CLIPVisionConfig", "layer_norm1"),
}


def tiny_vision(name):
    model_class, config_class, _ = TINY_VISION[name]
    config = getattr(transformers, config_class)(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                                 intermediate_size=64, image_size=56, patch_size=14,
                                                 attn_implementation="eager")
    torch.manual_seed(0)
    return getattr(transformers, model_class)(config).eval()


def reference_share(attentions, real):
    """Share of each key averaged over heads and real queries, from transformers' own attention maps."""
    out = []
    for A in attentions:
        weights = A * real[:, None, :, None]
        out.append(weights.sum(dim=(1, 2)) / (A.shape[1] * real.sum(dim=-1, keepdim=True)))
    return torch.stack(out).numpy()


# float32 forward passes; the analysis recomputes norms and shares from the same tensors, so they agree to
# a few float32 ulps of the summed quantities (measured equal, or 1 ulp).
TIGHT = dict(rtol=1e-5, atol=1e-6)


def test_post_layernorm_fields_match_transformers():
    model = tiny_bert()
    ids = torch.randint(1, 50, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    analysis = tokens.analyze_tokens(model, inputs)
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True, output_attentions=True)
    assert analysis.norm_placement == ("post",) * 3
    # Post-LN: the normalised tensor is the block input itself.
    for layer in range(3):
        np.testing.assert_allclose(analysis.normed_norms[layer], out.hidden_states[layer].norm(dim=-1).numpy(),
                                   **TIGHT)
    # ... and the residual of layer l >= 1 is what the previous block's last LayerNorm normalised.
    seen = {}
    handle = model.encoder.layer[0].output.LayerNorm.register_forward_hook(
        lambda module, args, output: seen.update(residual=args[0]))
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    np.testing.assert_allclose(analysis.residual_norms[1], seen["residual"].norm(dim=-1).numpy(), **TIGHT)
    np.testing.assert_allclose(analysis.attention_share, reference_share(out.attentions, mask.bool()), **TIGHT)
    # 10 float32 shares sum to 1 up to 10 eps32 / 2 = 6e-7 (measured 6e-8, 1 ulp).
    np.testing.assert_allclose(analysis.attention_share.sum(axis=-1), 1.0, rtol=0, atol=1e-6)
    assert not analysis.attention_share[:, 1, 7:].any()
    assert not (analysis.massive | analysis.artifact | analysis.sink)[:, ~analysis.token_mask].any()


def test_analyze_tokens_excludes_the_cls_of_left_padded_rows():
    # Left padding puts [CLS] at the first real position; the default exclude=(0,) named position 0, a pad in the
    # shorter row, so that row's [CLS] was tested as an artifact and its padding excluded.
    ids = torch.randint(1, 50, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :4] = 0
    analysis = tokens.analyze_tokens(tiny_bert(), {"input_ids": ids, "attention_mask": mask})
    assert [np.flatnonzero(row).tolist() for row in analysis.excluded] == [[0], [4]]
    assert not analysis.artifact[:, 1, 4].any()


@pytest.mark.parametrize("name", TINY_VISION)
def test_pre_layernorm_fields_match_transformers(name):
    model = tiny_vision(name)
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    analysis = tokens.analyze_tokens(model, {"pixel_values": pixels})
    with torch.no_grad():
        out = model(pixel_values=pixels, output_hidden_states=True, output_attentions=True)
    assert analysis.norm_placement == ("pre",) * 3
    blocks = [block for block, _ in dispatch.attention_layers(model)]
    for layer in range(3):
        hidden = out.hidden_states[layer]
        np.testing.assert_allclose(analysis.residual_norms[layer], hidden.norm(dim=-1).numpy(), **TIGHT)
        with torch.no_grad():
            normed = getattr(blocks[layer], TINY_VISION[name][2])(hidden)
        np.testing.assert_allclose(analysis.normed_norms[layer], normed.norm(dim=-1).numpy(), **TIGHT)
        top = hidden.abs().max(dim=-1)
        np.testing.assert_array_equal(analysis.max_channel[layer], top.indices.numpy())
        np.testing.assert_allclose(np.abs(analysis.max_activation[layer]), top.values.numpy(), **TIGHT)
    np.testing.assert_allclose(analysis.attention_share, reference_share(out.attentions, torch.ones(2, 17) > 0),
                               **TIGHT)
    assert analysis.excluded[:, 0].all() and not analysis.excluded[:, 1:].any()


def test_analyze_tokens_rejects_bad_models_and_inputs():
    ids = {"input_ids": torch.ones(1, 4, dtype=torch.long)}
    with pytest.raises(ValueError, match="load the model with attn_implementation='eager'"):
        tokens.analyze_tokens(tiny_bert("sdpa"), ids)
    # An eager model inside FNA: FNA answers the attention itself, so the message names it, not the loading.
    eager = tiny_bert()
    with nystrom.fna(eager, num_landmarks=2, layers=[1]):
        with pytest.raises(ValueError, match=r"FNA \(nystrom\.fna or nystrom\.torch\.patch\) computes the "
                                             r"attention of layers \[1\] itself"):
            tokens.analyze_tokens(eager, ids)
    tokens.analyze_tokens(eager, ids)
    model = tiny_bert()
    with pytest.raises(TypeError, match="inputs"):
        tokens.analyze_tokens(model, [ids["input_ids"]])
    with pytest.raises(ValueError, match="sink_ratio"):
        tokens.analyze_tokens(model, ids, sink_ratio=0)
    with pytest.raises(ValueError, match="eval"):
        tokens.analyze_tokens(model.train(), ids)
    model.eval()
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got dict"):
        tokens.analyze_tokens({"model": model}, ids)
    # A review: exclude=0 was told to be "an array of an array-API library", and a wrong-shaped bool exclude was
    # measured against (layers, B, n), a shape the caller never made.
    with pytest.raises(TypeError, match=r"exclude must be a sequence of token positions \(such as \(0,\)\) or a bool"):
        tokens.analyze_tokens(model, ids, exclude=0)
    with pytest.raises(ValueError, match=r"broadcastable to \(1, 4\), got \(2, 4\)"):
        tokens.analyze_tokens(model, ids, exclude=torch.zeros(2, 4, dtype=torch.bool))
    # A numpy bool array was refused as "got dtype bool" for a bool array (a review).
    with pytest.raises(TypeError, match=r"bool array of the inputs' library \(torch\), got numpy.ndarray"):
        tokens.analyze_tokens(model, ids, exclude=np.zeros((1, 4), dtype=bool))
    with pytest.raises(ValueError, match=r"inputs\['attention_mask'\] must be a \(B, n\) tensor"):
        tokens.analyze_tokens(model, {**ids, "attention_mask": torch.ones(1, 1, 4)})
    with pytest.raises(ValueError, match=r"inputs\['attention_mask'\] has shape \(2, 4\) but the model ran on "
                                         r"\(1, 4\) tokens"):
        tokens.analyze_tokens(model, {**ids, "attention_mask": torch.ones(2, 4)})
    # A mask longer than the sequence, which the model itself accepts: torch's size-mismatch RuntimeError from inside
    # the forward pass before (a review); a list is a TypeError.
    with pytest.raises(ValueError, match=r"has shape \(1, 5\) but the model ran on \(1, 4\) tokens"):
        tokens.analyze_tokens(model, {**ids, "attention_mask": torch.ones(1, 5, dtype=torch.long)})
    with pytest.raises(TypeError, match=r"inputs\['attention_mask'\] must be a \(B, n\) tensor .* got list"):
        tokens.analyze_tokens(model, {**ids, "attention_mask": [[1, 1, 1, 1]]})
    # A float16 model whose residual stream overflows: the detectors' message named their argument "hidden", which the
    # caller never passed (a review); the layers are named instead.
    half = tiny_bert().half()
    with torch.no_grad():
        half.embeddings.word_embeddings.weight[7, 5] = 6e4
        half.embeddings.token_type_embeddings.weight[0, 5] = 6e4
    with pytest.raises(ValueError, match=r"the residual stream of layers \[0, 1, 2\] holds NaN or infinite values "
                                         r"\(torch.float16 activations that overflow: run the model in float32\)"):
        tokens.analyze_tokens(half, {"input_ids": torch.tensor([[8, 9, 7, 10]])})


# --------------------------------------------------------------------------------------------------------------
# Real models
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    model, tokenizer = pretrained.load_minilm(attn_implementation="eager")
    batch = dict(tokenizer(pretrained.example_sentences()[:8], padding=True, return_tensors="pt"))
    return model, tokenizer, batch


@pytest.fixture(scope="module")
def minilm_analysis(minilm):
    model, _, batch = minilm
    # Sun et al.'s 1000x is not reached in this small model (see test_minilm_cls_massive_activation).
    return tokens.analyze_tokens(model, batch, massive_ratio=200)


@requires_minilm
def test_minilm_cls_is_a_sink_in_layers_1_to_4(minilm_analysis):
    a = minilm_analysis
    assert a.norm_placement == ("post",) * 6
    assert a.sink[1:5, :, 0].all()
    # Measured: 0.55, 0.58, 0.52, 0.59 (batch means) against a uniform share of ~0.06.
    cls = a.attention_share[1:5, :, 0].mean(axis=1)
    assert ((cls > 0.45) & (cls < 0.7)).all()
    # No other token comes near.
    others = np.where(a.token_mask, a.attention_share, 0)[1:5, :, 1:]
    assert others.max() < 0.15


@requires_minilm
def test_minilm_cls_massive_activation(minilm_analysis):
    a = minilm_analysis
    expected = np.zeros_like(a.massive)
    expected[1:4, :, 0] = True
    np.testing.assert_array_equal(a.massive, expected)
    assert (a.max_channel[1:4, :, 0] == 99).all()
    ratio = np.abs(a.max_activation[:, :, 0]) / a.activation_median
    # Pre-LN residual entering layer 1 (end of block 0): |a| ~ 222 in channel 99, 550-585x the median |a|:
    # massive by Sun et al.'s |a| > 100, short of their ~1000x.
    assert (np.abs(a.max_activation[1, :, 0]) > 200).all()
    assert ((ratio[1] > 400) & (ratio[1] < 1000)).all()
    # The LayerNorm divides it away: the normalised CLS is no larger than a typical token.
    normed_median = np.array([np.median(a.normed_norms[layer][a.token_mask]) for layer in range(6)])
    assert (a.normed_norms[:, :, 0] < 2 * normed_median[:, None]).all()


@pytest.fixture(scope="module")
def minilm_suppression(minilm):
    model, _, batch = minilm
    return tokens.suppression_experiment(model, batch, mask_kind="cls", mask_layer=1)


@requires_minilm
def test_minilm_suppression_cls_in_layer_1(minilm_suppression):
    result = minilm_suppression
    base, masked = result.baseline, result.masked
    # Nothing before the masked attention changes; for post-LN the residual entering layer 1 is block 0's output.
    np.testing.assert_allclose(masked.residual_norms[:2], base.residual_norms[:2], **TIGHT)
    np.testing.assert_allclose(masked.attention_share[0], base.attention_share[0], **TIGHT)
    share = result.masked_share
    assert share[0, 1].mean() > 0.45 and share[1, 1].max() == 0.0
    # Measured: the freed ~55 % spreads over the content tokens (largest other share 0.05 -> 0.10, under the
    # sink threshold of 4x uniform), and layer 2 routes even more to [CLS] (0.58 -> 0.67).
    assert not result.new_sinks[1].any()
    assert share[1, 2].mean() > share[0, 2].mean() + 0.05
    assert not np.allclose(result.norm_ratio[2], 1.0)


@requires_minilm
def test_suppression_of_cls_masks_the_first_real_token_under_left_padding(minilm):
    # Position 0 is padding in the shorter rows of a left-padded batch: [CLS] is each row's first real token, and it
    # takes a large share of layer 1's attention in every sentence (0.26-0.55 measured: the left padding shifts the
    # position embeddings); masked from layer 1, it takes none. Position 0 took none in the padded rows.
    model, tokenizer, _ = minilm
    tokenizer.padding_side = "left"
    try:
        batch = dict(tokenizer(pretrained.example_sentences()[:4], padding=True, return_tensors="pt"))
    finally:
        tokenizer.padding_side = "right"
    assert not batch["attention_mask"][:, 0].all()
    share = tokens.suppression_experiment(model, batch, mask_kind="cls", mask_layer=1).masked_share
    assert (share[0, 1] > 0.2).all() and share[1, 1].max() == 0.0


@requires_minilm
def test_suppression_arguments(minilm):
    model, _, batch = minilm
    with pytest.raises(ValueError, match="mask_kind"):
        tokens.suppression_experiment(model, batch, mask_kind="register", mask_layer=1)
    for bad in (6, True, 1.0, torch.tensor(1.0)):
        with pytest.raises(ValueError, match=r"mask_layer must be a layer index in \[0, 6\)"):
            tokens.suppression_experiment(model, batch, mask_kind="cls", mask_layer=bad)
    # An index as layers= takes it: numpy and torch integers too.
    assert tokens.suppression_experiment(model, batch, mask_kind="cls", mask_layer=torch.tensor(1)).mask_layers == (1,)
    with pytest.raises(ValueError, match="no massive token"):
        tokens.suppression_experiment(model, batch, mask_kind="massive", mask_layer=1)  # Sun's default 1000x
    with pytest.raises(TypeError, match="persistent must be a bool"):  # "no" ran as True (a review)
        tokens.suppression_experiment(model, batch, mask_kind="cls", mask_layer=1, persistent="no")


@pytest.fixture(scope="module")
def dinov2():
    model = pretrained.load_dinov2_small(attn_implementation="eager")
    pixels = pretrained.imagenet_pixel_values(pretrained.natural_images()["astronaut"], size=224)
    return model, {"pixel_values": pixels}


@pytest.fixture(scope="module")
def dinov2_analysis(dinov2):
    return tokens.analyze_tokens(*dinov2)


@requires_dinov2
def test_dinov2_small_has_no_artifact_or_massive_tokens(dinov2_analysis):
    a = dinov2_analysis
    assert a.norm_placement == ("pre",) * 12
    assert not a.artifact.any() and not a.massive.any()
    # Measured on astronaut: max/median patch norm <= 2.1 per layer (artifacts in ViT-L are far above).
    patches = a.residual_norms[:, 0, 1:]
    assert (patches.max(axis=-1) / np.median(patches, axis=-1)).max() < 2.5
    # CLS takes 1-16 % of the attention (uniform: 0.4 %) and is a sink in layers 0-10.
    assert a.sink[:11, 0, 0].all()
    assert ((a.attention_share[:, 0, 0] > 0.01) & (a.attention_share[:, 0, 0] < 0.4)).all()


@requires_dinov2
def test_dinov2_suppression_cls(dinov2):
    result = tokens.suppression_experiment(*dinov2, mask_kind="cls", mask_layer=3, persistent=True)
    assert result.mask_layers == tuple(range(3, 12))
    np.testing.assert_allclose(result.masked.residual_norms[:4], result.baseline.residual_norms[:4], **TIGHT)
    assert (result.masked_share[1, 3:] == 0).all() and (result.masked_share[0, 3:] > 0.01).all()
    # Measured: the mass spreads over the patches; norms move by < 25 % and no artifact or massive token forms.
    assert np.abs(np.log(result.norm_ratio[:, 0, 1:])).max() < np.log(1.25)
    assert not result.new_artifact.any() and not result.new_massive.any()
    # New sinks do form, later: measured one, two, one and one patch token in layers 7-10 (the other fields are only
    # ever empty in these tests, so this one carries the check that new tokens are found; a review). Layer 9's is
    # 0.3 % above the threshold: layers 7 and 8 each, and 7-10 together.
    np.testing.assert_array_equal(result.new_sinks, result.masked.sink & ~result.baseline.sink)
    assert result.new_sinks[7].any() and result.new_sinks[8].any() and result.new_sinks[7:11].sum() >= 4
    assert not result.new_sinks[:7].any()


# --------------------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------------------


def assert_png(path, min_bytes=10_000):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > min_bytes


@requires_minilm
def test_plots_write_pngs(minilm, minilm_analysis, minilm_suppression, tmp_path, monkeypatch):
    # Every figure is checked as drawn, before it is written: two labelled ticks per axis, no offset.
    saved, write = {}, plots._save

    def keep_and_write(fig, path):
        saved[path.name] = fig
        return write(fig, path)

    monkeypatch.setattr(plots, "_save", keep_and_write)
    _, tokenizer, batch = minilm
    labels = tokenizer.convert_ids_to_tokens(batch["input_ids"][0])
    assert_png(plots.plot_token_norms(minilm_analysis, tmp_path / "norms.png", labels=labels))
    assert_png(plots.plot_attention_share(minilm_analysis, tmp_path / "share.png"))
    result = minilm_suppression
    assert_png(plots.plot_suppression(result, tmp_path / "suppression.png"))
    assert {name: unreadable_axes(fig) for name, fig in saved.items()} == {
        "norms.png": [], "share.png": [], "suppression.png": []}
    with pytest.raises(ValueError, match="png"):
        plots.plot_attention_share(minilm_analysis, tmp_path / "share.pdf")
    with pytest.raises(TypeError, match="analysis"):
        plots.plot_token_norms(result, tmp_path / "norms.png")


def test_detectors_refuse_nan_and_name_a_bad_exclude():
    # A NaN compares False with every threshold, so it flagged nothing, silently.
    from nystrom.linalg.tokens import detect_high_norm_tokens, detect_massive_activations, detect_sinks

    hidden = np.random.default_rng(0).standard_normal((2, 10, 16))
    hidden[0, 3, 2] = np.nan
    for detect in (detect_massive_activations, detect_high_norm_tokens):
        with pytest.raises(ValueError, match="hidden contains NaN"):
            detect(hidden)
    with pytest.raises(ValueError, match="attention_share contains NaN"):
        detect_sinks(np.array([[0.5, np.nan, 0.5]]))
    with pytest.raises(ValueError, match=r"broadcastable to \(2, 10\), got \(3, 10\)"):
        detect_high_norm_tokens(np.zeros((2, 10, 16)), exclude=np.zeros((3, 10), dtype=bool))
    # Broadcastable as documented: a 0-d array (an IndexError before) and a (B, 1) column (refused before).
    hidden = np.random.default_rng(1).standard_normal((2, 10, 16))
    hidden[0, 3] *= 20
    plain = detect_high_norm_tokens(hidden, exclude=())
    for exclude in (np.array(False), np.zeros((2, 1), dtype=bool)):
        np.testing.assert_array_equal(detect_high_norm_tokens(hidden, exclude=exclude), plain)


def test_detectors_take_no_exclusion_and_empty_batches():
    # exclude=None read None.dtype (AttributeError); an empty batch made a reshape to -1 fail in the massive test.
    from nystrom.linalg.tokens import detect_high_norm_tokens, detect_massive_activations

    hidden = np.ones((2, 10, 16))
    hidden[1, 4] *= 10
    none, empty = (detect_high_norm_tokens(hidden, exclude=e) for e in (None, ()))
    np.testing.assert_array_equal(none, empty)
    assert none[1, 4] and none.sum() == 1
    for library in (np, torch):
        result = detect_massive_activations(library.ones((0, 10, 8)))
        assert tuple(result.mask.shape) == (0, 10) and tuple(result.median.shape) == (0,)
