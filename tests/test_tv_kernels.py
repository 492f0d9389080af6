"""``data.tv_kernels`` against torchvision itself, bit for bit: the map tasks' kernels without its import."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as F
from conftest import fresh_python
from PIL import Image
from torchvision.io import ImageReadMode
from torchvision.io import decode_image as tv_decode_image
from torchvision.ops import roi_align as tv_roi_align
from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv

from data import tv_kernels


def _images(channels: int, shape: tuple[int, int], n: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, channels, *shape), dtype=torch.uint8, generator=g)
    x[0, :, : shape[0] // 2] = 77  # flat patches: grey pixels, equal channels (the HSV edge cases)
    return x


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("shape", [(28, 28), (31, 17), (5, 40)])
def test_pixel_kernels_equal_torchvisions(channels, shape):
    x = _images(channels, shape)
    assert torch.equal(tv_kernels.horizontal_flip(x), F.horizontal_flip(x))
    for out in (1, 3):
        assert torch.equal(
            tv_kernels.rgb_to_grayscale(x, out), F.rgb_to_grayscale(x, num_output_channels=out)
        )
    for threshold in (0, 128, 255):
        assert torch.equal(tv_kernels.solarize(x, threshold), F.solarize(x, threshold=threshold))
    for size in (8, 28, 50):  # shrink, keep or grow the shorter side
        want = F.resize(x, size, antialias=True)
        got = tv_kernels.resize_shorter(x, size)
        assert got.shape == want.shape and torch.equal(got, want), (size, got.shape, want.shape)
        assert torch.equal(tv_kernels.resize_shorter(x[0], size), F.resize(x[0], size, antialias=True))
    for size in (4, 17, 30, 45):  # crops, and zero padding where the image is smaller
        assert torch.equal(tv_kernels.center_crop(x, size), F.center_crop(x, [size, size]))


def test_hsv_round_trip_equals_torchvisions():
    x = _images(3, (19, 23), n=4).to(torch.float32).div_(255.0)
    hsv = tv_kernels.rgb_to_hsv(x)
    assert torch.equal(hsv, _rgb_to_hsv(x))
    assert torch.equal(tv_kernels.hsv_to_rgb(hsv), _hsv_to_rgb(hsv))
    assert torch.allclose(tv_kernels.hsv_to_rgb(hsv), x, atol=1e-6)  # and it is a round trip
    assert torch.equal(tv_kernels.hsv_to_rgb(hsv[0]), _hsv_to_rgb(hsv[0]))  # one (3, H, W) image


def test_roi_align_equals_torchvisions():
    stack = _images(3, (28, 28), n=2).to(torch.float32)
    rois = torch.tensor([[0, 0.0, 0.0, 28.0, 28.0], [1, 3.5, 2.0, 20.0, 11.0], [0, 10.0, 12.0, 14.0, 27.5]])
    for size in (7, 28, 40):
        got = tv_kernels.roi_align(stack, rois, (size, size), 1.0, -1, True)
        want = tv_roi_align(stack, rois, (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        assert torch.equal(got, want)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_the_decoder_equals_torchvisions_and_refuses_what_it_refuses(fmt):
    rgb = np.asarray(_images(3, (24, 30), n=1)[0].permute(1, 2, 0))
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt)
    data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
    for mode, tv_mode in (
        (tv_kernels.READ_GRAY, ImageReadMode.GRAY),
        (tv_kernels.READ_RGB, ImageReadMode.RGB),
    ):
        assert torch.equal(tv_kernels.decode_image(data, mode), tv_decode_image(data, mode=tv_mode))
    with pytest.raises(RuntimeError):
        tv_kernels.decode_image(data[: len(data) // 3].clone(), tv_kernels.READ_RGB)


def test_a_map_tasks_imports_and_work_leave_torchvision_out():
    """What a map task's process imports and runs (decode, the multi-crop augmentation, the clean view)
    loads no torchvision and no ``torch._dynamo``: 2.5-3 s of CPU less per process."""
    code = (
        "import io, sys, numpy as np; from PIL import Image; import data.batch_maps; "
        "from data.augment import MultiCropAugment; from data.config import DataConfig; "
        "from data.images import clean_transform, decode_image; "
        "rgb = np.arange(30 * 26 * 3, dtype=np.uint8).reshape(30, 26, 3); "
        "b = io.BytesIO(); Image.fromarray(rgb).save(b, 'PNG'); img = decode_image(b.getvalue(), 3); "
        "cfg = DataConfig(channels=3, global_crop_size=28, local_crop_size=12, color_jitter_p=1.0, "
        "grayscale_p=0.5, solarize_p=1.0); "
        "g, loc = MultiCropAugment(cfg).augment_batch([img, img], 0, 0, [0, 1]); "
        "print(tuple(clean_transform(img, 20).shape), tuple(g.shape), tuple(loc.shape)); "
        "print(sorted(m for m in ('torchvision', 'torch._dynamo', 'sympy') if m in sys.modules))"
    )
    assert fresh_python(code)[-2:] == ["(3, 20, 20) (2, 2, 3, 28, 28) (2, 6, 3, 12, 12)", "[]"]
