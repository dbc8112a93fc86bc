"""Import paths (`package.module:attr`): how a spec names code that lives outside kdsearch.

Wherever a spec takes a name (an architecture, an ensemble strategy, an Optuna sampler) it also takes an
import path, the way Hydra's `_target_` and setuptools' entry points spell one: a dotted module, a colon,
and a (possibly dotted) attribute. The colon is what tells the two apart: no registered name has one.

Why two steps: the syntax is checked when the spec is parsed (no import, so a spec of registered names
never imports torch and a typo is answered at once); `resolve` imports the module where the object is
needed (`kdsearch validate`, then every Ray task that builds it), and each way it can fail is one line
naming the path and the cause, which the caller prefixes with the spec field.
"""

from __future__ import annotations

import importlib
import re
from typing import Any

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_PATH = re.compile(rf"^{_IDENT}(\.{_IDENT})*:{_IDENT}(\.{_IDENT})*$")
SHAPE = "package.module:name"


class ImportPathError(ValueError):
    """An import path that cannot be resolved; the message is one line naming the path and the cause."""


def is_import_path(text: str) -> bool:
    """Whether `text` is meant as an import path (it has a colon; registered names never do)."""
    return isinstance(text, str) and ":" in text


def check_import_path(text: str) -> str:
    """`text` if it is a well-formed import path, else a ValueError saying what the shape is."""
    if not _PATH.match(text):
        raise ValueError(f"'{text}' is not an import path of the form {SHAPE} (dotted identifiers, one colon)")
    return text


def _cause(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def resolve(path: str) -> Any:
    """The object `path` names, importing its module; every failure is an `ImportPathError`."""
    module_name, _, attr = check_import_path(path).partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        missing = err.name or module_name
        raise ImportPathError(f"cannot import '{module_name}' (no module named '{missing}'); install it, put it on "
                              "PYTHONPATH or ship it with --py-modules") from None
    except Exception as err:  # the user's module raised while being imported  # noqa: BLE001
        raise ImportPathError(f"importing '{module_name}' failed ({_cause(err)})") from None
    done = module_name
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ImportPathError(f"'{done}' has no attribute '{part}' (from {path})")
        obj = getattr(obj, part)
        done = f"{done}.{part}" if done != module_name else f"{done}:{part}"
    return obj


def call_failed(path: str, err: BaseException) -> ImportPathError:
    """The one-line error for a resolved callable that raised when kdsearch called it."""
    return ImportPathError(f"calling {path} failed ({_cause(err)})")
