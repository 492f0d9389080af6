"""Multi-crop augmentation on real Fashion-MNIST images: shapes, (seed, epoch, index) determinism,
batch invariance, and each op checked against a hand computation with the other ops switched off."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image

from data.augment import MultiCropAugment, clean_transform, decode_image, to_chw_uint8
from data.config import DataConfig as _DataConfig
from data.sources import read_idx
from trainers.options import ConfigError


# Every random op off and a full-image "random" crop (scale 1 forces the centred full box): the views
# are then exactly the input image, so each test can switch on one op and predict the pixels.
def DataConfig(**fields) -> _DataConfig:  # noqa: N802 - stands in for the class
    """Grayscale unless told: the augmentation reads no meta, so ``channels`` must be set (0 = the data
    set's own, resolved when shards are read)."""
    return _DataConfig(**{"channels": 1, **fields})


IDENTITY = dict(
    global_crop_scale=(1.0, 1.0),
    local_crop_scale=(1.0, 1.0),
    flip_p=0.0,
    color_jitter_p=0.0,
    grayscale_p=0.0,
    blur_p=(0.0, 0.0, 0.0),
    solarize_p=0.0,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The augmentation runs single-threaded in every worker; threads only oversubscribe shared CPUs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def images(fmnist_src) -> np.ndarray:
    return read_idx(fmnist_src / "train-images-idx3-ubyte.gz")[:64]


def _t(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr.copy()).unsqueeze(0)


def test_shapes_and_dtypes(images):
    aug = MultiCropAugment(DataConfig())
    g, loc = aug(_t(images[0]), seed=0, epoch=0, index=0)
    assert g.shape == (2, 1, 28, 28) and g.dtype == torch.uint8
    assert loc.shape == (6, 1, 12, 12) and loc.dtype == torch.uint8
    cfg = DataConfig(
        channels=3, mean=(0.5,) * 3, std=(0.5,) * 3, global_crops=3, local_crops=0, global_crop_size=32
    )
    g, loc = MultiCropAugment(cfg)(Image.fromarray(images[1]), seed=0, epoch=0, index=1)
    assert g.shape == (3, 3, 32, 32) and loc.shape == (0, 3, 12, 12)
    gb, lb = MultiCropAugment(DataConfig()).augment_batch([_t(im) for im in images[:5]], 0, 0, range(5))
    assert gb.shape == (5, 2, 1, 28, 28) and lb.shape == (5, 6, 1, 12, 12)


def test_deterministic_per_seed_epoch_index(images):
    aug = MultiCropAugment(DataConfig())
    x = _t(images[3])
    g0, l0 = aug(x, seed=7, epoch=2, index=3)
    g1, l1 = MultiCropAugment(DataConfig())(x, seed=7, epoch=2, index=3)  # a fresh instance: no hidden state
    assert torch.equal(g0, g1) and torch.equal(l0, l1)
    for other in (
        {"seed": 8, "epoch": 2, "index": 3},
        {"seed": 7, "epoch": 3, "index": 3},
        {"seed": 7, "epoch": 2, "index": 4},
    ):
        g2, l2 = aug(x, **other)
        assert not torch.equal(g0, g2), other
        assert not torch.equal(l0, l2), other


def test_batch_gives_the_same_views_as_one_by_one(images):
    """What makes Ray actors, DataLoader workers and the main process agree on every view."""
    for channels in (1, 3):
        cfg = DataConfig(channels=channels, mean=(0.5,) * channels, std=(0.5,) * channels)
        aug = MultiCropAugment(cfg)
        batch = [_t(im) for im in images[:24]]
        idx = list(range(100, 124))
        g, loc = aug.augment_batch(batch, 1, 5, idx)
        for i in range(24):
            gi, li = aug(batch[i], 1, 5, idx[i])
            assert torch.equal(g[i], gi) and torch.equal(loc[i], li)


def test_mixed_image_sizes_in_one_batch(images):
    aug = MultiCropAugment(DataConfig())
    big = torch.from_numpy(np.kron(images[0], np.ones((2, 3), dtype=np.uint8))).unsqueeze(0)  # 56 x 84
    g, _ = aug.augment_batch([_t(images[1]), big, _t(images[2])], 0, 0, [1, 0, 2])
    assert torch.equal(g[1], aug(big, 0, 0, 0)[0])
    assert torch.equal(g[0], aug(_t(images[1]), 0, 0, 1)[0])


def test_crop_boxes_follow_the_scale_ranges():
    aug = MultiCropAugment(DataConfig())
    for index in range(50):
        p = aug.batch_params(0, 0, [index], [28], [28])
        area = (p.boxes[:, 2] - p.boxes[:, 0]) * (p.boxes[:, 3] - p.boxes[:, 1]) / (28 * 28)
        aspect = (p.boxes[:, 2] - p.boxes[:, 0]) / (p.boxes[:, 3] - p.boxes[:, 1])
        assert np.all((area[:2] >= 0.25 - 1e-9) & (area[:2] <= 1.0 + 1e-9))
        assert np.all((area[2:] >= 0.05 - 1e-9) & (area[2:] <= 0.25 + 1e-9))
        assert np.all((aspect >= 3 / 4 - 1e-9) & (aspect <= 4 / 3 + 1e-9))
        assert np.all(p.boxes[:, :2] >= 0) and np.all(p.boxes[:, 2] <= 28) and np.all(p.boxes[:, 3] <= 28)


def test_identity_settings_reproduce_the_image(images):
    aug = MultiCropAugment(DataConfig(**IDENTITY, local_crop_size=28))
    x = _t(images[5])
    g, loc = aug(x, 0, 0, 5)
    for view in list(g) + list(loc):
        assert torch.equal(view, x)


def test_solarize_only_on_the_second_global(images):
    x = _t(images[6])
    expected = torch.where(x >= 128, 255 - x, x)  # PIL/DINO solarisation at threshold 128
    assert not torch.equal(expected, x)
    cfg = DataConfig(**{**IDENTITY, "solarize_p": 1.0}, global_crops=4, local_crop_size=28)
    g, loc = MultiCropAugment(cfg)(x, 0, 0, 6)
    assert torch.equal(g[0], x) and torch.equal(g[2], x)  # "global 1" recipe
    assert torch.equal(g[1], expected) and torch.equal(g[3], expected)  # "global 2" recipe
    assert all(torch.equal(v, x) for v in loc)  # never on locals
    g, _ = MultiCropAugment(DataConfig(**IDENTITY))(x, 0, 0, 6)
    assert torch.equal(g[1], x)  # p = 0


def test_flip(images):
    x = _t(images[7])
    g, _ = MultiCropAugment(DataConfig(**{**IDENTITY, "flip_p": 1.0}))(x, 0, 0, 7)
    assert torch.equal(g[0], x.flip(-1)) and torch.equal(g[1], x.flip(-1))


def test_brightness_and_contrast_match_hand_computation(images):
    x = _t(images[8])
    xf = x.numpy().astype(np.float64)
    cfg = DataConfig(**{**IDENTITY, "color_jitter_p": 1.0, "color_jitter": (0.4, 0.0, 0.0, 0.0)})
    aug = MultiCropAugment(cfg)
    g, _ = aug(x, 0, 0, 8)
    f = aug.batch_params(0, 0, [8], [28], [28]).factors[0, 0]
    assert 0.6 <= f <= 1.4 and f != 1.0
    np.testing.assert_allclose(g[0].numpy(), np.clip(np.round(xf * f), 0, 255), atol=1)

    cfg = dataclasses.replace(cfg, color_jitter=(0.0, 0.4, 0.0, 0.0))
    aug = MultiCropAugment(cfg)
    g, _ = aug(x, 0, 0, 8)
    c = aug.batch_params(0, 0, [8], [28], [28]).factors[0, 1]
    mean = xf.mean()
    np.testing.assert_allclose(g[0].numpy(), np.clip(np.round(xf * c + mean * (1 - c)), 0, 255), atol=1)


def test_grayscale_saturation_hue_on_rgb(images):
    rgb = np.stack([images[9], images[10], images[11]])  # three different real images as R, G, B
    x = torch.from_numpy(rgb)
    cfg = DataConfig(**{**IDENTITY, "grayscale_p": 1.0}, channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    g, _ = MultiCropAugment(cfg)(x, 0, 0, 9)
    luma = (0.2989 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]).astype(np.uint8)  # torchvision truncates
    for view in g:
        assert torch.equal(view[0], view[1]) and torch.equal(view[1], view[2])
        np.testing.assert_allclose(view[0].numpy(), luma, atol=1)
    cfg = DataConfig(
        **{**IDENTITY, "color_jitter_p": 1.0, "color_jitter": (0.0, 0.0, 0.0, 0.5)},
        channels=3,
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
    )
    g, _ = MultiCropAugment(cfg)(x, 0, 0, 9)
    assert not torch.equal(g[0], x)
    gray = torch.from_numpy(np.repeat(images[9][None], 3, 0))  # hue leaves grey pixels alone
    g, _ = MultiCropAugment(cfg)(gray, 0, 0, 9)
    assert (g[0].int() - gray.int()).abs().max() <= 1


def test_blur_per_view_probability(images):
    x = _t(images[12])
    cfg = DataConfig(**{**IDENTITY, "blur_p": (1.0, 0.0, 0.0)}, blur_sigma=(8.0, 16.0))  # 1-2 px at 28 px
    g, _ = MultiCropAugment(cfg)(x, 0, 0, 12)
    assert torch.equal(g[1], x)  # global 2: p = 0
    assert not torch.equal(g[0], x)
    assert g[0].float().std() < x.float().std()  # smoother
    assert abs(g[0].float().mean() - x.float().mean()) < 2  # a normalised kernel keeps the mean
    flat = torch.full((1, 28, 28), 77, dtype=torch.uint8)
    assert torch.equal(MultiCropAugment(cfg)(flat, 0, 0, 0)[0][0], flat)


def test_clean_transform_resize_and_centre_crop(images):
    x = _t(images[13])
    assert torch.equal(clean_transform(x, 28), x)
    wide = torch.from_numpy(
        np.concatenate([images[14][:, :6], images[13], images[14][:, :6]], axis=1)
    ).unsqueeze(0)
    assert wide.shape == (1, 28, 40)
    assert torch.equal(clean_transform(wide, 28), x)  # shorter side already 28: centre columns 6..33
    small = clean_transform(x, 14)
    assert small.shape == (1, 14, 14) and small.dtype == torch.uint8
    assert torch.equal(small, clean_transform(x, 14))
    assert clean_transform(Image.fromarray(images[13]), 20, channels=3).shape == (3, 20, 20)


def test_decode_image(images):
    buf = io.BytesIO()
    Image.fromarray(images[15]).save(buf, format="PNG")
    png = buf.getvalue()
    assert torch.equal(decode_image(png, 1)[0], torch.from_numpy(images[15].copy()))
    assert decode_image(png, 3).shape == (3, 28, 28)
    assert decode_image(png[: len(png) // 2], 1) is None
    assert (
        decode_image(b"garbage", 1) is None and decode_image(b"", 1) is None and decode_image(None, 1) is None
    )


def test_input_conversions_and_bad_config(images):
    hw = images[16].copy()
    assert torch.equal(to_chw_uint8(hw), torch.from_numpy(hw).unsqueeze(0))
    assert to_chw_uint8(np.stack([hw] * 3, axis=-1)).shape == (3, 28, 28)
    assert to_chw_uint8(torch.from_numpy(hw), channels=3).shape == (3, 28, 28)
    with pytest.raises(ConfigError, match="data.blur_sigma"):
        MultiCropAugment(DataConfig(blur_sigma=(0.0, 1.0)))
    with pytest.raises(ConfigError, match="data.local_crop_scale"):
        MultiCropAugment(DataConfig(local_crop_scale=(0.5, 0.2)))
