"""The experiment spec: one YAML file holds everything a run needs.

Validation happens once, up front, before any compute: unknown keys, wrong types, unknown
architectures or datasets and impossible values become a `SpecError` whose one-line message names
the field (dotted path) and what is allowed. The CLI prints that line and exits with code 2.

Pydantic does the type work (strict about unknown keys, lenient about YAML's `1e-4` being a
string); the cross-field rules that are the project's own live in the `model_validator`s here.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_serializer,
                      model_validator)

from .imports import SHAPE, check_import_path, is_import_path
from .io import atomic_write_text, stable_hash
from .strategy_names import DEFAULT_STRATEGY, STRATEGY_NAMES

DATASETS = ("cifar10", "cifar100", "imagefolder", "synthetic")
AUGMENTS = ("none", "standard", "autoaugment", "randaugment", "trivialaugment")
WEIGHT_BITS = (2, 3, 4, 5, 6, 8, 16, 32)
DATASET_CLASSES = {"cifar10": 10, "cifar100": 100}
SAMPLERS = ("tpe", "nsga2", "random")  # built in (kdsearch.search.searcher.make_sampler)


class SpecError(ValueError):
    """A user mistake in a spec; `str(err)` is one line naming the field and the fix."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        message = " ".join(message.splitlines())  # the CLI prints one line per error, whatever a validator said
        super().__init__(f"spec field '{field}': {message}" if field else message)


class _Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class TrainConfig(_Cfg):
    """One training run's optimisation settings (SGD Nesterov + cosine / one-cycle, as in the seed's baselines)."""

    epochs: int = Field(30, ge=1)
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    schedule: Literal["cosine", "onecycle", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    batch_size: int = Field(128, ge=1)
    grad_clip: float | None = Field(None, gt=0)
    # Adam learning rate of the learned quantizer log-steps (sub-8-bit QAT only; kdsearch.train.OptimizerSet):
    # |delta log s| is about step_lr per step, so 1e-3 bounds a step's drift to ~10% per 100 steps.
    step_lr: float = Field(1e-3, gt=0)
    bf16: bool = True  # autocast on GPU for float phases; ignored on CPU
    channels_last: bool = True  # GPU only

    @model_validator(mode="after")
    def _warmup_fits(self) -> "TrainConfig":
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be < epochs ({self.epochs})")
        return self


QAT_WARMUP_FRACTION = 0.1  # of a QAT run's epochs, when its spec does not say warmup_epochs


def qat_schedule(cfg: TrainConfig) -> TrainConfig:
    """A QAT run's TrainConfig with a warm-up unless the spec set ``warmup_epochs`` itself.

    Why: QAT starts from a converged float student; a cosine schedule that starts at full QAT learning rate
    on the first step, with freshly quantized weights and momentum at zero, knocks it out of its minimum
    before the schedule has decayed (the issue's "re-heated" student). A short linear warm-up avoids that.
    """
    if "warmup_epochs" in cfg.model_fields_set:
        return cfg
    return cfg.model_copy(update={"warmup_epochs": QAT_WARMUP_FRACTION * cfg.epochs})


class DataConfig(_Cfg):
    """Where images come from and how they are augmented."""

    dataset: Literal["cifar10", "cifar100", "imagefolder", "synthetic"] = "cifar10"
    root: str | None = None  # torchvision root / imagefolder root; default ~/.cache/kdsearch/data
    download: bool = True
    num_classes: int | None = Field(None, ge=2)  # derived for cifar; required for synthetic
    train_size: int | None = Field(None, ge=1)  # synthetic size, or a deterministic subset of a real train split
    test_size: int | None = Field(None, ge=1)
    # Held out of the train split (after train_size) to make every choice: a count, or a fraction of the train
    # split; stratified by class. Ignored when the data has its own val/ split (imagefolder).
    val_size: int | float = 0.1
    split_seed: int = 0  # seeds the data itself (synthetic images, subsets, the validation split), not training
    augment: Literal["none", "standard", "autoaugment", "randaugment", "trivialaugment"] = "standard"
    cutout: int = Field(0, ge=0, le=32)  # side of the erased square in px (DeVries & Taylor 2017); 0 = off
    random_erasing: float = Field(0.0, ge=0, le=1)  # probability of torchvision RandomErasing
    num_workers: int = Field(2, ge=0)
    on_gpu: bool = True  # keep uint8 data on the GPU and augment whole batches there (standard augment only)
    eval_batch_size: int = Field(512, ge=1)

    @field_validator("root")
    @classmethod
    def _absolute_root(cls, v: str | None) -> str | None:
        return _absolute(v)

    @field_validator("val_size", mode="before")
    @classmethod
    def _val_size(cls, v: Any) -> int | float:
        if isinstance(v, str):  # YAML and --set may hand numbers over as text ("0.2", "5000")
            try:
                v = float(v) if any(ch in v for ch in ".eE") else int(v)
            except ValueError:
                pass
        ok = not isinstance(v, bool) and ((isinstance(v, int) and v >= 1) or (isinstance(v, float) and 0 < v < 1))
        if not ok:
            raise ValueError(f"val_size is a count >= 1 or a fraction in (0, 1) (got {v!r}); e.g. 0.1 or 5000")
        return v

    @model_validator(mode="after")
    def _classes(self) -> "DataConfig":
        known = DATASET_CLASSES.get(self.dataset)
        if known is not None and self.num_classes not in (None, known):
            raise ValueError(f"num_classes is {known} for {self.dataset} (got {self.num_classes}); remove it")
        if self.dataset == "synthetic" and self.num_classes is None:
            raise ValueError("num_classes is required for the synthetic dataset (e.g. num_classes: 10)")
        if self.dataset == "imagefolder" and not self.root:
            raise ValueError("root is required for imagefolder (a folder with train/<class>/* and test/<class>/*)")
        return self

    @property
    def classes(self) -> int | None:
        """Number of classes when known without touching the data (imagefolder: from the folder)."""
        return self.num_classes or DATASET_CLASSES.get(self.dataset)


def _absolute(path: str | None) -> str | None:
    """Relative paths mean relative to where the command runs; Ray workers and Tune trials run elsewhere
    (a trial's cwd is its own folder), so the spec holds them absolute from the moment it is loaded."""
    return None if path is None else os.path.abspath(os.path.expanduser(path))


def _check_arch(name: str) -> str:
    # The static name list, not `kdsearch.models`: importing the registry imports torch (seconds). An import
    # path is only checked for its shape here; `kdsearch.spec_checks` imports and builds it.
    from .model_names import known_model_names

    if is_import_path(name):
        return check_import_path(name)
    names = known_model_names()
    if name not in names:
        raise ValueError(f"unknown architecture '{name}'; available: {', '.join(names)}, or an import path "
                         f"{SHAPE.replace('name', 'factory')}")
    return name


def _name_or_path(v: str, names: tuple[str, ...], what: str, path: str) -> str:
    """A built-in name, or a well-formed import path (imported later, by `kdsearch.spec_checks`)."""
    if is_import_path(v):
        return check_import_path(v)
    if v not in names:
        raise ValueError(f"unknown {what} '{v}'; choose {', '.join(names)} or {path}")
    return v


def _check_kwargs(v: dict[str, Any]) -> dict[str, Any]:
    if "num_classes" in v:
        raise ValueError("num_classes comes from the data (data.num_classes or the dataset); remove it from kwargs")
    return v


class _ModelRef(_Cfg):
    """The checks of a model reference (``arch``, ``kwargs``, ``checkpoint``), shared by teachers and the student.

    No fields here: each subclass declares its own, so field order (and the dumped spec) stays as it was.
    """

    @field_validator("arch", check_fields=False)
    @classmethod
    def _arch(cls, v: str) -> str:
        return _check_arch(v)

    @field_validator("kwargs", check_fields=False)
    @classmethod
    def _kwargs(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _check_kwargs(v)

    @field_validator("checkpoint", check_fields=False)
    @classmethod
    def _absolute_checkpoint(cls, v: str | None) -> str | None:
        return _absolute(v)


class TeacherConfig(_ModelRef):
    arch: str  # a registered name or an import path package.module:factory
    kwargs: dict[str, Any] = Field(default_factory=dict)  # factory(num_classes=..., **kwargs)
    checkpoint: str | None = None  # a trained checkpoint to use instead of training (loaded weights_only)


class TeachersConfig(_Cfg):
    models: tuple[TeacherConfig, ...] = Field(..., min_length=1)
    train: TrainConfig = TrainConfig()
    gpus: float = Field(1.0, ge=0)  # per teacher, when training on a cluster and when serving as a Ray actor
    cpus: float = Field(1.0, gt=0)

    @field_validator("models", mode="before")
    @classmethod
    def _names_to_dicts(cls, v: Any) -> Any:
        # Allow the short form `models: [wrn_28_10, densenet_bc_190_40]`.
        if isinstance(v, list):
            return [{"arch": m} if isinstance(m, str) else m for m in v]
        return v

    @field_validator("models")
    @classmethod
    def _unique(cls, v: tuple[TeacherConfig, ...]) -> tuple[TeacherConfig, ...]:
        archs = [t.arch for t in v]
        dup = {a for a in archs if archs.count(a) > 1}
        if dup:
            raise ValueError(f"teacher architectures must be unique (repeated: {', '.join(sorted(dup))})")
        return v


class StudentConfig(_ModelRef):
    arch: str  # a registered name or an import path package.module:factory
    kwargs: dict[str, Any] = Field(default_factory=dict)  # factory(num_classes=..., **kwargs)
    # For `kdsearch students`: architectures ranked by quantizability; an entry is a name / import path, or
    # {arch: ..., kwargs: {...}}, whose kwargs are kept in candidate_kwargs (arch -> kwargs).
    candidates: tuple[str, ...] = ()
    candidate_kwargs: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # A trained float student (loaded weights_only): it is the FP32 row, measured on this run's splits, and the
    # start of the KD fine-tuning, the QAT runs and the search; no student is trained from scratch.
    checkpoint: str | None = None
    train: TrainConfig = TrainConfig()
    # Resources of one student-sized unit of work (a scratch/KD student, a finalize model, the sensitivity
    # table, a candidate's check): each is a Ray task with these, so a cluster spreads them over its GPUs.
    gpus: float = Field(1.0, ge=0)
    cpus: float = Field(1.0, gt=0)


    @model_validator(mode="before")
    @classmethod
    def _candidate_mappings(cls, data: Any) -> Any:
        cands = data.get("candidates") if isinstance(data, dict) else None
        if not isinstance(cands, (list, tuple)) or not any(isinstance(c, dict) for c in cands):
            return data
        kwargs = dict(data.get("candidate_kwargs") or {})
        names = []
        for c in cands:
            if isinstance(c, dict) and set(c) <= {"arch", "kwargs"} and isinstance(c.get("arch"), str):
                kwargs[c["arch"]] = _check_kwargs(dict(c.get("kwargs") or {}))
                c = c["arch"]
            names.append(c)  # anything else: the field's own validation names it
        return {**data, "candidates": names, "candidate_kwargs": {k: v for k, v in kwargs.items() if v}}

    @field_validator("candidates")
    @classmethod
    def _cands(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for name in v:
            _check_arch(name)
        return v


class DistillConfig(_Cfg):
    """Ensemble KD (Hinton et al. 2015): loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE."""

    # The default is the first of STRATEGY_NAMES (see kdsearch/strategy_names.py for why); or an import path
    # package.module:function with the strategies' signature (kdsearch.distill.strategies.Strategy).
    strategy: str = DEFAULT_STRATEGY
    temperature: float = Field(4.0, gt=0)
    alpha: float = Field(0.9, ge=0, le=1)
    source: Literal["cache", "live"] = "cache"  # trials replay cached teacher logits, or ask the actor pool
    cache_epochs: int = Field(4, ge=1)  # seeded augmentation epochs whose teacher logits are cached

    @field_validator("strategy")
    @classmethod
    def _strategy(cls, v: str) -> str:
        return _name_or_path(v, STRATEGY_NAMES, "strategy", "an import path " + SHAPE.replace("name", "function"))


class QuantConfig(_Cfg):
    bits: tuple[int, ...] = (16, 8, 4)  # the per-layer weight bit-widths the search may choose
    act_bits: int | Literal["same"] = 8
    pin: dict[str, int] = Field(default_factory=lambda: {"first": 8, "last": 8})  # layer name/first/last -> bits
    # Finalize-length QAT(+KD). Fine-tuning a converged float student: a fraction of its float learning rate
    # (here 10% of the students' default 0.1), warmed up (``qat_schedule``), then cosine to 0.
    qat: TrainConfig = TrainConfig(epochs=15, lr=0.01, weight_decay=5e-5)
    # Activation ranges: MSE over this many un-augmented training batches of eval-mode forwards, before QAT.
    calib_batches: int = Field(8, ge=1)
    # BatchNorm statistics re-estimated after QAT from this many augmented training batches (0: off).
    bn_batches: int = Field(16, ge=0)

    @field_validator("qat")
    @classmethod
    def _qat_warmup(cls, v: TrainConfig) -> TrainConfig:
        return qat_schedule(v)

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        bad = [b for b in v if b not in WEIGHT_BITS]
        if bad or not v:
            raise ValueError(f"bit-widths {bad or 'none'} unsupported; choose from {list(WEIGHT_BITS)}")
        if len(set(v)) != len(v):
            raise ValueError("bit-widths must be unique")
        return tuple(sorted(v, reverse=True))

    @field_validator("act_bits")
    @classmethod
    def _act(cls, v: int | str) -> int | str:
        if v != "same" and v not in (2, 3, 4, 5, 6, 8, 16, 32):
            raise ValueError(f"act_bits must be 'same' or one of 2, 3, 4, 5, 6, 8, 16, 32 (got {v})")
        return v

    @field_validator("pin")
    @classmethod
    def _pin(cls, v: dict[str, int]) -> dict[str, int]:
        bad = {k: b for k, b in v.items() if b not in WEIGHT_BITS}
        if bad:
            raise ValueError(f"pinned bit-widths {bad} unsupported; choose from {list(WEIGHT_BITS)}")
        return v


class SensitivityConfig(_Cfg):
    calib_size: int = Field(512, ge=8)  # training images used to measure each layer's sensitivity
    metric: Literal["kl", "hessian"] = "kl"  # which omega drives the priors
    hutchinson_samples: int = Field(16, ge=1)
    exclude_above: float | None = Field(None, gt=0)  # a (layer, bits) whose omega exceeds this is never sampled
    budgets_around: tuple[float, ...] = (0.8, 0.9, 1.1, 1.2)  # solver warm starts at these multiples of a budget


class SearchConfig(_Cfg):
    # Hard budgets; at least one kind must be given. The first of each kind constrains the search (both at once
    # when both are given); the others are finalize's and the report's "best within budget" lines.
    budgets_mb: tuple[float, ...] = ()  # size (MB = 1e6 bytes, kdsearch/quant/size.py)
    budgets_gbops: tuple[float, ...] = ()  # compute (GBOPs = 1e9 MACs x b_w x b_a, kdsearch/quant/bops.py)
    num_trials: int = Field(32, ge=1)
    trial_epochs: int = Field(2, ge=1)
    trial: TrainConfig = TrainConfig(epochs=2, lr=0.005, weight_decay=5e-5)
    # tpe, nsga2, random, or an Optuna sampler class by import path (optuna.samplers:QMCSampler, a user's own),
    # built with sampler_kwargs (and seed=, when the class takes one and sampler_kwargs does not set it).
    sampler: str = "tpe"
    sampler_kwargs: dict[str, Any] = Field(default_factory=dict)
    warm_start: bool = True  # seed the sampler with the sensitivity solver's configs and uniform baselines
    max_concurrent: int | None = Field(None, ge=1)  # default: derived from resources
    gpus_per_trial: float = Field(0.0, ge=0)
    cpus_per_trial: float = Field(1.0, gt=0)
    asha: bool = True
    grace_period: int = Field(1, ge=1)
    max_failures: int = Field(2, ge=0)

    @field_validator("sampler")
    @classmethod
    def _sampler(cls, v: str) -> str:
        return _name_or_path(v, SAMPLERS, "sampler", "an Optuna sampler class " + SHAPE.replace("name", "Class"))

    @field_validator("budgets_mb", "budgets_gbops")
    @classmethod
    def _positive(cls, v: tuple[float, ...], info: ValidationInfo) -> tuple[float, ...]:
        unit = "MB" if info.field_name == "budgets_mb" else "GBOPs"
        if any(not b > 0 or b == float("inf") for b in v):
            raise ValueError(f"budgets must be finite and > 0 {unit} (got {list(v)})")
        if not v and info.field_name == "budgets_gbops" and not info.data.get("budgets_mb", True):
            raise ValueError("no budget given: set search.budgets_mb (sizes in MB), search.budgets_gbops "
                             "(compute in GBOPs) or both, e.g. budgets_mb: [1.38]")
        return v

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict[str, Any]:
        # A spec without BOPs budgets dumps as it did before they existed: its stage keys (hashes of the dump)
        # stay the same, so a run started before BOPs resumes instead of searching again.
        d = handler(self)
        if not d.get("budgets_gbops"):
            d.pop("budgets_gbops", None)
        return d

    @model_validator(mode="after")
    def _epochs(self) -> "SearchConfig":
        if self.trial.epochs != self.trial_epochs:
            # One source of truth: trial_epochs wins, trial.epochs mirrors it.
            object.__setattr__(self, "trial", self.trial.model_copy(update={"epochs": self.trial_epochs}))
        object.__setattr__(self, "trial", qat_schedule(self.trial))  # a trial is a short QAT run
        return self


class FinalizeConfig(_Cfg):
    top_k: int = Field(3, ge=1)
    # The uniform QAT Scratch / QAT KD baselines finalized beside the searched models (the seed's 16- and
    # 8-bit rows). Post-training 8-bit and the sensitivity solver's allocation-only configurations are
    # always finalized too: they are what a searched model is judged against.
    uniform_bits: tuple[int, ...] = (16, 8)

    @field_validator("uniform_bits")
    @classmethod
    def _uniform(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        bad = [b for b in v if b not in WEIGHT_BITS or b == 32]
        if bad:
            raise ValueError(f"uniform_bits {bad} unsupported; choose from {[b for b in WEIGHT_BITS if b != 32]}")
        return tuple(dict.fromkeys(v))


class Spec(_Cfg):
    """A whole experiment. `name` names the run directory (runs/<name>/)."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$")
    # The FP32 students and every finalized model are trained once per seed (independent Ray tasks) and
    # reported as mean ± std over them; the teachers, the sensitivity table and the search run once, under
    # seeds[0]. `seed: N` is accepted as the one-seed short form.
    seeds: tuple[int, ...] = Field((0,), min_length=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataConfig = DataConfig()
    teachers: TeachersConfig
    student: StudentConfig
    distill: DistillConfig = DistillConfig()
    quant: QuantConfig = QuantConfig()
    sensitivity: SensitivityConfig = SensitivityConfig()
    search: SearchConfig
    finalize: FinalizeConfig = FinalizeConfig()
    # The user's own packages (folders or .whl files) that the spec's import paths live in: the driver puts them on
    # its sys.path and every Ray worker of the job gets them through runtime_env py_modules (`--py-modules` adds).
    py_modules: tuple[str, ...] = ()

    @field_validator("py_modules")
    @classmethod
    def _absolute_modules(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(str(_absolute(p)) for p in v)

    @model_validator(mode="before")
    @classmethod
    def _seed_short_form(cls, data: Any) -> Any:
        if isinstance(data, dict) and "seed" in data and "seeds" not in data:
            data = {**data, "seeds": [data["seed"]]}
            del data["seed"]
        return data

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if len(set(v)) != len(v):
            raise ValueError(f"seeds must be distinct (got {list(v)})")
        return v

    @property
    def seed(self) -> int:
        """The seed of the once-per-run stages (teachers, sensitivity, search): seeds[0]."""
        return self.seeds[0]

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def model_kwargs(self, arch: str) -> dict[str, Any]:
        """The `kwargs:` the spec gives beside `arch`: the student's, else a candidate's, else a teacher's, else {}."""
        if arch == self.student.arch:
            return dict(self.student.kwargs)
        if arch in self.student.candidate_kwargs:
            return dict(self.student.candidate_kwargs[arch])
        return next((dict(t.kwargs) for t in self.teachers.models if t.arch == arch), {})

    def key_dict(self) -> dict[str, Any]:
        """The spec as a dict plus the pseudo-section `seed` (= seeds[0]), which the once-per-run stages read:
        adding seeds must not redo the teachers or the search."""
        return self.to_dict() | {"seed": self.seed}

    def fingerprint(self, *sections: str) -> str:
        """Hash of the named top-level sections (all when none): the stage-input key for resume."""
        d = self.key_dict()
        return stable_hash({k: d[k] for k in (sections or tuple(d))})

    def save(self, path: str | os.PathLike[str]) -> None:
        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


_MAPPING_ERRORS = ("model_type", "model_attributes_type", "dict_type")


def _format_error(err: ValidationError) -> SpecError:
    e = err.errors()[0]
    field = ".".join(str(p) for p in e["loc"])
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        msg = "unknown key; remove it or check its spelling (see search_spaces/ for the allowed keys)"
    elif e["type"] == "missing":
        msg = "required field is missing"
    elif e["type"] in _MAPPING_ERRORS:  # `data: 5`: pydantic's "valid dictionary or instance of DataConfig"
        last = str(e["loc"][-1]) if e["loc"] else field
        msg = f"must be a mapping (key: value lines indented under '{last}:'), got {_short(e.get('input'))}"
    elif "input" in e and e["type"] not in ("value_error", "assertion_error"):
        msg = f"{msg} (got {e['input']!r})"
    return SpecError(field, msg)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _kind(value: Any) -> str:
    """'a list', 'a string', ...: what a YAML document held instead of a mapping."""
    names = {list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean"}
    return names.get(type(value), f"a {type(value).__name__}")


def builtin_spec_dir() -> Path:
    """The specs shipped with kdsearch: inside the wheel, or the repo's search_spaces/ in a checkout."""
    packaged = resources.files("kdsearch") / "search_spaces"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "search_spaces"


def list_builtin_specs() -> list[str]:
    return sorted(p.stem for p in builtin_spec_dir().glob("*.yaml"))


def _choices() -> str:
    return f"give a YAML file or one of the built-in specs: {', '.join(list_builtin_specs())}"


def resolve_spec_path(name_or_path: str | os.PathLike[str]) -> Path:
    """A path to a YAML file, or the name of a built-in spec (`cifar10`, `smoke`, ...)."""
    p = Path(name_or_path)
    if p.is_dir():
        inside = " (a run directory keeps its spec in spec.yaml)" if (p / "spec.yaml").is_file() else ""
        raise SpecError("", f"'{p}' is a directory, not a spec file{inside}; {_choices()}")
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise SpecError("", f"spec file '{p}' not found; {_choices()}")
        return p
    cand = builtin_spec_dir() / f"{p.name}.yaml"
    if cand.is_file():
        return cand
    if p.suffix or len(p.parts) > 1:  # looks like a path (spec.json, conf/x): a missing file, not a name
        raise SpecError("", f"spec file '{p}' not found; {_choices()}")
    raise SpecError("", f"unknown spec '{name_or_path}'; {_choices()}")


def parse_spec(data: dict[str, Any], overrides: dict[str, Any] | None = None) -> Spec:
    """Validate a spec dict (plus dotted-key overrides such as {'search.num_trials': 4})."""
    if not isinstance(data, dict):
        raise SpecError("", f"a spec must be a YAML mapping at the top level (got {_kind(data)})")
    overrides = overrides or {}
    if "seeds" in overrides or "seed" in overrides:  # an override of either form replaces the file's seeds
        data = {k: v for k, v in data.items() if k not in ("seed", "seeds")}
    data = _apply_overrides(data, overrides)
    if "seed" in data and "seeds" in data:
        raise SpecError("seeds", "give either seed or seeds, not both (seeds: [0, 1, 2] trains every reported model "
                                 "once per seed); remove seed")
    try:
        return Spec.model_validate(data)
    except ValidationError as err:
        e = _format_error(err)
        if "seed" in data and e.field.startswith("seeds"):  # the user wrote the short form: name it
            raise SpecError("seed", str(e).split(": ", 1)[1]) from None
        raise e from None


def _read_text(path: Path) -> str:
    """The file as UTF-8 text, or a `SpecError` saying why it cannot be (unreadable, binary, not UTF-8)."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        fix = "make it readable (chmod +r)" if isinstance(err, PermissionError) else "give a readable YAML file"
        raise SpecError("", f"cannot read spec file {path} ({err.strerror or type(err).__name__}); {fix}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SpecError("", f"{path} is not a UTF-8 text file (byte 0x{raw[err.start]:02x} at offset {err.start}); "
                            "give a YAML spec file, saved as UTF-8") from None


def _yaml_error(path: Path, err: yaml.YAMLError) -> SpecError:
    """One line for any PyYAML error (a syntax error has a line mark; a bad character has an offset)."""
    if isinstance(err, yaml.reader.ReaderError):  # a control character (e.g. NUL): the file is not plain text
        code = err.character if isinstance(err.character, int) else ord(err.character)
        return SpecError("", f"{path} is not valid YAML at offset {err.position}: unacceptable character "
                             f"#x{code:04x} ({err.reason}); give a plain-text YAML spec file")
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}" if mark is not None else ""
    problem = getattr(err, "problem", None) or str(err)
    return SpecError("", f"{path} is not valid YAML{where}: {' '.join(str(problem).split())}")


def load_spec(name_or_path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> Spec:
    path = resolve_spec_path(name_or_path)
    text = _read_text(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise _yaml_error(path, err) from None
    if data is None:
        raise SpecError("", f"{path} is empty; a spec is a YAML mapping with name, teachers, student and search "
                            f"(start from {builtin_spec_dir() / 'smoke.yaml'})")
    if not isinstance(data, dict):
        raise SpecError("", f"{path} holds {_kind(data)}, but a spec must be a YAML mapping at the top level "
                            "(name: ..., teachers: ..., student: ..., search: ...)")
    return parse_spec(data, overrides)


def _apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    import copy

    out = copy.deepcopy(data)
    for dotted, value in overrides.items():
        node = out
        *parents, leaf = dotted.split(".")
        for key in parents:
            nxt = node.setdefault(key, {})
            if not isinstance(nxt, dict):
                raise SpecError(dotted, f"cannot override inside '{key}' (it is not a mapping)")
            node = nxt
        node[leaf] = value
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """`--set search.num_trials=4` -> ('search.num_trials', 4); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not all(key.split(".")):
        raise SpecError("", f"override '{text}' must look like section.key=value")
    try:
        return key, yaml.safe_load(raw)
    except yaml.YAMLError as err:
        problem = " ".join(str(getattr(err, "problem", None) or err).split())
        raise SpecError(key, f"--set value {raw!r} is not valid YAML ({problem}); write a number, true/false, "
                             "[a, b] for a list, or quote a string") from None
