"""Tests for kdsearch.data: sources, synthetic data, seeded augmentation, loaders, normalisation."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from kdsearch.data import (PAD, Batch, DataBundle, DataError, EpochParams, EvalLoader, ImageArrays, Normalizer,
                           TrainLoader, batch_augment, channel_stats, check_data, class_balanced_subset,
                           draw_epoch_params, load_data, make_synthetic)
from kdsearch.data.augment import AugmentSpec
from kdsearch.data.sources import stratified_split
from kdsearch.spec import DataConfig, SpecError, builtin_spec_dir, parse_spec

SHARED_JPEG = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Correctness tests: one intra-op thread is faster than two on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KDSEARCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("KDSEARCH_DATA", raising=False)


def synth_cfg(**kw) -> DataConfig:
    base = dict(dataset="synthetic", num_classes=10, train_size=240, test_size=60, num_workers=0)
    return DataConfig(**{**base, **kw})


N_TRAIN = 216  # 240 generated, the default val_size 0.1 (24 images, 10 classes x 2.4 -> stratified) held out


@pytest.fixture(scope="module")
def bundle() -> DataBundle:
    b = load_data(synth_cfg(), seed=0)
    assert len(b.train) == N_TRAIN and len(b.val) == 24 and len(b.test) == 60
    return b


# -- synthetic ----------------------------------------------------------------------------------------
def test_synthetic_is_deterministic_balanced_and_disjoint() -> None:
    tr, te, version = make_synthetic(10, 300, 100, seed=3)
    tr2, te2, version2 = make_synthetic(10, 300, 100, seed=3)
    assert torch.equal(tr.images, tr2.images) and torch.equal(te.labels, te2.labels) and version == version2
    assert version == "synthetic-v1:seed=3:n=300/100:c=10"
    assert tr.images.shape == (300, 3, 32, 32) and tr.images.dtype == torch.uint8
    assert torch.bincount(tr.labels).tolist() == [30] * 10 and torch.bincount(te.labels).tolist() == [10] * 10
    other, _, _ = make_synthetic(10, 300, 100, seed=4)
    assert not torch.equal(other.images, tr.images)
    flat_tr, flat_te = tr.images.flatten(1).float(), te.images.flatten(1).float()
    assert torch.cdist(flat_te, flat_tr).min() > 0  # no test image repeats a train image
    assert tr.images.float().std() > 20  # images, not a flat colour


def test_synthetic_100_classes_and_bundle_fields() -> None:
    b = load_data(synth_cfg(num_classes=100, train_size=500, test_size=200), seed=1)
    assert b.num_classes == 100 and len(b.class_names) == 100 and b.class_names[7] == "class_07"
    assert len(b.train) == 450 and len(b.val) == 50 and len(b.test) == 200
    tr, va = torch.bincount(b.train.labels, minlength=100), torch.bincount(b.val.labels, minlength=100)
    assert (tr + va).tolist() == [5] * 100  # the generated set is balanced; val is carved out of it
    # 50 of 100 equal shares of 0.5: largest remainders tie, broken by class id -> classes 0..49 give one each
    assert va.tolist() == [1] * 50 + [0] * 50 and tr.min() == 4
    assert torch.bincount(b.test.labels, minlength=100).tolist() == [2] * 100
    assert b.version == "synthetic-v1:seed=1:n=500/200:c=100:val=50@1"
    assert all(0.2 < m < 0.8 for m in b.mean) and all(0.05 < s < 0.4 for s in b.std)


def test_synthetic_is_learnable_but_not_by_mean_colour() -> None:
    """A tiny CNN for a fixed number of steps beats chance by far; nearest mean colour does not come close."""
    torch.manual_seed(0)
    tr, te, _ = make_synthetic(10, 600, 300, seed=0)
    norm = Normalizer((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    x, xt = norm(tr.images), norm(te.images)
    cent = torch.stack([x[tr.labels == k].mean((0, 2, 3)) for k in range(10)])
    colour_acc = (torch.cdist(xt.mean((2, 3)), cent).argmin(1) == te.labels).float().mean().item()
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(3):
        for idx in torch.randperm(600).split(50):
            loss = torch.nn.functional.cross_entropy(model(x[idx]), tr.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(xt).argmax(1) == te.labels).float().mean().item()
    assert colour_acc < 0.45
    assert acc > 0.4, f"tiny CNN reached only {acc:.2f} (chance 0.10)"


# -- batch augmentation ---------------------------------------------------------------------------------
def _params(n: int, **kw) -> EpochParams:
    z = torch.zeros(n, dtype=torch.int64)
    base = dict(dy=z + PAD, dx=z + PAD, flip=torch.zeros(n, dtype=torch.bool), cut_y0=z, cut_y1=z, cut_x0=z,
                cut_x1=z, er_y0=z, er_y1=z, er_x0=z, er_x1=z)
    base.update(kw)
    return EpochParams(**base)


def test_batch_augment_hand_made() -> None:
    img = (torch.arange(3 * 8 * 8) % 251 + 1).to(torch.uint8).view(1, 3, 8, 8)  # no zero pixels
    one = torch.ones(1, dtype=torch.int64)
    assert torch.equal(batch_augment(img.clone(), _params(1)), img)  # centre crop, no flip
    assert torch.equal(batch_augment(img.clone(), _params(1, flip=torch.ones(1, dtype=torch.bool))), img.flip(-1))
    down = batch_augment(img.clone(), _params(1, dy=one * (PAD + 1)))  # crop one row lower = shift up
    assert torch.equal(down[..., :7, :], img[..., 1:, :]) and (down[..., 7, :] == 0).all()
    left = batch_augment(img.clone(), _params(1, dx=one * 0))  # crop starts in the left padding
    assert torch.equal(left[..., PAD:], img[..., : 8 - PAD]) and (left[..., :PAD] == 0).all()
    cut = batch_augment(img.clone(), _params(1, cut_y0=one * 2, cut_y1=one * 5, cut_x0=one * 1, cut_x1=one * 3))
    assert (cut[..., 2:5, 1:3] == 0).all() and (cut != 0).sum() == 3 * (64 - 6)


def test_batch_augment_matches_torchvision_pad_crop_flip() -> None:
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=g)
    spec = AugmentSpec("standard")
    p = draw_epoch_params(16, 32, 32, spec, seed=5, epoch=2)
    out = batch_augment(imgs, p)
    assert out.shape == imgs.shape and out.dtype == torch.uint8
    for k in range(16):
        ref = TF.crop(TF.pad(imgs[k], [PAD]), int(p.dy[k]), int(p.dx[k]), 32, 32)
        ref = TF.horizontal_flip(ref) if p.flip[k] else ref
        assert torch.equal(out[k], ref)
    assert p.flip.any() and not p.flip.all() and len(set(p.dy.tolist())) > 3


def test_epoch_params_cutout_and_erasing_boxes() -> None:
    p = draw_epoch_params(2000, 32, 32, AugmentSpec("none", cutout=8, random_erasing=0.5), seed=0, epoch=0)
    assert (p.dy == PAD).all() and (p.dx == PAD).all() and not p.flip.any()  # "none": no crop or flip
    side = p.cut_y1 - p.cut_y0
    assert side.max() == 8 and side.min() >= 4 and (p.cut_y0 >= 0).all() and (p.cut_y1 <= 32).all()
    area = (p.er_y1 - p.er_y0) * (p.er_x1 - p.er_x0)
    on = area > 0
    assert 0.4 < on.float().mean() < 0.6 and (p.er_y1 <= 32).all() and (p.er_x1 <= 32).all()
    assert area[on].min() >= 0.015 * 1024 and area[on].max() <= 0.35 * 1024
    off = draw_epoch_params(50, 32, 32, AugmentSpec("standard"), seed=0, epoch=0)
    assert ((off.er_y1 - off.er_y0) == 0).all() and ((off.cut_y1 - off.cut_y0) == 0).all()
    # the crop/flip stream does not move when cutout / erasing are switched on
    on_p = draw_epoch_params(50, 32, 32, AugmentSpec("standard", cutout=8, random_erasing=1.0), seed=0, epoch=0)
    assert torch.equal(off.dy, on_p.dy) and torch.equal(off.flip, on_p.flip)


# -- seeded views ------------------------------------------------------------------------------------------
def _epoch_views(loader: TrainLoader, e: int) -> dict[int, torch.Tensor]:
    out = {}
    for batch in loader.epoch(e):
        assert isinstance(batch, Batch) and batch.images.dtype == torch.uint8
        for i, x in zip(batch.index.tolist(), batch.images):
            out[i] = x
    return out


@pytest.mark.parametrize("augment", ["standard", "none"])
def test_batch_path_views_are_seeded(bundle: DataBundle, augment: str) -> None:
    cfg = synth_cfg(augment=augment, cutout=8, random_erasing=0.5)
    a = TrainLoader(bundle, cfg, batch_size=32, seed=7)
    b = TrainLoader(bundle, cfg, batch_size=50, seed=7)
    assert len(a) == N_TRAIN // 32 == 6  # the train split only: the validation images are not trained on
    assert len(TrainLoader(bundle, cfg, batch_size=32, seed=7, drop_last=False)) == 7
    va, vb = _epoch_views(a, 1), _epoch_views(b, 1)
    common = sorted(set(va) & set(vb))
    assert len(common) > 150 and all(torch.equal(va[i], vb[i]) for i in common)
    idx = torch.tensor(common[::-1])  # a different order and batching
    assert torch.equal(a.views(1, idx), torch.stack([va[i] for i in common[::-1]]))
    va2 = _epoch_views(a, 2)
    assert sum(not torch.equal(va[i], va2[i]) for i in set(va) & set(va2)) > 100
    assert not torch.equal(a.order(1), a.order(2))
    other_seed = TrainLoader(bundle, cfg, batch_size=32, seed=8).views(1, idx)
    assert not torch.equal(other_seed, a.views(1, idx))


def test_batch_path_labels_follow_indices(bundle: DataBundle) -> None:
    loader = TrainLoader(bundle, synth_cfg(augment="none"), batch_size=36, seed=0)
    seen = []
    for batch in loader.epoch(0):
        assert torch.equal(batch.labels, bundle.train.labels[batch.index])
        assert torch.equal(batch.images, bundle.train.images[batch.index])  # "none" without cutout = identity
        seen += batch.index.tolist()
    assert sorted(seen) == list(range(N_TRAIN))  # every train image once, and no validation image


def test_policy_path_views_independent_of_workers_and_batching(bundle: DataBundle) -> None:
    small = DataBundle(bundle.train.subset(torch.arange(64)), bundle.val, bundle.test, bundle.num_classes,
                       bundle.class_names, bundle.mean, bundle.std, bundle.version)
    cfg0 = synth_cfg(augment="autoaugment", cutout=6, random_erasing=0.3, num_workers=0)
    cfg2 = synth_cfg(augment="autoaugment", cutout=6, random_erasing=0.3, num_workers=2)
    rng_before = torch.get_rng_state()
    v0 = _epoch_views(TrainLoader(small, cfg0, batch_size=16, seed=3), 0)
    assert torch.equal(torch.get_rng_state(), rng_before)  # views do not consume the caller's RNG
    w2 = TrainLoader(small, cfg2, batch_size=10, seed=3)
    v2_ = _epoch_views(w2, 0)
    assert set(v0) == set(range(64)) and len(v2_) == 60
    assert all(torch.equal(v0[i], v2_[i]) for i in v2_)
    v2_next = _epoch_views(w2, 1)  # persistent workers learn the new epoch from the sampler
    assert sum(not torch.equal(v2_[i], v2_next[i]) for i in set(v2_) & set(v2_next)) > 40
    idx = torch.tensor([5, 63, 0, 17])
    assert torch.equal(w2.views(1, idx), torch.stack([v2_next[i] for i in idx.tolist()]))
    w2.close()
    assert any(not torch.equal(v0[i], small.train.images[i]) for i in range(64))


@pytest.mark.parametrize("augment", ["randaugment", "trivialaugment"])
def test_other_policies_are_seeded(bundle: DataBundle, augment: str) -> None:
    loader = TrainLoader(bundle, synth_cfg(augment=augment), batch_size=20, seed=0)
    idx = torch.tensor([3, 1, 4, 1, 5])
    x = loader.views(0, idx)
    assert x.shape == (5, 3, 32, 32) and x.dtype == torch.uint8
    assert torch.equal(x, loader.views(0, idx)) and torch.equal(x[1], x[3])
    assert not torch.equal(x, loader.views(1, idx))


# -- eval loader, normaliser, arrays -----------------------------------------------------------------------
def test_eval_loader_in_order(bundle: DataBundle) -> None:
    loader = EvalLoader(bundle.test, batch_size=25)
    batches = list(loader)
    assert len(loader) == len(batches) == 3 and batches[-1].images.shape[0] == 10
    assert torch.equal(torch.cat([b.index for b in batches]), torch.arange(60))
    assert torch.equal(torch.cat([b.images for b in batches]), bundle.test.images)


def test_normalizer_math(bundle: DataBundle) -> None:
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.25, 0.5)
    norm = Normalizer(mean, std)
    x = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    ref = (x.double() / 255 - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(
        std, dtype=torch.float64).view(1, 3, 1, 1)
    out = norm(x)
    assert out.dtype == torch.float32 and torch.allclose(out.double(), ref, atol=1e-5)
    assert torch.allclose(norm(x.float()), out)
    nb = Normalizer.from_bundle(bundle)(bundle.train.images)
    assert abs(nb.mean().item()) < 1e-3 and abs(nb.std().item() - 1) < 1e-2  # the bundle's own statistics
    with pytest.raises(ValueError, match="3 stds > 0"):
        Normalizer((0.5, 0.5, 0.5), (0.2, 0.0, 0.2))


def test_arrays_validate() -> None:
    with pytest.raises(ValueError, match="uint8"):
        ImageArrays(torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="labels"):
        ImageArrays(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64))


# -- subsets ---------------------------------------------------------------------------------------------
def test_class_balanced_subset() -> None:
    labels = torch.tensor([0] * 100 + [1] * 5 + [2] * 50 + [3] * 45)
    idx = class_balanced_subset(labels, 40, seed=0)
    assert idx.tolist() == sorted(set(idx.tolist())) and len(idx) == 40
    counts = torch.bincount(labels[idx]).tolist()
    assert counts[1] == 5 and sorted(counts) == [5, 11, 12, 12]  # the small class runs out, the rest fill in
    assert torch.equal(idx, class_balanced_subset(labels, 40, seed=0))
    assert not torch.equal(idx, class_balanced_subset(labels, 40, seed=1))
    even = class_balanced_subset(torch.arange(1000) % 10, 100, seed=3)
    assert torch.bincount(even % 10).tolist() == [10] * 10
    assert torch.equal(class_balanced_subset(labels, 500, seed=0), torch.arange(200))


# -- the validation split ----------------------------------------------------------------------------------
def _assert_split(labels: torch.Tensor, n_val: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """stratified_split's contract: sorted, disjoint, covering, exactly n_val, largest-remainder per class."""
    tr, va = stratified_split(labels, n_val, seed)
    total = labels.numel()
    assert tr.dtype == va.dtype == torch.int64
    assert tr.tolist() == sorted(set(tr.tolist())) and va.tolist() == sorted(set(va.tolist()))
    assert len(va) == n_val and len(tr) == total - n_val
    assert not set(tr.tolist()) & set(va.tolist()) and sorted(tr.tolist() + va.tolist()) == list(range(total))
    counts = torch.bincount(labels).numpy()
    got = torch.bincount(labels[va], minlength=len(counts)).numpy()
    exact = n_val * counts / total
    floor = np.floor(exact)
    assert set(got - floor) <= {0, 1}, (got, exact)  # each class gives round(n_val * its share) ...
    up, down = got > floor, got == floor
    if up.any() and down.any():  # ... and the classes rounded up are those with the largest remainders
        assert (exact - floor)[up].min() >= (exact - floor)[down].max() - 1e-9
    assert (torch.bincount(labels[tr], minlength=len(counts)).numpy() >= 1)[counts > 0].all()
    return tr, va


def test_stratified_split_by_hand() -> None:
    shuffle = torch.randperm(100, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)[shuffle]
    for n_val, want in ((10, [5, 3, 2]), (7, [4, 2, 1]), (13, [6, 4, 3]), (1, [1, 0, 0]), (99 - 2, [49, 29, 19])):
        _, va = _assert_split(labels, n_val, seed=0)
        assert torch.bincount(labels[va], minlength=3).tolist() == want, n_val
    # equal shares: the remainders tie and class id breaks the tie
    _, va = _assert_split(torch.arange(40) % 4, 6, seed=0)
    assert torch.bincount((torch.arange(40) % 4)[va]).tolist() == [2, 2, 1, 1]


def test_stratified_split_is_seeded() -> None:
    labels = torch.arange(200) % 7
    tr, va = _assert_split(labels, 40, seed=3)
    tr2, va2 = stratified_split(labels, 40, 3)
    assert torch.equal(tr, tr2) and torch.equal(va, va2)  # same seed, same split
    other_tr, other_va = _assert_split(labels, 40, seed=4)
    assert not torch.equal(va, other_va) and not torch.equal(tr, other_tr)  # another seed, another draw ...
    assert torch.equal(torch.bincount(labels[va]), torch.bincount(labels[other_va]))  # ... of the same sizes


def test_stratified_split_random_label_sets() -> None:
    rng = np.random.default_rng(0)
    for case in range(40):
        counts = rng.integers(4, 60, size=int(rng.integers(2, 12)))
        labels = torch.from_numpy(rng.permutation(np.repeat(np.arange(len(counts)), counts)))
        n_val = int(rng.integers(1, labels.numel() // 2 + 1))
        _assert_split(labels, n_val, seed=case)


def test_stratified_split_rejects_an_out_of_range_count() -> None:
    labels = torch.arange(20) % 2
    for n_val in (0, -1, 20, 25):
        with pytest.raises(DataError, match="data.val_size") as err:
            stratified_split(labels, n_val, 0)
        assert "\n" not in str(err.value)


def test_stratified_split_fills_the_count_around_classes_that_cannot_give() -> None:
    labels = torch.tensor([0] * 10 + [1, 2, 3])  # 6 of 13: class 0 can give all 6 and keep 4
    tr, va = stratified_split(labels, 6, 0)
    assert len(va) == 6 and len(tr) == 7 and torch.bincount(labels[tr]).min() >= 1


def test_stratified_split_refuses_an_impossible_count() -> None:
    with pytest.raises(DataError, match="val_size"):
        stratified_split(torch.arange(10), 3, 0)  # ten classes of one image: none can give one and keep one


def _rows(images: torch.Tensor) -> list[bytes]:
    return sorted(bytes(x.numpy().tobytes()) for x in images)


def test_val_size_as_count_and_as_fraction() -> None:
    pool, test, _ = make_synthetic(10, 240, 60, seed=0)  # what load_data generates before holding out
    counted = load_data(synth_cfg(val_size=30))
    assert len(counted.train) == 210 and len(counted.val) == 30 and len(counted.test) == 60
    assert torch.bincount(counted.val.labels).tolist() == [3] * 10  # 24 per class, a tenth each
    assert counted.version == "synthetic-v1:seed=0:n=240/60:c=10:val=30@0"
    frac = load_data(synth_cfg(val_size=0.25))
    assert len(frac.train) == 180 and len(frac.val) == 60 and frac.version.endswith(":c=10:val=60@0")
    tiny = load_data(synth_cfg(val_size=0.001))  # 0.24 images rounds to none: at least one is held out
    assert len(tiny.val) == 1 and len(tiny.train) == 239 and tiny.version.endswith(":val=1@0")
    for b, n_val in ((counted, 30), (frac, 60), (tiny, 1)):
        tr_idx, va_idx = stratified_split(pool.labels, n_val, 0)  # held out of the generated set, stratified
        assert torch.equal(b.train.images, pool.images[tr_idx]) and torch.equal(b.val.labels, pool.labels[va_idx])
        assert torch.equal(b.val.images, pool.images[va_idx]) and torch.equal(b.test.images, test.images)
        assert not set(_rows(b.train.images)) & set(_rows(b.val.images))
    for b in (counted, frac):  # the statistics come from the train split only
        assert (b.mean, b.std) == channel_stats(b.train.images)
    with pytest.raises(DataError, match="data.val_size") as err:
        load_data(synth_cfg(val_size=240))  # no training image would be left
    assert "\n" not in str(err.value)


def test_split_seed_and_the_seed_argument() -> None:
    base = load_data(synth_cfg())
    assert base.version == "synthetic-v1:seed=0:n=240/60:c=10:val=24@0"
    assert load_data(synth_cfg(), seed=0).version == base.version  # cfg.split_seed defaults to 0
    by_cfg, by_arg = load_data(synth_cfg(split_seed=3)), load_data(synth_cfg(split_seed=0), seed=3)
    assert by_cfg.version == by_arg.version == "synthetic-v1:seed=3:n=240/60:c=10:val=24@3"
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(by_cfg, split).images, getattr(by_arg, split).images)
        assert torch.equal(getattr(by_cfg, split).labels, getattr(by_arg, split).labels)
    assert not torch.equal(by_cfg.val.images, base.val.images)


SMOKE = builtin_spec_dir() / "smoke.yaml"


@pytest.mark.parametrize("value,hint", [(0, "count >= 1"), (-3, "count >= 1"), (0.0, "fraction in (0, 1)"),
                                        (1.0, "fraction in (0, 1)"), (1.5, "fraction in (0, 1)"),
                                        (2.0, "fraction in (0, 1)"), ("lots", "lots"),
                                        (True, "True")])
def test_invalid_val_size_is_a_one_line_spec_error(value, hint) -> None:
    import yaml

    d = yaml.safe_load(SMOKE.read_text())
    d["data"]["val_size"] = value
    with pytest.raises(SpecError) as err:
        parse_spec(d)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("spec field 'data.val_size") and hint in msg, msg
    assert err.value.field.startswith("data.val_size")


def test_valid_val_size_forms() -> None:
    import yaml

    d = yaml.safe_load(SMOKE.read_text())
    assert parse_spec(d).data.val_size == 0.1 and parse_spec(d).data.split_seed == 0  # the defaults
    for value, want in ((5000, 5000), (1, 1), (0.2, 0.2), ("0.2", 0.2), (0.999, 0.999)):
        got = parse_spec(d, {"data.val_size": value}).data.val_size
        assert got == want and type(got) is type(want), (value, got)


def test_splits_depend_only_on_the_data_config() -> None:
    """Every seed of a multi-seed run trains and chooses on the very same splits."""
    import yaml

    d = yaml.safe_load(SMOKE.read_text())
    d["data"].update(train_size=240, test_size=60)
    no_seed = {k: v for k, v in d.items() if k not in ("seed", "seeds")}
    specs = [parse_spec(d), parse_spec({**no_seed, "seeds": [3, 1, 2]}), parse_spec({**no_seed, "seed": 9}),
             parse_spec(no_seed, {"student.train.epochs": 1})]
    assert [s.seeds for s in specs] == [(0,), (3, 1, 2), (9,), (0,)]
    bundles = [load_data(s.data) for s in specs]
    first = bundles[0]
    assert first.version == "synthetic-v1:seed=0:n=240/60:c=10:val=24@0"
    for b in bundles[1:]:
        assert b.version == first.version and b.mean == first.mean and b.std == first.std
        for split in ("train", "val", "test"):
            assert torch.equal(getattr(b, split).images, getattr(first, split).images)
            assert torch.equal(getattr(b, split).labels, getattr(first, split).labels)
    moved = load_data(parse_spec(d, {"data.split_seed": 1}).data)  # the data's own seed does move them
    assert moved.version != first.version and not torch.equal(moved.val.images, first.val.images)


# -- image folders ----------------------------------------------------------------------------------------
COLOURS = {"cat": (200, 30, 30), "ant": (30, 200, 30), "bee": (30, 30, 200)}


def _make_folder(root: Path, per_class: int = 4) -> None:
    for split in ("train", "test"):
        for cls, rgb in COLOURS.items():
            d = root / split / cls
            d.mkdir(parents=True)
            for k in range(per_class):
                arr = np.full((8, 8, 3), rgb, dtype=np.uint8)
                arr[0, 0] = k  # tells the files apart
                Image.fromarray(arr).save(d / f"{k:03d}.png")
            (d / ".DS_Store").write_bytes(b"junk")  # ignored: not an image


def test_imagefolder_folder_archive_and_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "mini"
    _make_folder(root)
    cfg = DataConfig(dataset="imagefolder", root=str(root))
    check_data(cfg)
    b = load_data(cfg)
    assert b.class_names == ("ant", "bee", "cat") and b.num_classes == 3
    # no val/ folder: the default tenth of the 12 train images (one, from the first of three tied classes) is
    # held out, stratified; train keeps the folder order
    assert b.train.images.shape == (11, 3, 8, 8) and b.train.labels.tolist() == [0] * 3 + [1] * 4 + [2] * 4
    assert b.val.images.shape == (1, 3, 8, 8) and b.val.labels.tolist() == [0] and len(b.test) == 12
    ants = torch.cat([b.train.images[:3], b.val.images])
    assert sorted(ants[:, 0, 0, 0].tolist()) == [0, 1, 2, 3] and (ants[:, :, 1, 1] == torch.tensor([30, 200, 30])).all()
    assert b.train.images[7, :, 1, 1].tolist() == [200, 30, 30] and b.train.images[7:, 0, 0, 0].tolist() == [0, 1, 2, 3]
    assert b.test.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert b.version.startswith("imagefolder-v2:mini:") and b.version.endswith(":n=11/1/12:c=3:val=1@0")
    cached = list((tmp_path / "cache" / "imagefolder").iterdir())
    assert len(cached) == 1
    monkeypatch.setattr("kdsearch.data.sources.decode_folder", lambda root: pytest.fail("decoded twice"))
    again = load_data(cfg)
    assert torch.equal(again.train.images, b.train.images) and again.version == b.version
    assert torch.equal(again.val.images, b.val.images)
    monkeypatch.undo()
    monkeypatch.setenv("KDSEARCH_CACHE", str(tmp_path / "cache"))
    (root / "train" / "ant" / "009.png").write_bytes((root / "train" / "ant" / "000.png").read_bytes())
    grown = load_data(cfg)  # a changed class folder is a new identity, decoded afresh
    assert len(grown.train) == 12 and len(grown.val) == 1 and grown.version != b.version  # 13 - round(1.3)
    parent = load_data(DataConfig(dataset="imagefolder", root=str(tmp_path)))  # one level up, as extracted
    assert torch.equal(parent.train.images, grown.train.images) and torch.equal(parent.val.images, grown.val.images)
    assert parent.version == grown.version  # another root, the same images: the same data version
    with pytest.raises(DataError, match="num_classes is 5"):
        load_data(DataConfig(dataset="imagefolder", root=str(root), num_classes=5))

    archive = tmp_path / "mini.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(root, arcname="mini")
    cfg_tar = DataConfig(dataset="imagefolder", root=str(archive), train_size=6)
    check_data(cfg_tar)
    t = load_data(cfg_tar, seed=0)
    # a class-balanced subset of 6 first, then one of them (round(0.6)) held out for validation
    counts = torch.bincount(t.train.labels, minlength=3) + torch.bincount(t.val.labels, minlength=3)
    assert counts.tolist() == [2, 2, 2] and len(t.train) == 5 and len(t.val) == 1 and len(t.test) == 12
    assert torch.equal(t.test.images, grown.test.images)
    assert t.version.endswith(":n=5/1/12:c=3:val=1@0:subset-seed=0")


def test_imagefolder_version_follows_content_not_path_or_mtime(tmp_path: Path) -> None:
    """A copy of the archive on another node (another path, another mtime) is the same data to every resume key
    and logit cache; one changed pixel is not."""
    import os
    import shutil

    root = tmp_path / "mini"
    _make_folder(root)
    archive = tmp_path / "a" / "mini.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(root, arcname="mini")
    first = load_data(DataConfig(dataset="imagefolder", root=str(archive)))
    copy = tmp_path / "b" / "mini.tar.gz"
    copy.parent.mkdir()
    shutil.copyfile(archive, copy)
    os.utime(copy, ns=(1, 1))
    assert load_data(DataConfig(dataset="imagefolder", root=str(copy))).version == first.version
    assert load_data(DataConfig(dataset="imagefolder", root=str(root))).version == first.version  # extracted
    arr = np.full((8, 8, 3), COLOURS["ant"], dtype=np.uint8)
    arr[0, 0], arr[4, 4] = 0, 1
    Image.fromarray(arr).save(root / "test" / "ant" / "000.png")  # one pixel of one test image
    changed = tmp_path / "c" / "mini.tar.gz"
    changed.parent.mkdir()
    with tarfile.open(changed, "w:gz") as tf:
        tf.add(root, arcname="mini")
    assert load_data(DataConfig(dataset="imagefolder", root=str(changed))).version != first.version


def _add_val_folder(root: Path, per_class: int = 2, classes=COLOURS) -> None:
    for cls, rgb in classes.items():
        d = root / "val" / cls
        d.mkdir(parents=True)
        for k in range(per_class):
            arr = np.full((8, 8, 3), rgb, dtype=np.uint8)
            arr[0, 0] = 100 + k  # tells validation images from train (0..3) and test images
            Image.fromarray(arr).save(d / f"v{k:03d}.png")


def test_imagefolder_own_val_folder_is_the_val_split(tmp_path: Path) -> None:
    root = tmp_path / "withval"
    _make_folder(root)
    plain = load_data(DataConfig(dataset="imagefolder", root=str(root)))  # cached without val/ first
    assert len(plain.train) == 11 and plain.version.endswith(":val=1@0")
    _add_val_folder(root)
    cfg = DataConfig(dataset="imagefolder", root=str(root), val_size=5)  # val_size is ignored: the data has val/
    check_data(cfg)
    b = load_data(cfg)  # adding val/ changes the folder's identity: decoded afresh, not the old cache
    assert len(b.train) == 12 and len(b.val) == 6 and len(b.test) == 12  # nothing held out of train
    assert b.train.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert b.train.images[:, 0, 0, 0].tolist() == [0, 1, 2, 3] * 3
    assert _rows(b.train.images) == _rows(torch.cat([plain.train.images, plain.val.images]))
    assert b.val.labels.tolist() == [0, 0, 1, 1, 2, 2] and b.val.images[:, 0, 0, 0].tolist() == [100, 101] * 3
    assert b.val.images[4, :, 1, 1].tolist() == [200, 30, 30]  # cat, in folder order
    assert (b.train.images[:, 0, 0, 0] < 100).all() and (b.test.images[:, 0, 0, 0] < 100).all()
    assert b.version.startswith("imagefolder-v2:withval:") and b.version.endswith(":n=12/6/12:c=3:val=folder")
    assert (b.mean, b.std) == channel_stats(b.train.images)  # statistics of the train images only

    sub = load_data(DataConfig(dataset="imagefolder", root=str(root), train_size=6, test_size=3), seed=1)
    assert len(sub.train) == 6 and len(sub.test) == 3 and torch.equal(sub.val.images, b.val.images)  # val whole
    assert sub.version.endswith(":n=6/6/3:c=3:val=folder:subset-seed=1")

    archive = tmp_path / "withval.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(root, arcname="withval")
    from_tar = load_data(DataConfig(dataset="imagefolder", root=str(archive)))
    assert torch.equal(from_tar.val.images, b.val.images) and torch.equal(from_tar.train.images, b.train.images)
    assert from_tar.version.endswith(":n=12/6/12:c=3:val=folder")

    _add_val_folder(root, 1, {"dog": (9, 9, 9)})  # a validation class that train/ does not have
    with pytest.raises(DataError, match="val classes"):
        load_data(cfg)


def test_check_data_wants_test_in_an_archive_with_val(tmp_path: Path) -> None:
    root = tmp_path / "notest"
    for split in ("train", "val"):
        for cls, rgb in COLOURS.items():
            (root / split / cls).mkdir(parents=True)
            Image.fromarray(np.full((8, 8, 3), rgb, dtype=np.uint8)).save(root / split / cls / "0.png")
    archive = tmp_path / "notest.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(root, arcname="notest")
    with pytest.raises(DataError, match="test"):
        check_data(DataConfig(dataset="imagefolder", root=str(archive)))


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        check_data(DataConfig(dataset="imagefolder", root=str(tmp_path / "nope")))
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match="train/ and test/"):
        load_data(DataConfig(dataset="imagefolder", root=str(tmp_path / "flat")))
    bad = tmp_path / "bad.tar.gz"
    with tarfile.open(bad, "w:gz") as tf:
        tf.add(tmp_path / "flat", arcname="x/train")
    with pytest.raises(DataError, match="no images under"):
        check_data(DataConfig(dataset="imagefolder", root=str(bad)))


@pytest.mark.skipif(not SHARED_JPEG.is_file(), reason="../shared/data/cifar10-jpeg.tar.gz not present")
def test_shared_cifar10_jpeg_subset(tmp_path: Path) -> None:
    """Extract two images per class and split from the shared archive (no full decode) and load them."""
    root, want = tmp_path / "c10", {}
    with tarfile.open(SHARED_JPEG, "r:gz") as tf:
        for m in tf:
            parts = m.name.split("/")
            if m.isfile() and len(parts) == 4 and want.setdefault((parts[1], parts[2]), 0) < 2:
                want[(parts[1], parts[2])] += 1
                dest = root / parts[1] / parts[2] / parts[3]
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(tf.extractfile(m).read())
    b = load_data(DataConfig(dataset="imagefolder", root=str(root)))
    assert b.class_names == CIFAR10_CLASSES
    assert b.train.images.shape == (18, 3, 32, 32) and b.val.images.shape == (2, 3, 32, 32)
    assert b.test.images.shape == (20, 3, 32, 32)
    val_counts = torch.bincount(b.val.labels, minlength=10)
    assert (torch.bincount(b.train.labels, minlength=10) + val_counts).tolist() == [2] * 10
    assert val_counts.tolist() == [1, 1] + [0] * 8  # 10 tied shares of 0.2: the first two classes give one
    airplanes = torch.cat([b.train.images[b.train.labels == 0], b.val.images[b.val.labels == 0]])
    for f in sorted((root / "train" / "airplane").iterdir()):
        pil = torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1)
        diff = (airplanes.int() - pil.int()).abs().flatten(1).max(1).values
        assert diff.min() <= 1  # same JPEG decode as PIL (libjpeg)
    check_data(DataConfig(dataset="imagefolder", root=str(SHARED_JPEG)))  # member names only, no decode


# -- CIFAR via torchvision, offline ------------------------------------------------------------------------
@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_missing_cifar_offline_raises_helpful_error(tmp_path: Path, dataset: str) -> None:
    cfg = DataConfig(dataset=dataset, root=str(tmp_path), download=False)
    for fn in (check_data, load_data):
        with pytest.raises(DataError) as err:
            fn(cfg)
        msg = str(err.value)
        assert "\n" not in msg and str(tmp_path) in msg
        assert "download: true" in msg and "imagefolder" in msg and "cifar-" in msg


def test_data_root_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KDSEARCH_DATA", str(tmp_path / "elsewhere"))
    with pytest.raises(DataError, match="elsewhere"):
        check_data(DataConfig(dataset="cifar10", download=False))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_path_gives_the_cpu_views(bundle: DataBundle) -> None:
    cfg = synth_cfg(augment="standard", cutout=8, random_erasing=0.5, on_gpu=True)
    gpu = TrainLoader(bundle, cfg, batch_size=32, seed=4, device="cuda")
    assert gpu.on_gpu and gpu._images.is_cuda
    batch = next(iter(gpu.epoch(3)))
    assert batch.images.is_cuda and batch.labels.is_cuda and batch.index.is_cuda
    cpu = TrainLoader(bundle, cfg, batch_size=32, seed=4)
    assert torch.equal(batch.images.cpu(), cpu.views(3, batch.index.cpu()))
    host = TrainLoader(bundle, synth_cfg(augment="autoaugment", num_workers=0), batch_size=8, seed=0, device="cuda")
    assert next(iter(host.epoch(0))).images.is_cuda



def test_a_ray_task_sizes_threads_and_loader_workers_to_its_cpus(ray_session, caplog) -> None:
    """data.num_workers is an upper bound: a 1-CPU task gets 1 intra-op thread and 1 DataLoader worker (no
    PyTorch "suggested max number of worker" warning), and says so."""
    from kdsearch.data.loaders import loader_workers

    def in_a_task(spec_threads: int) -> tuple[int, int, list[str]]:  # nested: Ray ships it by value
        import warnings

        from kdsearch.data import TrainLoader, load_data
        from kdsearch.data.loaders import loader_workers
        from kdsearch.runtime import set_cpu_threads
        from kdsearch.spec import DataConfig

        loader_workers.cache_clear()
        set_cpu_threads(spec_threads)  # what a stage's task does; the spec's number loses to what Ray gave
        cfg = DataConfig(dataset="synthetic", num_classes=10, train_size=240, test_size=60, augment="autoaugment",
                         num_workers=4)
        loader = TrainLoader(load_data(cfg, seed=0), cfg, batch_size=16, seed=0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            next(iter(loader.epoch(0)))
        loader.close()
        return torch.get_num_threads(), loader.num_workers, [str(w.message) for w in caught]

    threads, workers, warned = ray_session.get(ray_session.remote(num_cpus=1)(in_a_task).remote(8))
    assert (threads, workers) == (1, 1)
    assert not [w for w in warned if "worker processes in total" in w]
    loader_workers.cache_clear()
    with caplog.at_level("INFO", logger="kdsearch.data"):
        assert loader_workers(8, 2) == 2 and loader_workers(1, 2) == 1
    assert caplog.messages == ["2 DataLoader workers instead of data.num_workers=8: this process has 2 CPUs"]
