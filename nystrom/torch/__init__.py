"""The torch backend: fast batched FNA attention, drop-in patching of transformers models, attention
capture, key masking and token-structure analysis.

Nothing here imports transformers at import time; the model tools import it when they are used.
"""

from .attention import fna_attention, landmark_kernel
from .capture import CapturedAttention, capture_attention, capturing
from .patching import FNAHandle, LayerRecord, attention_layers, fna, key_padding_mask, mask_keys, patch
from .tokens import (
    SuppressionResult,
    TokenAnalysis,
    analyze_tokens,
    detect_high_norm_tokens,
    detect_massive_activations,
    detect_sinks,
    suppression_experiment,
)

__all__ = [
    "CapturedAttention", "FNAHandle", "LayerRecord", "SuppressionResult", "TokenAnalysis", "analyze_tokens",
    "attention_layers", "capture_attention", "capturing", "detect_high_norm_tokens", "detect_massive_activations",
    "detect_sinks", "fna", "fna_attention", "key_padding_mask", "landmark_kernel", "mask_keys", "patch",
    "suppression_experiment",
]
