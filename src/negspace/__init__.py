"""negspace: mechanistic-interpretability methods inside PyTorch Lightning loops."""

__version__ = "0.1.0"
