"""Spec checks that need the student architecture (cheap: the model is built, never run).

`kdsearch.spec` validates the YAML on its own; these rules also need the layer inventory and the size
model, e.g. a size or BOPs budget below the smallest size or BOPs the student can reach with the allowed
bit-widths. They run before any compute, and fail as a `SpecError` naming the field. The BOPs of an image
folder's images depend on their shape, which only decoding tells: that check waits for the search stage.

Every import path of the spec (`arch`, `distill.strategy`, `search.sampler`) is imported and built once
here (`check_imports`), so that a user's typo, a missing package or a factory that returns the wrong thing is
one line naming the field and the cause, with exit 2, before any Ray task would have met it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .imports import is_import_path
from .spec import Spec, SpecError

_PROBE = (2, 4, 3)  # teachers, batch, classes of the strategy probe


def _student_and_pins(spec: Spec) -> tuple[Any, dict[str, int]]:
    from .models import create_model
    from .sensitivity.costs import layer_names, resolve_pins

    model = create_model(spec.student.arch, num_classes=spec.data.classes or 10, **spec.student.kwargs)
    try:
        return model, resolve_pins(layer_names(model), spec.quant.pin)
    except ValueError as err:
        raise SpecError("quant.pin", str(err).removeprefix("quant.pin: ")) from None


def smallest_size_bytes(spec: Spec) -> int:
    """model_size of the student with every free layer at the lowest allowed bits and pins applied."""
    from .quant import BitConfig, model_size

    model, pins = _student_and_pins(spec)
    cfg = BitConfig.uniform(model, min(spec.quant.bits)).updated(pins)
    return model_size(model, cfg, act_bits=spec.quant.act_bits).total_bytes


def smallest_bops(spec: Spec, input_size: Sequence[int]) -> int:
    """model_bops of the same configuration: BOPs grow with a layer's weight bits under every activation rule."""
    from .quant import BitConfig, model_bops

    model, pins = _student_and_pins(spec)
    cfg = BitConfig.uniform(model, min(spec.quant.bits)).updated(pins)
    return model_bops(model, cfg, act_bits=spec.quant.act_bits, input_size=input_size).total_bops


def _below(field: str, what: str, spec: Spec, cost: str, smallest: str) -> SpecError:
    return SpecError(field, f"{what} is below the smallest {cost} {spec.student.arch} can reach with bits "
                            f"{list(spec.quant.bits)} and pins {spec.quant.pin} ({smallest}); raise the budget, "
                            "allow fewer bits or pin fewer layers")


def _one_line(field: str, fn: Callable[[], Any]) -> Any:
    """fn(), or its error as a SpecError naming `field` (a user's code may raise anything)."""
    try:
        return fn()
    except SpecError:
        raise
    except Exception as err:  # noqa: BLE001
        text = str(err).strip().splitlines()
        raise SpecError(field, text[0] if text else type(err).__name__) from None


def _check_model(field: str, arch: str, kwargs: dict[str, Any], num_classes: int, quantized: bool) -> None:
    from .models import create_model
    from .quant import quantizable_layers

    model = _one_line(field, lambda: create_model(arch, num_classes=num_classes, **kwargs))
    if quantized and not quantizable_layers(model):
        raise SpecError(field, f"{arch} has no quantizable layer (nn.Conv2d or nn.Linear module); a student must "
                               "have at least one")


def check_strategy(field: str, path: str) -> None:
    """Import the strategy `path` and call it once on [2, 4, 3] logits; each failure is one SpecError for `field`."""
    import inspect

    import torch

    from .distill.strategies import get_strategy

    fn = _one_line(field, lambda: get_strategy(path))
    t, b, c = _PROBE
    logits, labels = torch.randn(t, b, c), torch.arange(b) % c
    try:
        inspect.signature(fn).bind(logits, labels, 1.0)
    except TypeError as err:
        raise SpecError(field, f"{path} has the signature {inspect.signature(fn)}, but a strategy is called as "
                               f"fn(teacher_logits [T, B, C], labels [B], temperature) ({err})") from None
    except ValueError:  # a builtin without a signature: the probe call below decides
        pass
    out = _one_line(field, lambda: fn(logits, labels, 1.0))
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (b, c):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise SpecError(field, f"{path} returned {got} for {t} teachers' logits [{t}, {b}, {c}]; a strategy returns "
                               f"soft targets [B, C] = [{b}, {c}]")


def check_imports(spec: Spec) -> None:
    """Import and build every import path of the spec once; each failure is one SpecError naming its field."""
    classes = spec.data.classes or 10
    for i, t in enumerate(spec.teachers.models):
        if is_import_path(t.arch):
            _check_model(f"teachers.models[{i}].arch", t.arch, dict(t.kwargs), classes, quantized=False)
    if is_import_path(spec.student.arch):
        _check_model("student.arch", spec.student.arch, dict(spec.student.kwargs), classes, quantized=True)
    for i, arch in enumerate(spec.student.candidates):
        if is_import_path(arch):
            _check_model(f"student.candidates[{i}]", arch, spec.model_kwargs(arch), classes, quantized=True)
    if is_import_path(spec.distill.strategy):
        check_strategy("distill.strategy", spec.distill.strategy)
    if is_import_path(spec.search.sampler) or spec.search.sampler_kwargs:
        from .search.searcher import make_sampler

        field = "search.sampler" if is_import_path(spec.search.sampler) else "search.sampler_kwargs"
        _one_line(field, lambda: make_sampler(spec.search.sampler, spec.seed, spec.search.num_trials,
                                                         spec.search.sampler_kwargs))


def check_given_student(spec: Spec) -> None:
    """`student.checkpoint` loads weights-only into the student architecture (or one SpecError says why not)."""
    if spec.student.checkpoint is None:
        return
    from .checkpoints import load_model, read_model_file

    path, classes = spec.student.checkpoint, spec.data.classes
    if classes is None:  # an image folder: its classes are counted when the data loads; the file must still read
        _one_line("student.checkpoint", lambda: read_model_file(path))
        return
    _one_line("student.checkpoint", lambda: load_model(path, arch=spec.student.arch, num_classes=classes,
                                                       kwargs=spec.student.kwargs))


def check_py_modules(spec: Spec) -> None:
    """Every `py_modules` entry is a package folder or a .whl file here (Ray's runtime_env takes nothing else)."""
    import os

    for i, p in enumerate(spec.py_modules):
        if p.endswith(".whl") and os.path.isfile(p):
            continue
        if not os.path.isdir(p):
            raise SpecError(f"py_modules[{i}]", f"'{p}' is not a folder or a .whl file; give the folder of your package "
                                                "(the one holding __init__.py)")
        if not os.path.isfile(os.path.join(p, "__init__.py")):
            raise SpecError(f"py_modules[{i}]", f"'{p}' has no __init__.py; give the package folder itself")


def check_spec(spec: Spec) -> None:
    from .data_checks import known_image_shape

    check_imports(spec)
    check_given_student(spec)
    if spec.search.budgets_mb:
        smallest = smallest_size_bytes(spec)
        for i, budget in enumerate(spec.search.budgets_mb):
            if budget * 1e6 < smallest:
                raise _below(f"search.budgets_mb[{i}]", f"{budget} MB", spec, "size", f"{smallest / 1e6:.4g} MB")
    shape = known_image_shape(spec.data)
    if spec.search.budgets_gbops and shape is not None:
        least = smallest_bops(spec, shape)
        for i, budget in enumerate(spec.search.budgets_gbops):
            if budget * 1e9 < least:
                raise _below(f"search.budgets_gbops[{i}]", f"{budget} GBOPs", spec, "BOPs",
                             f"{least / 1e9:.4g} GBOPs on {'x'.join(map(str, shape))} images")
