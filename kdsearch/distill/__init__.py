"""Ensemble knowledge distillation: strategies, the KD loss, and the teacher sources the training loop takes.

* `strategies`: registered ensemble strategies (average, vote, dynamic, entropy) on [T, B, C] logits.
* `losses.KDLoss`: alpha * T^2 * KL(soft targets || student_T) + (1 - alpha) * CE (Hinton et al. 2015).
* Sources (`kdsearch.train.TeacherSource`): `InProcessTeachers`, `TeacherPool` (Ray actors), `LogitCache`.
"""

from .cache import CacheMismatch, LogitCache, ReplayLoader, build_logit_cache
from .losses import KDLoss
from .pool import TeacherActor, TeacherPool
from .sources import (
    SOURCE_KINDS,
    InProcessTeachers,
    cache_epochs_needed,
    cache_seed,
    ensure_logit_cache,
    load_teachers,
    logit_cache_dir,
    make_pool,
    teacher_source,
    teachers_key,
)
from .strategies import combine, get_strategy, list_strategies, register_strategy

__all__ = [
    "SOURCE_KINDS",
    "CacheMismatch",
    "InProcessTeachers",
    "KDLoss",
    "LogitCache",
    "ReplayLoader",
    "TeacherActor",
    "TeacherPool",
    "build_logit_cache",
    "cache_epochs_needed",
    "cache_seed",
    "combine",
    "ensure_logit_cache",
    "get_strategy",
    "list_strategies",
    "load_teachers",
    "logit_cache_dir",
    "make_pool",
    "register_strategy",
    "teacher_source",
    "teachers_key",
]
