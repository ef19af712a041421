"""Tests for ``nystrom.torch.capture``: real Q/K/V/outputs recorded from transformers models, model left intact.

Tiny random-weight ViT, DINOv2, CLIP-vision and BERT models (built here, nothing downloaded) cover every supported
architecture under both the ``eager`` and the ``sdpa`` attention functions; the real DINOv2-S and MiniLM (skipped
without their weight packages) cover trained attention and real padding.
"""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from nystrom import exact_attention  # noqa: E402
from nystrom.torch import dispatch  # noqa: E402
from nystrom.torch.capture import capture_attention, capturing  # noqa: E402
from nystrom.torch.dispatch import attention_layers, padding_mask_from_attention_mask  # noqa: E402

KINDS = ("vit", "dinov2", "clip", "bert")
IMPLEMENTATIONS = ("eager", "sdpa")
from model_packages import requires_dinov2, requires_minilm  # noqa: E402


def tiny_model(kind, attn_implementation="sdpa", dtype=torch.float64, num_layers=4):
    """A random-weight encoder of ``kind`` with 4 heads of 8 on 17 tokens (4x4 patches + CLS) or 12 word pieces.

    ``initializer_range=0.2`` (10x the default) gives peaked attention: the default's near-uniform softmax is
    almost rank one, so an all-landmark Nyström kernel would be too ill-conditioned to test exactness on.
    """
    common = dict(hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=4, intermediate_size=64,
                  initializer_range=0.2, attn_implementation=attn_implementation)
    torch.manual_seed(0)
    if kind == "bert":
        model = transformers.BertModel(transformers.BertConfig(vocab_size=50, max_position_embeddings=32, **common))
    elif kind == "vit":
        model = transformers.ViTModel(transformers.ViTConfig(image_size=28, patch_size=7, **common))
    elif kind == "dinov2":
        model = transformers.Dinov2Model(transformers.Dinov2Config(image_size=28, patch_size=7, **common))
    else:
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(image_size=28, patch_size=7, **common))
    return model.to(dtype).eval()


def tiny_inputs(kind, dtype=torch.float64, batch=2):
    generator = torch.Generator().manual_seed(1)
    if kind == "bert":
        ids = torch.randint(1, 50, (batch, 12), generator=generator)
        mask = torch.ones(batch, 12, dtype=torch.long)
        mask[1:, 9:] = 0  # every sequence but the first is padded to 9 real tokens
        return {"input_ids": ids, "attention_mask": mask}
    return {"pixel_values": torch.randn(batch, 3, 28, 28, generator=generator, dtype=dtype)}


def exact_output(c):
    return exact_attention(c.query, c.key, c.value, scale=c.scaling, attn_mask=c.attn_mask)


def hooks(model):
    """The forward (pre-)hooks on every block (transformers adds its own for ``output_hidden_states``)."""
    return [(dict(block._forward_pre_hooks), dict(block._forward_hooks)) for block, _ in attention_layers(model)]


def assert_fna_ran(handle):
    """Every layer the handle patched answered, so that a check over its records is not one over nothing (a patch
    that installs nothing passed such checks; a review)."""
    assert sorted(handle.records) == list(handle.layers)


def assert_restored(model, hooks_before=None):
    """No handler, hook or shadowed ``get_interface`` left behind."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert "get_interface" not in vars(ALL_ATTENTION_FUNCTIONS)
    assert not dispatch._HANDLERS
    if hooks_before is None:
        assert all(not pre and not post for pre, post in hooks(model))
    else:
        assert hooks(model) == hooks_before


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_capture_reproduces_each_layers_attention(kind, implementation):
    model = tiny_model(kind, implementation)
    inputs = tiny_inputs(kind)
    with torch.no_grad():
        reference = model(**inputs, output_hidden_states=True)
    hooks_before = hooks(model)
    caps = capture_attention(model, inputs)
    assert [c.layer for c in caps] == [0, 1, 2, 3]
    # ViT's and CLIP's eager attention take the softmax in float32 even in a float64 model, so their own output
    # is only float32-accurate; everything else here is float64 (errors ~1e-15 measured).
    tol = 1e-6 if implementation == "eager" and kind in ("vit", "clip") else 1e-12
    for c in caps:
        batch, heads, n, d = c.query.shape
        assert (heads, d) == (4, 8) and c.key.shape == c.value.shape == c.output.shape == (batch, heads, n, d)
        assert c.scaling == pytest.approx(d**-0.5, rel=1e-15)  # d**-0.5 or 1 / sqrt(d): measured equal
        torch.testing.assert_close(c.output, exact_output(c), rtol=0, atol=tol)
        # The recorded block input is the model's own hidden state entering that layer.
        torch.testing.assert_close(c.hidden_states, reference.hidden_states[c.layer], rtol=0, atol=0)
    if kind == "bert":
        expected = inputs["attention_mask"].bool()
        for c in caps:
            assert torch.equal(c.attention_mask, expected)
    else:
        assert all(c.attention_mask is None for c in caps)
    assert_restored(model, hooks_before)


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_capture_of_grouped_query_attention_keeps_the_key_value_heads(kv_heads):
    # A bidirectional encoder with fewer key/value heads than query heads (4) passes K and V unrepeated: the record
    # keeps them so, and enable_gqa=True reproduces the output, as the docstring's example does (a review: it said
    # (B, H, n, d) for all three, and the example raised on such a model).
    config = transformers.Gemma3TextConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, head_dim=8, use_bidirectional_attention=True, sliding_window=4096,
        layer_types=["full_attention"] * 2, max_position_embeddings=256, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.Gemma3TextModel(config).double().eval()
    inputs = {"input_ids": torch.randint(0, 50, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    inputs["attention_mask"][1, 9:] = 0
    for c in capture_attention(model, inputs):
        assert c.query.shape == (2, 4, 12, 8) and c.key.shape == c.value.shape == (2, kv_heads, 12, 8)
        out = exact_attention(c.query, c.key, c.value, scale=c.scaling, attn_mask=c.attn_mask, enable_gqa=True)
        # float64 SDPA against float64 SDPA on the same inputs: measured equal; 1e-12 for a reordered sum.
        torch.testing.assert_close(out, c.output, rtol=0, atol=1e-12)


def test_capture_query_is_the_projection_of_the_normalised_block_input():
    model = tiny_model("dinov2")
    inputs = tiny_inputs("dinov2")
    c = capture_attention(model, inputs, layers=[2])[0]
    block, attention = attention_layers(model)[2]
    with torch.no_grad():
        q = attention.q_proj(block.norm1(c.hidden_states))
    # The same float64 projection of the same values (measured bitwise); 1e-14 for a BLAS that orders the sums apart.
    torch.testing.assert_close(c.query, q.view(*q.shape[:2], 4, 8).transpose(1, 2), rtol=0, atol=1e-14)


def test_capture_leaves_the_model_output_unchanged():
    model = tiny_model("vit")
    inputs = tiny_inputs("vit")
    with torch.no_grad():
        before = model(**inputs).last_hidden_state
        with capturing(model, layers=[1, 3]) as caps:
            during = model(**inputs).last_hidden_state
            model(**inputs)
    assert [c.layer for c in caps] == [1, 3, 1, 3]
    assert torch.equal(before, during)
    assert_restored(model)


def test_capturing_restores_the_model_after_an_exception():
    model = tiny_model("bert", "eager")
    inputs = tiny_inputs("bert")
    implementation = model.config._attn_implementation
    with torch.no_grad():
        before = model(**inputs).last_hidden_state
        with pytest.raises(RuntimeError, match="boom"):
            with capturing(model):
                model(**inputs)
                raise RuntimeError("boom")
        after = model(**inputs).last_hidden_state
    assert torch.equal(before, after)
    assert model.config._attn_implementation == implementation
    assert_restored(model)


def tiny_hiera():
    """A random-weight SAM 2 Hiera on 64 x 64 pixels: four stages of one block, windowed attention over its (B, H, W,
    C) block input, pooled queries in the first two stages, global attention in the last (skips without the class)."""
    if not hasattr(transformers, "Sam2HieraDetModel"):
        pytest.skip("this transformers has no Sam2HieraDetModel")
    torch.manual_seed(0)
    config = transformers.Sam2HieraDetConfig(
        hidden_size=16, num_attention_heads=1, image_size=[64, 64], patch_kernel_size=[7, 7], patch_stride=[4, 4],
        patch_padding=[3, 3], blocks_per_stage=[1, 1, 1, 1], embed_dim_per_stage=[16, 32, 64, 128],
        num_attention_heads_per_stage=[1, 2, 4, 8], window_size_per_stage=[4, 4, 2, 2], global_attention_blocks=[3],
        num_query_pool_stages=2, window_positional_embedding_background_size=[4, 4], attn_implementation="sdpa")
    return transformers.Sam2HieraDetModel(config).eval()


def test_windowed_attention_records_no_hidden_states():
    # Hiera (SAM 2) attends over windows of its (B, H, W, C) block input, some stages with pooled queries: that input
    # is no feature row per key, and was recorded as (B, n, D) hidden states all the same.
    model = tiny_hiera()
    captured = capture_attention(model, {"pixel_values": torch.randn(1, 3, 64, 64)})
    assert len(captured) == 4 and all(c.hidden_states is None for c in captured)
    for c in captured:  # the attention itself is recorded as it ran
        # float32, torch's default tolerances for it (rtol 1.3e-6, atol 1e-5): two softmax implementations, a few ulps
        # (measured 4.5e-8).
        torch.testing.assert_close(exact_attention(c.query, c.key, c.value, scale=c.scaling), c.output)


def test_capture_rejects_bad_arguments():
    model = tiny_model("vit")
    with pytest.raises(TypeError, match="inputs must be a mapping"):
        capture_attention(model, torch.zeros(1, 3, 28, 28))
    with pytest.raises(ValueError, match="layers"):
        capture_attention(model, tiny_inputs("vit"), layers=[4])
    with pytest.raises(TypeError, match="torch.nn.Module"):
        capture_attention("model", {})
    assert_restored(model)


def test_layers_take_python_numpy_and_torch_integers():
    # Layer indices as users hold them: a range, numpy integers, a torch index tensor; bools and floats are refused.
    import numpy as np

    model, inputs = tiny_model("vit"), tiny_inputs("vit")
    for layers in (2, [1, 2], range(1, 3), np.array([1, 2]), np.int64(2), np.array(2), torch.tensor([1, 2]),
                   torch.tensor(2)):
        expected = [2] if np.ndim(np.asarray(layers)) == 0 else [1, 2]
        assert [c.layer for c in capture_attention(model, inputs, layers=layers)] == expected
    for bad in ([4], [], [-5]):
        with pytest.raises(ValueError, match=r"layers must be non-empty layer indices in \[-4, 4\)"):
            capture_attention(model, inputs, layers=bad)
    # Negative indices count from the last layer, as Python's do (a review expected fna(layers=-1) to work).
    assert [c.layer for c in capture_attention(model, inputs, layers=[-1, 1, -3])] == [1, 3]
    for bad in ([True], [1.0], [np.bool_(True)], torch.tensor([1.0]), torch.tensor([True]), np.array([True])):
        with pytest.raises(TypeError, match="layers must hold ints"):
            capture_attention(model, inputs, layers=bad)
    for bad in ("1", b"\x01", {1: "a"}, 1.0, True, torch.tensor(2.0), torch.tensor(True), np.array(2.0)):
        with pytest.raises(TypeError, match="layers must be None, an int or an iterable of ints"):
            capture_attention(model, inputs, layers=bad)


def test_attention_layers_finds_each_architectures_blocks():
    names = {"vit": "ViTAttention", "dinov2": "Dinov2Attention", "clip": "CLIPAttention", "bert": "BertSelfAttention"}
    for kind, name in names.items():
        found = attention_layers(tiny_model(kind, num_layers=3))
        assert len(found) == 3 and {type(a).__name__ for _, a in found} == {name}


def test_attention_layers_refuses_a_model_with_two_encoders():
    text = transformers.CLIPTextConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=64)
    vision = transformers.CLIPVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=64, image_size=28, patch_size=7)
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict()))
    with pytest.raises(ValueError, match="model.vision_model"):
        attention_layers(model)
    assert len(attention_layers(model.vision_model)) == 2


def test_attention_layers_refuses_an_encoder_decoder():
    # A review: a whole BartModel patched its encoder alone, silently, its decoder's blocks (causal self-attention and
    # cross-attention, two attention modules each) being no list of encoder blocks.
    config = transformers.BartConfig(vocab_size=50, d_model=32, encoder_layers=2, decoder_layers=3,
                                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                     decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=1, bos_token_id=0,
                                     eos_token_id=2, decoder_start_token_id=2)
    model = transformers.BartModel(config)
    with pytest.raises(ValueError, match=r"\['decoder.layers'\].*model.get_submodule\('encoder'\)"):
        attention_layers(model)
    assert len(attention_layers(model.get_submodule("encoder"))) == 2
    # A list passed itself, whose entries hold several attention modules each, holds the blocks: no decoder (a
    # review: ALBERT's list of layer groups of two layers each was refused as one; it holds one list of blocks).
    albert = transformers.AlbertModel(transformers.AlbertConfig(
        vocab_size=50, embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, inner_group_num=2))
    assert len(attention_layers(albert.encoder.albert_layer_groups)) == 2


def test_attention_layers_names_the_module_that_holds_one_of_nested_lists():
    # ALBERT shares its blocks through a list of layer groups, each a list: the message named neither (a review).
    config = transformers.AlbertConfig(vocab_size=50, embedding_size=16, hidden_size=32, num_hidden_layers=3,
                                       num_attention_heads=4, intermediate_size=64)
    model = transformers.AlbertModel(config)
    with pytest.raises(ValueError, match=r"model.get_submodule\('encoder.albert_layer_groups.0'\)"):
        attention_layers(model)
    assert len(attention_layers(model.get_submodule("encoder.albert_layer_groups.0"))) == 1


class TestKeyPaddingMask:
    def test_bool_and_additive_masks(self):
        real = torch.tensor([[True, True, True, False], [True, True, False, False]])
        as_bool = real[:, None, None, :].expand(2, 1, 4, 4)
        additive = torch.zeros(2, 1, 4, 4).masked_fill(~as_bool, torch.finfo(torch.float32).min)
        assert torch.equal(padding_mask_from_attention_mask(as_bool, 2, 4), real)
        assert torch.equal(padding_mask_from_attention_mask(additive, 2, 4), real)
        assert torch.equal(padding_mask_from_attention_mask(additive.masked_fill(~as_bool, -float("inf")), 2, 4), real)
        assert padding_mask_from_attention_mask(None, 2, 4) is None
        # A mask shared by the batch (leading size 1) is expanded to it.
        assert torch.equal(padding_mask_from_attention_mask(as_bool[:1], 2, 4), real[:1].expand(2, 4))

    def test_rejects_causal_masks_and_biases(self):
        causal = torch.ones(4, 4, dtype=torch.bool).tril()[None, None]
        with pytest.raises(ValueError, match="differs between queries"):
            padding_mask_from_attention_mask(causal, 1, 4)
        with pytest.raises(ValueError, match="bias"):
            padding_mask_from_attention_mask(torch.full((1, 1, 4, 4), -1.0), 1, 4)
        with pytest.raises(ValueError, match="shape"):
            padding_mask_from_attention_mask(torch.ones(1, 4, dtype=torch.bool), 1, 4)


@requires_dinov2
def test_capture_real_dinov2_reproduces_its_attention():
    from nystrom.experiments import pretrained

    model = pretrained.load_dinov2_small()
    px = pretrained.imagenet_pixel_values(pretrained.natural_images()["chelsea"], 224)
    with torch.no_grad():
        before = model(pixel_values=px).last_hidden_state
    caps = capture_attention(model, {"pixel_values": px}, layers=[0, 5, 11])
    assert [c.layer for c in caps] == [0, 5, 11]
    for c in caps:
        assert c.query.shape == (1, 6, 257, 64) and c.hidden_states.shape == (1, 257, 384)
        # float32 SDPA vs a float32 dense softmax: a few ulps of outputs of size ~1 (max error measured 2.2e-6).
        torch.testing.assert_close(c.output, exact_output(c), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(model(pixel_values=px).last_hidden_state, before)


@requires_minilm
def test_capture_real_minilm_records_the_tokenizers_padding():
    from nystrom.experiments import pretrained

    model, tokenizer = pretrained.load_minilm()
    batch = tokenizer(pretrained.example_sentences()[:4], padding=True, return_tensors="pt")
    caps = capture_attention(model, batch)
    assert len(caps) == 6
    for c in caps:
        assert torch.equal(c.attention_mask, batch["attention_mask"].bool())
        # As for DINOv2 above: float32, a few ulps (measured 4.8e-7).
        torch.testing.assert_close(c.output, exact_output(c), rtol=1e-4, atol=1e-5)
