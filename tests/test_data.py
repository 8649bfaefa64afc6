"""Tests of analytic_dpm.data: in-memory image datamodules, Fashion-MNIST setup, synthetic data, configs."""

from __future__ import annotations

import gzip
import struct
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from analytic_dpm.data import (
    DATAMODULES,
    CelebA64DataModule,
    CIFAR10DataModule,
    DatasetNotAvailableError,
    FashionMNISTDataModule,
    GaussianDataModule,
    GaussianMixtureDataModule,
    ImageFolderDataModule,
    TensorBatchDataset,
    from_model_space,
    get_datamodule_class,
    to_model_space,
)
from analytic_dpm.data import fashion_mnist_setup as fms

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "data"
REAL_DEBIAN = Path("/usr/share/datasets/fashion-mnist")


# ---------------------------------------------------------------- helpers
def _write_images(folder: Path, n_per_class: int = 10, size: int = 12, classes=("cat", "dog"), seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for ci, cls in enumerate(classes):
        d = folder / cls
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
            # PNG is lossless; one JPEG per class checks that format too
            ext = "jpg" if i == 0 else "png"
            Image.fromarray(arr).save(d / f"{ci}_{i:02d}.{ext}")


@pytest.fixture
def image_dirs(tmp_path):
    train, test = tmp_path / "imgs" / "train", tmp_path / "imgs" / "test"
    _write_images(train, n_per_class=10, seed=0)
    _write_images(test, n_per_class=4, seed=1)
    return train, test


def _idx_bytes(magic: int, dims: list[int], payload: bytes) -> bytes:
    return struct.pack(">i", magic) + b"".join(struct.pack(">i", d) for d in dims) + payload


def _fake_debian_dir(d: Path, n_train: int = 50, n_test: int = 20) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    d.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=(n,), dtype=np.uint8)
        arrays[prefix] = imgs
        with gzip.open(d / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(_idx_bytes(2051, [n, 28, 28], imgs.tobytes()))
        with gzip.open(d / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(_idx_bytes(2049, [n], labels.tobytes()))
    return arrays


# ---------------------------------------------------------------- model space
def test_to_model_space_exact_ends_and_float_passthrough():
    x = torch.tensor([0, 1, 127, 128, 254, 255], dtype=torch.uint8)
    y = to_model_space(x)
    assert y.dtype == torch.float32
    assert y[0].item() == -1.0 and y[-1].item() == 1.0
    assert torch.allclose(y.double(), 2 * (x.double() / 255) - 1, atol=1e-6, rtol=0)
    f = torch.randn(3, 1, 2, 2)
    assert to_model_space(f) is f
    assert torch.equal(from_model_space(y), x)
    with pytest.raises(TypeError):
        to_model_space(torch.zeros(2, dtype=torch.int64))


# ---------------------------------------------------------------- image folder
def test_image_folder_loads_shapes_range_and_heldout_is_deterministic(image_dirs):
    train, test = image_dirs
    dm = ImageFolderDataModule(train, test, image_size=12, batch_size=8, flip=False)
    assert dm._train is None and dm._heldout is None  # lazy
    dm.setup("fit")
    assert dm.channels == 3 and dm.image_size == 12 and dm.data_range == (-1.0, 1.0)
    pool = dm.train_pool()
    assert pool.shape == (20, 3, 12, 12) and pool.dtype == torch.uint8
    # PNGs are lossless: the decoded pixels are the ones written (file 1 of class 0 is the 2nd sorted file)
    from PIL import Image

    ref = np.array(Image.open(train / "cat" / "0_01.png"))
    assert torch.equal(pool[1], torch.from_numpy(ref).permute(2, 0, 1))

    batches = list(dm.train_dataloader())
    assert len(batches) == 2  # 20 // 8 with drop_last
    assert all(b.shape == (8, 3, 12, 12) and b.dtype == torch.uint8 for b in batches)
    m = to_model_space(batches[0])
    assert m.min() >= -1 and m.max() <= 1

    h1, h2 = dm.heldout(5), dm.heldout(5)
    assert h1.shape == (5, 3, 12, 12) and torch.equal(h1, h2)
    assert torch.equal(torch.cat(list(dm.val_dataloader())), dm.heldout())
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(dm.train_pool(7, generator=g1), dm.train_pool(7, generator=g2))
    with pytest.raises(ValueError, match="only 8"):
        dm.heldout(9)


def test_image_folder_flip(image_dirs):
    train, test = image_dirs
    dm = ImageFolderDataModule(train, test, image_size=12, batch_size=20, flip=True)
    dm.setup()
    data = dm.train_pool()
    ds = TensorBatchDataset(data, flip=True, generator=torch.Generator().manual_seed(0))
    idx = list(range(20))
    batch = ds.__getitems__(idx)
    flipped = [not torch.equal(batch[i], data[i]) for i in idx]
    assert any(flipped) and not all(flipped)
    for i in idx:
        assert torch.equal(batch[i], data[i].flip(-1) if flipped[i] else data[i])
    # through the loader: every item is a training image or its mirror image; held-out is never flipped
    originals = {data[i].numpy().tobytes() for i in idx} | {data[i].flip(-1).numpy().tobytes() for i in idx}
    torch.manual_seed(0)
    (b,) = list(dm.train_dataloader())
    assert all(x.numpy().tobytes() in originals for x in b)
    assert torch.equal(torch.cat(list(dm.val_dataloader())), dm.heldout())


def test_image_folder_cache_reused(image_dirs, tmp_path, monkeypatch):
    train, test = image_dirs
    cache = tmp_path / "cache"
    dm = ImageFolderDataModule(train, test, image_size=8, channels=1, cache_dir=cache, batch_size=4)
    dm.setup()
    files = sorted(cache.glob("*.npy"))
    assert len(files) == 2 and dm.last_cache_files["train"] in files
    x_train, x_test = dm.train_pool(), dm.heldout()
    assert x_train.shape == (20, 1, 8, 8)

    # a second datamodule loads the cache (prove it by making decoding impossible)
    import analytic_dpm.data.sources as sources

    def boom(*a, **k):
        raise AssertionError("decoded again despite the cache")

    with monkeypatch.context() as m:
        m.setattr(sources, "decode_images", boom)
        dm2 = ImageFolderDataModule(train, test, image_size=8, channels=1, cache_dir=cache, batch_size=4)
        dm2.setup()
    assert torch.equal(dm2.train_pool(), x_train) and torch.equal(dm2.heldout(), x_test)
    assert torch.equal(torch.from_numpy(np.load(dm.last_cache_files["train"])), x_train)

    # changing the file list (or the preprocessing) gives a new cache entry
    _write_images(train / "extra", n_per_class=1, seed=5, classes=("bird",))
    dm3 = ImageFolderDataModule(train, test, image_size=8, channels=1, cache_dir=cache, batch_size=4)
    assert dm3.num_train == 21
    assert len(list(cache.glob("*.npy"))) == 3


def test_image_folder_crop_resize_non_square(tmp_path):
    from PIL import Image

    d = tmp_path / "flat"
    d.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 20), (10 * i, 20, 30)).save(d / f"{i}.png")
    dm = ImageFolderDataModule(d, d, image_size=16, batch_size=2, use_cache=False)
    x = dm.heldout()
    assert x.shape == (3, 3, 16, 16)
    assert torch.equal(x[2, :, 0, 0], torch.tensor([20, 20, 30], dtype=torch.uint8))


def test_image_folder_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    dm = ImageFolderDataModule(tmp_path / "missing", tmp_path / "empty", image_size=8)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dm.setup()
    dm = ImageFolderDataModule(tmp_path / "empty", tmp_path / "empty", image_size=8)
    with pytest.raises(FileNotFoundError, match="no images found"):
        dm.setup()


def test_loader_with_workers(image_dirs):
    train, test = image_dirs
    dm = ImageFolderDataModule(train, test, image_size=12, batch_size=5, num_workers=1)
    loader = dm.train_dataloader()
    assert loader.persistent_workers and loader.drop_last
    batches = list(loader)
    assert len(batches) == 4 and all(b.dtype == torch.uint8 and b.shape == (5, 3, 12, 12) for b in batches)


# ---------------------------------------------------------------- Fashion-MNIST
def test_fashion_mnist_setup_from_fake_debian(tmp_path, capsys):
    debian = tmp_path / "debian"
    arrays = _fake_debian_dir(debian)
    root = tmp_path / "root"
    assert fms.main([str(root), "--debian-dir", str(debian), "--no-apt"]) == 0
    raw = root / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(fms.RAW_FILES)
    assert "copying" in capsys.readouterr().out

    dm = FashionMNISTDataModule(root, batch_size=10, download=False, debian_dir=tmp_path / "nowhere")
    dm.setup()
    assert dm.channels == 1 and dm.image_size == 28
    assert torch.equal(dm.train_pool(), torch.from_numpy(arrays["train"])[:, None])
    assert torch.equal(dm.heldout(3), torch.from_numpy(arrays["t10k"][:3])[:, None])
    assert next(iter(dm.train_dataloader())).shape == (10, 1, 28, 28)


def test_fashion_mnist_datamodule_copies_debian_files_itself(tmp_path):
    debian = tmp_path / "debian"
    arrays = _fake_debian_dir(debian)
    dm = FashionMNISTDataModule(
        tmp_path / "root", batch_size=10, download=False, debian_dir=debian, image_size=32
    )
    x = dm.heldout()
    assert x.shape == (20, 1, 32, 32)
    assert torch.equal(x[:, :, 2:30, 2:30], torch.from_numpy(arrays["t10k"])[:, None])
    assert x[:, :, :2].sum() == 0


def test_fashion_mnist_missing_gives_clear_error(tmp_path, monkeypatch):
    import torchvision.datasets

    def no_network(self):
        raise RuntimeError("no network")

    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "download", no_network)
    dm = FashionMNISTDataModule(tmp_path / "root", debian_dir=tmp_path / "nowhere")
    with pytest.raises(DatasetNotAvailableError, match="analytic_dpm.data.fashion_mnist_setup"):
        dm.setup()
    # the setup command, without Debian files and without apt, exits non-zero with instructions
    assert fms.main([str(tmp_path / "root"), "--debian-dir", str(tmp_path / "nowhere"), "--no-apt"]) == 1


@pytest.mark.skipif(
    not fms.debian_files_present(REAL_DEBIAN), reason="Debian dataset-fashion-mnist not installed"
)
def test_fashion_mnist_real_debian_files(tmp_path):
    dm = FashionMNISTDataModule(tmp_path, batch_size=128, download=False, debian_dir=REAL_DEBIAN)
    dm.setup()
    assert dm.num_train == 60000 and dm.num_heldout == 10000
    x = dm.heldout(1000).float()
    assert 60 < x.mean() < 90  # Fashion-MNIST mean pixel is about 72.9


# ---------------------------------------------------------------- CIFAR-10 / CelebA
def test_cifar10_offline_clear_error(tmp_path, monkeypatch):
    import torchvision.datasets

    def no_network(self):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", no_network)
    dm = CIFAR10DataModule(tmp_path, batch_size=4)
    with pytest.raises(DatasetNotAvailableError) as e:
        dm.setup()
    msg = str(e.value)
    assert "cifar-10-batches-py" in msg and "data=image_folder" in msg and "prepare.py" in msg
    assert str(tmp_path) in msg and "URLError" in msg
    with pytest.raises(DatasetNotAvailableError):
        CIFAR10DataModule(tmp_path, download=False).heldout(1)


def test_cifar10_layout_conversion(tmp_path, monkeypatch):
    import torchvision.datasets

    rng = np.random.default_rng(0)
    store = {
        True: rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8),
        False: rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8),
    }

    class FakeCIFAR10:
        def __init__(self, root, train=True, download=False):
            self.data = store[train]

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    dm = CIFAR10DataModule(tmp_path, batch_size=4)
    dm.setup()
    assert dm.train_pool().shape == (12, 3, 32, 32) and dm.train_pool().is_contiguous()
    assert torch.equal(dm.heldout(2), torch.from_numpy(store[False][:2]).permute(0, 3, 1, 2))
    assert len(list(dm.train_dataloader())) == 3 and len(list(dm.val_dataloader())) == 2


def test_celeba_missing_clear_error(tmp_path):
    with pytest.raises(DatasetNotAvailableError, match="list_eval_partition"):
        CelebA64DataModule(tmp_path).setup()


def test_celeba_from_files(tmp_path):
    from PIL import Image

    base = tmp_path / "celeba"
    (base / "img_align_celeba").mkdir(parents=True)
    lines = []
    for i in range(6):
        arr = np.zeros((218, 178, 3), dtype=np.uint8)
        arr[57:185, 25:153] = 200  # the crop box is uniform 200, the rest black
        Image.fromarray(arr).save(base / "img_align_celeba" / f"{i + 1:06d}.png")
        lines.append(f"{i + 1:06d}.png {[0, 0, 0, 1, 2, 2][i]}")
    (base / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    dm = CelebA64DataModule(tmp_path, batch_size=2)
    dm.setup()
    assert dm.num_train == 3 and dm.num_heldout == 2
    assert dm.train_pool().shape == (3, 3, 64, 64)
    assert (dm.train_pool() == 200).all()
    assert len(list((base / ".cache").glob("*.npy"))) == 2


# ---------------------------------------------------------------- synthetic
def test_gaussian_moments_and_determinism():
    dm = GaussianDataModule(dim_shape=(1, 4, 4), mean=0.3, std=0.5, num_train=20000, num_test=1000, seed=1)
    dm.setup()
    assert dm.data_range is None and dm.channels == 1 and dm.image_size == 4
    x = dm.train_pool()
    assert x.dtype == torch.float32 and x.shape == (20000, 1, 4, 4)
    assert abs(x.mean().item() - 0.3) < 0.01 and abs(x.std().item() - 0.5) < 0.01
    dm2 = GaussianDataModule(dim_shape=(1, 4, 4), mean=0.3, std=0.5, num_train=20000, num_test=1000, seed=1)
    assert torch.equal(dm2.train_pool(), x) and torch.equal(dm2.heldout(), dm.heldout())
    dm3 = GaussianDataModule(channels=1, image_size=4, mean=0.3, std=0.5, num_train=10, num_test=1000, seed=1)
    assert torch.equal(dm3.heldout(), dm.heldout())  # held-out set independent of num_train
    assert not torch.equal(GaussianDataModule(num_train=10, seed=2).train_pool(), dm3.train_pool())
    b = next(iter(dm.train_dataloader()))
    assert b.dtype == torch.float32 and b.shape == (256, 1, 4, 4) and to_model_space(b) is b
    with pytest.raises(ValueError, match="disagrees"):
        GaussianDataModule(dim_shape=(1, 4, 4), channels=3)


def test_gaussian_mixture_moments_and_determinism():
    means = torch.tensor([-1.0, 2.0])
    kw = dict(means=means.tolist(), stds=[0.2, 0.5], weights=[1, 3], dim_shape=(2, 2, 2), num_train=40000)
    dm = GaussianMixtureDataModule(**kw, seed=0)
    x = dm.train_pool()
    assert x.shape == (40000, 2, 2, 2) and dm.data_range is None
    w = torch.tensor([0.25, 0.75])
    mean = (w * means).sum()
    var = (w * (torch.tensor([0.2, 0.5]) ** 2 + means**2)).sum() - mean**2
    assert abs(x.mean().item() - mean.item()) < 0.03
    assert abs(x.var().item() - var.item()) < 0.05
    assert torch.equal(GaussianMixtureDataModule(**kw, seed=0).train_pool(), x)
    # each sample is one component's draw: the per-sample mean sits near -1 or 2
    xs, j = dm.sample_with_components(1000, torch.Generator().manual_seed(0))
    assert torch.allclose(xs.mean(dim=(1, 2, 3)), means[j], atol=0.8)
    # [J, C, H, W] means set the shape
    m4 = torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2)])
    dm4 = GaussianMixtureDataModule(means=m4.tolist(), num_train=10, num_test=10)
    assert (dm4.channels, dm4.image_size) == (1, 2)


# ---------------------------------------------------------------- registry and configs
def test_unknown_dataset_name():
    assert get_datamodule_class("cifar10") is CIFAR10DataModule
    with pytest.raises(ValueError, match="unknown dataset 'x'; choose one of .*cifar10.*fashion_mnist"):
        get_datamodule_class("x")


@pytest.mark.parametrize("path", sorted(CONF_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_configs_instantiate_lazily(path, tmp_path):
    data = OmegaConf.load(path)
    if path.stem == "image_folder":
        data.train_dir, data.test_dir = str(tmp_path / "tr"), str(tmp_path / "te")
    cfg = OmegaConf.create({"paths": {"data_dir": str(tmp_path / "data")}, "data": data})
    assert path.stem in DATAMODULES
    dm = instantiate(cfg.data)
    assert isinstance(dm, get_datamodule_class(path.stem))
    assert dm.channels == cfg.data.channels and dm.image_size == cfg.data.image_size
    assert dm.batch_size == cfg.data.batch_size
    assert dm._train is None and dm._heldout is None
    assert not (tmp_path / "data").exists()  # nothing read or written at construction


def test_config_set_and_geometry_checks():
    assert {p.stem for p in CONF_DIR.glob("*.yaml")} >= {
        "cifar10",
        "fashion_mnist",
        "celeba64",
        "imagenet64",
        "image_folder",
        "gaussian",
        "gmm",
    }
    with pytest.raises(ValueError, match="channels"):
        CIFAR10DataModule("x", channels=1)
    with pytest.raises(ValueError, match="image_size"):
        CIFAR10DataModule("x", image_size=64)


def test_lightning_trainer_uses_the_datamodule(tmp_path):
    import lightning as L

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(16, 1)
            self.seen = []

        def training_step(self, batch, batch_idx):
            assert isinstance(batch, torch.Tensor) and batch.dtype == torch.float32
            return self.lin(to_model_space(batch).flatten(1)).pow(2).mean()

        def validation_step(self, batch, batch_idx):
            self.seen.append(batch.shape[0])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = GaussianDataModule(num_train=64, num_test=40, batch_size=16, eval_batch_size=32)
    model = Tiny()
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 4 and model.seen == [32, 8]
