"""negspace: mechanistic-interpretability methods inside PyTorch Lightning loops."""

from negspace import _compat

_compat.install()

__version__ = "0.2.0"
