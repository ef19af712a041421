"""PyTorch implementations of Nyström attention."""
