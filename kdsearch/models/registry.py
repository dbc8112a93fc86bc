"""The model registry: architectures register themselves with a decorator and are built by name.

Why a decorator registry (timm's pattern) rather than a name -> class dict: the name, the builder and its
tags live next to each other in the architecture's own module, so adding a model is one decorated function,
and contract tests can iterate ``list_models()`` to hold every architecture to the same conventions.

Tags (a closed set, so that a typo fails at import time instead of silently dropping a model from a filter):

* ``"teacher"``: a large network used in the distillation ensemble (the seed's teachers).
* ``"student"``: a network that is distilled and quantized (the seed's MobileNetV2 / ResNet18, and the
  CPU-sized ResNet-20).
* ``"small"``: cheap enough to train and run on a CPU in tests and smoke runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import nn

from ..imports import ImportPathError, call_failed, is_import_path, resolve

KNOWN_TAGS: tuple[str, ...] = ("small", "student", "teacher")

ModelBuilder = Callable[..., nn.Module]
F = TypeVar("F", bound=ModelBuilder)


class UnknownModelError(ValueError):
    """Raised by :func:`create_model` for a name no architecture registered; the message lists the names."""


@dataclass(frozen=True)
class _Entry:
    builder: ModelBuilder
    tags: tuple[str, ...]


_MODELS: dict[str, _Entry] = {}


def _check_tags(tags: tuple[str, ...], where: str) -> tuple[str, ...]:
    if isinstance(tags, str):  # ("teacher") instead of ("teacher",) is an easy slip
        raise ValueError(f"{where}: tags must be a tuple of strings, got the string {tags!r}")
    unknown = [t for t in tags if t not in KNOWN_TAGS]
    if unknown:
        raise ValueError(f"{where}: unknown tag(s) {unknown}; allowed tags are {list(KNOWN_TAGS)}")
    return tuple(sorted(set(tags)))


def register_model(name: str | None = None, *, tags: tuple[str, ...] = ()) -> Callable[[F], F]:
    """Register ``fn(num_classes: int = 10, **kw) -> nn.Module`` under ``name`` (default: ``fn.__name__``).

    A second registration of the same name is an error: silently replacing an architecture would make
    results depend on import order.
    """

    def decorator(fn: F) -> F:
        model_name = name if name is not None else fn.__name__
        if not model_name or not model_name.isidentifier() or model_name != model_name.lower():
            raise ValueError(
                f"register_model: name must be a lower-case identifier like 'resnet20', got {model_name!r}"
            )
        if model_name in _MODELS:
            raise ValueError(f"register_model: a model named {model_name!r} is already registered")
        _MODELS[model_name] = _Entry(fn, _check_tags(tags, f"register_model({model_name!r})"))
        return fn

    return decorator


def list_models(tag: str | None = None) -> list[str]:
    """Sorted names of the registered models, optionally only those carrying ``tag``."""
    if tag is None:
        return sorted(_MODELS)
    _check_tags((tag,), "list_models")
    return sorted(n for n, e in _MODELS.items() if tag in e.tags)


def is_model(name: str) -> bool:
    """Whether ``name`` is a registered model."""
    return name in _MODELS


def _entry(name: str) -> _Entry:
    try:
        return _MODELS[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}; available models: {', '.join(list_models())}"
        ) from None


def model_tags(name: str) -> tuple[str, ...]:
    """The (sorted) tags of a registered model; raises :class:`UnknownModelError` for an unknown name."""
    return _entry(name).tags


def create_model(name: str, num_classes: int = 10, **kw: Any) -> nn.Module:
    """Build the registered architecture ``name`` with a ``num_classes``-way classifier named ``fc``.

    ``kw`` goes to the builder (e.g. ``width_mult`` for MobileNetV2, ``memory_efficient`` for DenseNets).
    The model expects normalised float input ``[B, 3, H, W]`` and returns logits ``[B, num_classes]``.

    ``name`` may also be an import path ``package.module:factory`` (a user's model, e.g.
    ``torchvision.models:mobilenet_v3_small``): kdsearch calls ``factory(num_classes=num_classes, **kw)``.
    Every way that can fail is an :class:`ImportPathError` (a ``ValueError``) of one line.
    """
    entry = None if is_import_path(name) else _entry(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"create_model: num_classes must be a positive int, got {num_classes!r}")
    if entry is None:
        return _import_model(name, num_classes, kw)
    return entry.builder(num_classes=num_classes, **kw)


def _import_model(path: str, num_classes: int, kw: dict[str, Any]) -> nn.Module:
    factory = resolve(path)
    if not callable(factory):
        raise ImportPathError(f"{path} is a {type(factory).__name__}, not a callable that builds a model")
    try:
        model = factory(num_classes=num_classes, **kw)
    except Exception as err:  # noqa: BLE001  (the user's code: any error is reported as one line)
        raise call_failed(f"{path}(num_classes={num_classes}{''.join(f', {k}={v!r}' for k, v in kw.items())})",
                          err) from None
    if not isinstance(model, nn.Module):
        raise ImportPathError(f"{path} returned a {type(model).__name__}, not a torch.nn.Module")
    return model
