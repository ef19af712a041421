"""``python -m nystrom demo`` (the README's main job): its legend, its rows and how it explains ties."""

import os
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")
pytest.importorskip("skimage")
from model_packages import requires_dinov2  # noqa: E402

from nystrom import Landmarks  # noqa: E402
from nystrom.experiments.demo import _ties, main, run_demo  # noqa: E402


@requires_dinov2
def test_demo_prints_a_legend_rows_and_the_estimate():
    lines = []
    # 56 px: 17 tokens, a few seconds; one strategy pair chooses the same tokens, m = n (every token a landmark).
    rows = run_demo(sizes=(56,), num_landmarks=17, strategies=("fps", "uniform", "norm"), repeats=1,
                    out=lines.append)
    text = "\n".join(lines)
    assert "load average" in lines[0]
    for term in ("rel. error", "the layer's own attention output", "sampled estimate", "speed-up = exact / time"):
        assert term in text
    # 17 query rows in all: the estimate reads every one (a review: it said "from 128 exact rows").
    assert "from 17 exact rows" in text
    assert [r["strategy"] for r in rows] == ["fps", "uniform", "norm"] and all(r["n"] == 17 for r in rows)
    # With every token a landmark both strategies take all 17: the same output, and the demo says why they tie.
    assert "'fps' and 'uniform' tie: both chose the same landmarks" in text


def test_ties_tell_the_same_landmarks_from_equal_digits():
    X = torch.randn(1, 10, 4, generator=torch.Generator().manual_seed(0))

    def info(indices, log_weights=None):
        chosen = X[:, indices]
        return SimpleNamespace(landmarks=Landmarks(queries=chosen, keys=chosen, indices=torch.tensor([indices]),
                                                   log_weights=log_weights))

    weights = torch.tensor([[0.0, 1.1, 0.7]])
    infos = {"a": info([0, 5, 9]), "b": info([9, 0, 5]), "c": info([0, 5, 8]),
             # Weighted landmarks: the same rows and weights in another order tie as the same; other weights do not.
             "w": info([0, 5, 9], weights), "v": info([9, 0, 5], weights[:, [2, 0, 1]]),
             "u": info([0, 5, 9], weights.flip(-1))}
    errors = {"a": 0.12341, "b": 0.12341, "c": 0.12342, "w": 0.3, "v": 0.3, "u": 0.3}
    lines = _ties(infos, errors)
    assert "'a' and 'b' tie: both chose the same landmarks" in lines[0]
    assert "'a' and 'c' tie: different landmarks" in lines[1] and "'b' and 'c'" in lines[2]
    assert "'w' and 'v' tie: both chose the same landmarks" in lines[3]
    assert "'w' and 'u' tie: different landmarks" in lines[4] and "'v' and 'u' tie: different" in lines[5]
    assert len(lines) == 6
    assert _ties(infos, dict(zip(infos, (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)))) == []


def test_every_demo_option_has_help(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    for option in ("--image", "--sizes", "--layer", "--num-landmarks"):
        line = next(line for line in help_text.splitlines() if line.strip().startswith(option))
        # argparse prints the help on the option's line or, when the option is long, on the next one.
        following = help_text.split(line, 1)[1].splitlines()[1:2]
        assert line.split(maxsplit=2)[2:] or following and following[0].startswith(" " * 10), option


@pytest.mark.parametrize("argv", [["--image", "nope"], ["--layer", "12"], ["--layer", "-1"], ["--num-landmarks", "0"],
                                  ["--sizes", "0"], ["--sizes", "27"], ["--sizes", "56"]])
def test_bad_demo_options_are_usage_errors_before_the_model_loads(argv, capsys, monkeypatch):
    # Each was a traceback after the model had loaded (or, for a size not a multiple of 14, a wrong n).
    monkeypatch.setattr("nystrom.experiments.demo.load_dinov2_small", lambda: pytest.fail("the model loaded"))
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "error:" in err
    # The message names the flag, not the Python parameter behind it (a review: "num_landmarks must be ...").
    assert f"error: {argv[0]}" in err or "--num-landmarks 64" in err, err
