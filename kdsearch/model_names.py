"""The names of the registered architectures, known without importing torch.

Why a static list: `kdsearch validate` checks every `arch` of a spec before anything else, and the real
registry (`kdsearch.models`) can only answer after importing every architecture module, i.e. torch
(seconds). A spec typo must be reported at once, so `kdsearch.spec` asks this list first.

Why here and not in `kdsearch/models/`: importing any module of that package runs its `__init__`, which
registers (imports) every architecture.

`tests/test_spec.py::test_static_model_names_match_the_registry` keeps this list equal to
`kdsearch.models.list_models()`: add a new architecture's name here when you register it.
"""

from __future__ import annotations

import sys

MODEL_NAMES: tuple[str, ...] = (
    "densenet121",
    "densenet_bc_190_40",
    "mobilenetv2",
    "mobilenetv2_x0_25",
    "mobilenetv2_x0_5",
    "resnet18",
    "resnet20",
    "resnet8",
    "resnext29_8x64d",
    "tiny_cnn",
    "wrn_16_2",
    "wrn_16_4",
    "wrn_28_10",
    "wrn_28_4",
)


def known_model_names() -> list[str]:
    """Sorted architecture names: the registry's own answer once `kdsearch.models` is imported, else this list.

    Once the registry is loaded it is the truth (it also holds architectures registered at run time, by a
    plugin or a test); before that, this list answers without importing anything.
    """
    list_models = getattr(sys.modules.get("kdsearch.models"), "list_models", None)
    return list_models() if list_models is not None else sorted(MODEL_NAMES)
