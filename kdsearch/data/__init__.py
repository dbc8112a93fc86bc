"""Data: sources (CIFAR via torchvision, image folders and archives, synthetic), seeded augmentation and loaders.

Everything lives in memory as uint8 [N, 3, H, W]; normalisation happens on the device (`Normalizer`).
"""

from .arrays import (CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, DataBundle, DataError,
                     ImageArrays, Normalizer, channel_stats)
from .augment import PAD, AugmentSpec, EpochParams, SeededViews, batch_augment, draw_epoch_params
from .loaders import Batch, EvalLoader, TrainLoader, epoch_order
from .sources import cache_dir, check_data, class_balanced_subset, data_root, image_shape, load_data
from .synthetic import make_synthetic

__all__ = [
    "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD", "PAD",
    "AugmentSpec", "Batch", "DataBundle", "DataError", "EpochParams", "EvalLoader", "ImageArrays",
    "Normalizer", "SeededViews", "TrainLoader",
    "batch_augment", "cache_dir", "channel_stats", "check_data", "class_balanced_subset", "data_root",
    "draw_epoch_params", "epoch_order", "image_shape", "load_data", "make_synthetic",
]
