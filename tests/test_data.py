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
                           TrainLoader, batch_augment, check_data, class_balanced_subset, draw_epoch_params,
                           load_data, make_synthetic)
from kdsearch.data.augment import AugmentSpec
from kdsearch.spec import DataConfig

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


@pytest.fixture(scope="module")
def bundle() -> DataBundle:
    return load_data(synth_cfg(), seed=0)


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
    assert torch.bincount(b.train.labels, minlength=100).tolist() == [5] * 100
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
    assert len(a) == 240 // 32 and len(TrainLoader(bundle, cfg, batch_size=32, seed=7, drop_last=False)) == 8
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
    loader = TrainLoader(bundle, synth_cfg(augment="none"), batch_size=40, seed=0)
    seen = []
    for batch in loader.epoch(0):
        assert torch.equal(batch.labels, bundle.train.labels[batch.index])
        assert torch.equal(batch.images, bundle.train.images[batch.index])  # "none" without cutout = identity
        seen += batch.index.tolist()
    assert sorted(seen) == list(range(240))


def test_policy_path_views_independent_of_workers_and_batching(bundle: DataBundle) -> None:
    small = DataBundle(bundle.train.subset(torch.arange(64)), bundle.test, bundle.num_classes,
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
    assert b.train.images.shape == (12, 3, 8, 8) and b.train.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert b.train.images[8, :, 1, 1].tolist() == [200, 30, 30] and b.train.images[9, 0, 0, 0] == 1
    assert b.version.startswith("imagefolder-v1:mini:") and b.version.endswith(":n=12/12:c=3")
    cached = list((tmp_path / "cache" / "imagefolder").iterdir())
    assert len(cached) == 1
    monkeypatch.setattr("kdsearch.data.sources.decode_folder", lambda root: pytest.fail("decoded twice"))
    again = load_data(cfg)
    assert torch.equal(again.train.images, b.train.images) and again.version == b.version
    monkeypatch.undo()
    monkeypatch.setenv("KDSEARCH_CACHE", str(tmp_path / "cache"))
    (root / "train" / "ant" / "009.png").write_bytes((root / "train" / "ant" / "000.png").read_bytes())
    grown = load_data(cfg)  # a changed class folder is a new identity, decoded afresh
    assert len(grown.train) == 13 and grown.version != b.version
    parent = load_data(DataConfig(dataset="imagefolder", root=str(tmp_path)))  # one level up, as extracted
    assert torch.equal(parent.train.images, grown.train.images)
    with pytest.raises(DataError, match="num_classes is 5"):
        load_data(DataConfig(dataset="imagefolder", root=str(root), num_classes=5))

    archive = tmp_path / "mini.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(root, arcname="mini")
    cfg_tar = DataConfig(dataset="imagefolder", root=str(archive), train_size=6)
    check_data(cfg_tar)
    t = load_data(cfg_tar, seed=0)
    assert torch.bincount(t.train.labels).tolist() == [2, 2, 2] and len(t.test) == 12
    assert torch.equal(t.test.images, grown.test.images) and "subset-seed=0" in t.version


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
    assert b.train.images.shape == (20, 3, 32, 32) and b.test.images.shape == (20, 3, 32, 32)
    assert torch.bincount(b.train.labels).tolist() == [2] * 10
    first = sorted((root / "train" / "airplane").iterdir())[0]
    pil = torch.from_numpy(np.array(Image.open(first).convert("RGB"))).permute(2, 0, 1)
    assert (b.train.images[0].int() - pil.int()).abs().max() <= 1  # same JPEG decode as PIL (libjpeg)
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
