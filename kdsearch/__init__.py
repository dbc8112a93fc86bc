"""kdsearch: ensemble distillation + sensitivity-guided mixed-precision QAT search for small CNNs."""

__version__ = "0.1.0"
