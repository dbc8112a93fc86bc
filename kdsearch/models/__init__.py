"""The kdsearch model zoo: CIFAR architectures registered by name, built with ``create_model``.

Conventions every model keeps (quantization and sensitivity analysis rely on them):

* Input: a normalised float tensor ``[B, 3, H, W]`` (32x32 for CIFAR; normalisation happens outside).
  Output: logits ``[B, num_classes]``.
* Every quantizable layer is its own ``nn.Conv2d`` / ``nn.Linear`` module attribute (no functional convs,
  no module used twice); every activation is its own ``nn.ReLU`` / ``nn.ReLU6`` module with ``inplace=False``.
* The first conv is ``conv1``; the classifier is the ``nn.Linear`` named ``fc``.
* Initialisation: :func:`kdsearch.models.weight_init.init_weights`, deterministic under ``torch.manual_seed``.

Tags: ``teacher`` (ensemble members), ``student`` (distilled and quantized), ``small`` (CPU / test sized).
"""

from . import densenet, mobilenetv2, resnet, resnext, tiny_cnn, wide_resnet  # noqa: F401  (register models)
from .registry import (
    KNOWN_TAGS,
    UnknownModelError,
    create_model,
    is_model,
    list_models,
    model_tags,
    register_model,
)

__all__ = [
    "KNOWN_TAGS",
    "UnknownModelError",
    "create_model",
    "is_model",
    "list_models",
    "model_tags",
    "register_model",
]
