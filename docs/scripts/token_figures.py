"""Regenerate the figures and numbers of docs/tokens.md from the bundled models.

    python docs/scripts/token_figures.py

Writes PNGs to docs/img/tokens/ and prints the numbers quoted on the page.
"""

from pathlib import Path

import numpy as np
import torch

from nystrom.experiments.pretrained import (
    example_sentences,
    imagenet_pixel_values,
    load_dinov2_small,
    load_minilm,
    natural_images,
)
from nystrom.experiments.token_plots import plot_attention_share, plot_suppression, plot_token_norms
from nystrom.torch.tokens import analyze_tokens, suppression_experiment

OUT = Path(__file__).resolve().parents[1] / "img" / "tokens"


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    bert, tok = load_minilm(attn_implementation="eager")
    sentences = example_sentences()[:8]
    enc = dict(tok(sentences, padding=True, return_tensors="pt"))
    text = analyze_tokens(bert, enc, massive_ratio=200.0)
    labels = tok.convert_ids_to_tokens(enc["input_ids"][0])
    plot_token_norms(text, OUT / "minilm_norms.png", labels=labels)
    plot_attention_share(text, OUT / "minilm_share.png")
    cls_share = text.attention_share[:, :, 0].mean(axis=1)
    print("MiniLM [CLS] attention share per layer:", np.round(cls_share, 3))
    print("MiniLM massive tokens per layer (sentence 0):", [np.flatnonzero(m[0]).tolist() for m in text.massive])
    sup = suppression_experiment(bert, enc, mask_kind="cls", mask_layer=1, persistent=True, massive_ratio=200.0)
    plot_suppression(sup, OUT / "minilm_suppression.png")

    model = load_dinov2_small(attn_implementation="eager")
    px = imagenet_pixel_values(natural_images()["astronaut"], 224)
    vision = analyze_tokens(model, {"pixel_values": px})
    plot_token_norms(vision, OUT / "dinov2_norms.png")
    plot_attention_share(vision, OUT / "dinov2_share.png")
    print("DINOv2 CLS share per layer:", np.round(vision.attention_share[:, 0, 0], 3))
    print("DINOv2 artifact tokens per layer:", vision.artifact.sum(axis=(1, 2)).tolist())


if __name__ == "__main__":
    main()
