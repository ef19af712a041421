"""The torch backend: fused Nyström attention kernels, sequence-parallel Nyström attention over
``torch.distributed``, drop-in patching of transformers models, attention capture, key masking and token-structure
analysis.

Nothing here imports transformers at import time; the model tools import it when they are used.
"""

# Register torch.compile, the queued host-to-device copy and forward-mode tangents with the array-API core
# (nystrom.linalg imports no backend); for torch inputs approximate() loads this package before it selects landmarks.
from . import forward_mode, tracing, transfer  # noqa: F401
from .attention import fna_attention, sdpa_attend
from .capture import CapturedAttention, capture_attention, capturing
from .dispatch import attention_layers, padding_mask_from_attention_mask
from .distributed import ShardedSequence, Traffic, sharded_approximate, traffic
from .masking import mask_keys
from .patching import FNAHandle, LayerRecord, fna, patch
from .tokens import SuppressionResult, TokenAnalysis, analyze_tokens, suppression_experiment

__all__ = [
    "CapturedAttention", "FNAHandle", "LayerRecord", "ShardedSequence", "SuppressionResult", "TokenAnalysis", "Traffic",
    "analyze_tokens", "attention_layers", "capture_attention", "capturing", "fna", "fna_attention", "mask_keys",
    "padding_mask_from_attention_mask", "patch", "sdpa_attend", "sharded_approximate", "suppression_experiment",
    "traffic",
]
