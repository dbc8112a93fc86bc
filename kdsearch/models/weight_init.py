"""The one weight initialisation every architecture in the zoo uses.

Why one function: results across architectures stay comparable, and determinism only needs
``torch.manual_seed`` before ``create_model`` (modules are visited in registration order).

* Conv2d: Kaiming-normal, fan_out, ReLU gain (He et al. 2015, "Delving Deep into Rectifiers"; the torchvision
  and timm ResNet convention). Conv biases, where any exist, are zero.
* BatchNorm: weight 1, bias 0.
* Linear: PyTorch's default weight init (Kaiming-uniform, a=sqrt(5)), bias 0.
"""

from __future__ import annotations

from torch import nn


def init_weights(model: nn.Module) -> None:
    """Initialise ``model``'s conv, batch-norm and linear layers in place (see the module docstring)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            m.reset_parameters()
            if m.bias is not None:
                nn.init.zeros_(m.bias)
