"""k-NN and linear-probe evaluation: hand-computed votes, an independent DINO-style reference, real
Fashion-MNIST pixels, and a 2-process gloo run that must equal the single-process result."""

from __future__ import annotations

import gzip
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from trainers.evaluation.knn import (
    all_gather_variable,
    class_balanced_indices,
    extract_features,
    knn_classify,
    knn_evaluate,
    raw_pixel_baseline,
)
from trainers.evaluation.linear import linear_probe


def unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


# ---------------------------------------------------------------- hand-built toy bank
# Train bank on the unit circle: (angle in degrees, label).
BANK = [(10, 0), (20, 1), (30, 1), (90, 2), (180, 0)]
TRAIN_FEATS = torch.tensor([unit(a) for a, _ in BANK])
TRAIN_LABELS = torch.tensor([y for _, y in BANK])


def cosd(deg: float) -> float:
    return math.cos(math.radians(deg))


def test_knn_toy_hand_computed_votes():
    # Test point at 0 deg, true label 1. Neighbours by cosine: 10 (0), 20 (1), 30 (1), 90 (2), 180 (0).
    # Test point at 85 deg, true label 2. Neighbours: 90 (2, 5 deg), 30 (1, 55 deg), 20 (1, 65 deg), ...
    test_feats = torch.tensor([unit(0), unit(85)])
    test_labels = torch.tensor([1, 2])
    e = math.exp

    # k = 1: nearest label only -> predictions (0, 2): one of two right.
    assert knn_classify(TRAIN_FEATS, TRAIN_LABELS, test_feats, test_labels, 3, k=1)["top1"] == 50.0

    # k = 2, T = 0.07: point 0: class 0 e^(cos10/T) vs class 1 e^(cos20/T) -> 0 (wrong);
    # point 85: class 2 e^(cos5/T) vs class 1 e^(cos55/T) -> 2 (right).
    t = 0.07
    assert e(cosd(10) / t) > e(cosd(20) / t) and e(cosd(5) / t) > e(cosd(55) / t)
    assert (
        knn_classify(TRAIN_FEATS, TRAIN_LABELS, test_feats, test_labels, 3, k=2, temperature=t)["top1"]
        == 50.0
    )

    # k = 3, T = 0.07: point 0: class 0 = e^(cos10/T) = 1.29e6 beats class 1 = e^(cos20/T) + e^(cos30/T)
    # = 9.1e5 -> wrong. Point 85: class 2 = e^(cos5/T) = 1.5e6 beats class 1 = e^(cos55/T) + e^(cos65/T).
    votes0 = {0: e(cosd(10) / t), 1: e(cosd(20) / t) + e(cosd(30) / t)}
    votes85 = {2: e(cosd(5) / t), 1: e(cosd(55) / t) + e(cosd(65) / t)}
    assert max(votes0, key=votes0.get) == 0 and max(votes85, key=votes85.get) == 2
    res = knn_classify(TRAIN_FEATS, TRAIN_LABELS, test_feats, test_labels, 3, k=3, temperature=t)
    assert res["top1"] == 50.0
    # 3 classes, k = 3: the top-"5" list is every class, so it always contains the label.
    assert res["top5"] == 100.0


def test_knn_temperature_changes_the_vote():
    # Same k = 3 neighbours, T = 1: weights flatten, so two 'class 1' neighbours beat one 'class 0':
    # point 0: class 0 = e^cos10 = 2.68 < class 1 = e^cos20 + e^cos30 = 4.94 -> 1;
    # point 85: class 2 = e^cos5 = 2.71 < class 1 = e^cos55 + e^cos65 = 3.30 -> 1;
    # point 175 (neighbours 180 (0), 90 (2), 30 (1)): class 0 = e^cos5 wins at any T -> 0.
    e = math.exp
    assert e(cosd(10)) < e(cosd(20)) + e(cosd(30))
    assert e(cosd(5)) < e(cosd(55)) + e(cosd(65))
    assert e(cosd(5)) > max(e(cosd(85)), e(cosd(145)))
    test_feats = torch.tensor([unit(0), unit(85), unit(175)])
    test_labels = torch.tensor([1, 2, 0])
    # T = 0.07 predicts (0, 2, 0): 2 of 3 right; T = 1 predicts (1, 1, 0): 2 of 3 right, other ones.
    sharp = knn_classify(TRAIN_FEATS, TRAIN_LABELS, test_feats, test_labels, 3, k=3, temperature=0.07)
    flat = knn_classify(TRAIN_FEATS, TRAIN_LABELS, test_feats, test_labels, 3, k=3, temperature=1.0)
    assert sharp["top1"] == pytest.approx(200 / 3) and flat["top1"] == pytest.approx(200 / 3)
    for t, predicted in ((0.07, [0, 2, 0]), (1.0, [1, 1, 0])):
        res = knn_classify(
            TRAIN_FEATS, TRAIN_LABELS, test_feats, torch.tensor(predicted), 3, k=3, temperature=t
        )
        assert res["top1"] == 100.0


def test_knn_k_larger_than_bank_is_clipped():
    test_feats = torch.tensor([unit(0), unit(85), unit(200)])
    test_labels = torch.tensor([0, 2, 0])
    full = knn_classify(TRAIN_FEATS, TRAIN_LABELS, test_feats, test_labels, 3, k=len(BANK), temperature=0.5)
    huge = knn_classify(TRAIN_FEATS, TRAIN_LABELS, test_feats, test_labels, 3, k=1000, temperature=0.5)
    assert huge == full
    # The whole bank votes, weights e^(cos / 0.5) = e^(2 cos). Votes per class, by angle difference:
    e = math.exp
    votes = {
        0: {0: e(2 * cosd(10)) + e(2 * cosd(180)), 1: e(2 * cosd(20)) + e(2 * cosd(30)), 2: e(2 * cosd(90))},
        85: {0: e(2 * cosd(75)) + e(2 * cosd(95)), 1: e(2 * cosd(65)) + e(2 * cosd(55)), 2: e(2 * cosd(5))},
        200: {
            0: e(2 * cosd(190)) + e(2 * cosd(20)),
            1: e(2 * cosd(180)) + e(2 * cosd(170)),
            2: e(2 * cosd(110)),
        },
    }
    predictions = [max(v, key=v.get) for v in votes.values()]
    assert predictions == [1, 2, 0]  # 0 deg: two class-1 neighbours outweigh the nearest class-0 one
    assert full["top1"] == pytest.approx(200 / 3)


def dino_reference(train_feats, train_labels, test_feats, test_labels, num_classes, k, t):
    """Independent transcription of DINO's ``knn_classifier`` (one-hot votes, full sort), in float64;
    one deliberate difference: a class with no vote never counts as a hit (DINO's sort ranks such
    classes arbitrarily)."""
    k = min(k, train_feats.shape[0])
    sim = test_feats.double() @ train_feats.double().t()
    dist_k, idx = sim.topk(k, dim=1)
    one_hot = torch.zeros(test_feats.shape[0] * k, num_classes, dtype=torch.float64)
    one_hot.scatter_(1, train_labels[idx].view(-1, 1), 1)
    probs = (one_hot.view(test_feats.shape[0], k, num_classes) * (dist_k / t).exp().unsqueeze(-1)).sum(1)
    preds = probs.argsort(1, descending=True)
    correct = (preds == test_labels[:, None]) & (probs.gather(1, preds) > 0)
    n = test_feats.shape[0]
    return 100 * correct[:, :1].sum().item() / n, 100 * correct[:, : min(5, k)].sum().item() / n


def random_problem(seed: int, n_train: int, n_test: int, dim: int = 16, num_classes: int = 10):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=g)
    ytr = torch.randint(0, num_classes, (n_train,), generator=g)
    yte = torch.randint(0, num_classes, (n_test,), generator=g)
    xtr = F.normalize(centres[ytr] + 1.5 * torch.randn(n_train, dim, generator=g), dim=1)
    xte = F.normalize(centres[yte] + 1.5 * torch.randn(n_test, dim, generator=g), dim=1)
    return xtr, ytr, xte, yte


#: The published protocols ``(k, temperature)``: DINO's (used by BAM) and InstDisc's (lightly's tables).
DINO_KNN, INSTDISC_KNN = (20, 0.07), (200, 0.1)


@pytest.mark.parametrize("k, t", [DINO_KNN, INSTDISC_KNN], ids=["dino", "instdisc"])
def test_knn_matches_dino_reference_and_chunking(k, t):
    xtr, ytr, xte, yte = random_problem(0, 600, 300)
    ref1, ref5 = dino_reference(xtr, ytr, xte, yte, 10, k, t)
    res = knn_classify(xtr, ytr, xte, yte, 10, k=k, temperature=t, chunk=64)
    assert res["top1"] == pytest.approx(ref1) and res["top5"] == pytest.approx(ref5)
    assert knn_classify(xtr, ytr, xte, yte, 10, k=k, temperature=t, chunk=7) == res
    assert res["top5"] >= res["top1"]
    assert 30 < res["top1"] < 100  # informative features: far above chance (10 %)


def test_knn_rejects_bad_arguments():
    with pytest.raises(ValueError, match="k:"):
        knn_classify(TRAIN_FEATS, TRAIN_LABELS, TRAIN_FEATS, TRAIN_LABELS, 3, k=0)
    with pytest.raises(ValueError, match="temperature"):
        knn_classify(TRAIN_FEATS, TRAIN_LABELS, TRAIN_FEATS, TRAIN_LABELS, 3, temperature=0.0)
    with pytest.raises(ValueError, match="same D"):
        knn_classify(TRAIN_FEATS, TRAIN_LABELS, torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), 3)


def test_class_balanced_indices():
    labels = np.repeat(np.arange(4), [10, 20, 30, 40])
    idx = class_balanced_indices(labels, 0.5, seed=1)
    assert np.bincount(labels[idx]).tolist() == [5, 10, 15, 20]
    assert np.all(np.diff(idx) > 0)  # sorted, no repeats
    np.testing.assert_array_equal(idx, class_balanced_indices(labels, 0.5, seed=1))  # same bank on every rank
    np.testing.assert_array_equal(idx, class_balanced_indices(torch.from_numpy(labels), 0.5, seed=1))
    assert not np.array_equal(idx, class_balanced_indices(labels, 0.5, seed=2))  # the seed matters
    np.testing.assert_array_equal(class_balanced_indices(labels, 1.0), np.arange(100))
    assert class_balanced_indices(np.repeat(np.arange(3), 4), 0.01).size == 3  # at least one per class
    with pytest.raises(ValueError, match="fraction"):
        class_balanced_indices(labels, 0.0)


def test_class_balanced_indices_per_class_generator():
    """Each class draws from ``default_rng([seed, class])``: its members do not depend on the other
    classes (a bank restricted to ``train_limit`` rows keeps each class's draw reproducible)."""
    labels = np.array([0, 1, 0, 1, 0, 1, 0, 1, 2, 2, 2, 2])
    idx = class_balanced_indices(labels, 0.5, seed=7)
    expected = np.random.default_rng([7, 1]).choice(np.flatnonzero(labels == 1), size=2, replace=False)
    np.testing.assert_array_equal(np.sort(expected), idx[labels[idx] == 1])


# ---------------------------------------------------------------- feature extraction
def test_extract_features_eval_mode_normalised_and_restores_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.BatchNorm1d(8), nn.Dropout(0.5))
    model.train()
    running_mean = model[2].running_mean.clone()
    images = torch.randn(10, 3, 2, 2)
    labels = torch.arange(10)
    batches = [(images[:4], labels[:4]), (images[4:], labels[4:])]
    feats, out_labels = extract_features(model, batches, "cpu")
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(model[2].running_mean, running_mean)  # eval mode: BN statistics untouched
    assert feats.shape == (10, 8) and feats.dtype == torch.float32 and not feats.requires_grad
    assert torch.allclose(feats.norm(dim=1), torch.ones(10), atol=1e-6)
    model.eval()
    with torch.no_grad():
        expected = F.normalize(model(images), dim=1)  # no dropout, running statistics
    assert torch.allclose(feats, expected, atol=1e-6)
    assert torch.equal(out_labels, labels)


# ---------------------------------------------------------------- real data
def read_idx(path: Path, n: int, images: bool) -> np.ndarray:
    header = 16 if images else 8
    with gzip.open(path) as f:
        raw = f.read(header + n * (784 if images else 1))
    arr = np.frombuffer(raw, np.uint8, offset=header)
    return arr.reshape(n, 28, 28) if images else arr.astype(np.int64)


@pytest.fixture(scope="module")
def fmnist_small(fmnist_src):
    return (
        read_idx(fmnist_src / "train-images-idx3-ubyte.gz", 2000, True),
        read_idx(fmnist_src / "train-labels-idx1-ubyte.gz", 2000, False),
        read_idx(fmnist_src / "t10k-images-idx3-ubyte.gz", 500, True),
        read_idx(fmnist_src / "t10k-labels-idx1-ubyte.gz", 500, False),
    )


def test_raw_pixel_knn_on_fashion_mnist(fmnist_small):
    """Raw pixels are the floor every learned representation must beat (bench/README.md has the figures
    for full banks); a 2k bank and 500 test images land a little below the 60k-bank figure."""
    xtr, ytr, xte, yte = fmnist_small
    top1 = raw_pixel_baseline(xtr, ytr, xte, yte, k=20, temperature=0.07)
    assert 70.0 < top1 < 85.0


def test_linear_probe_separable_toy_reaches_100():
    g = torch.Generator().manual_seed(0)
    centres = 6 * torch.eye(4, 32)
    ytr = torch.randint(0, 4, (400,), generator=g)
    yva = torch.randint(0, 4, (200,), generator=g)
    xtr = centres[ytr] + torch.randn(400, 32, generator=g)
    xva = centres[yva] + torch.randn(200, 32, generator=g)
    res = linear_probe(xtr, ytr, xva, yva, 4, epochs=5, lr=0.1, batch_size=64)
    assert res["top1"] == 100.0
    assert len(res["history"]) == 5 and res["final_top1"] == res["history"][-1]["val_top1"]
    assert res["history"][-1]["loss"] < res["history"][0]["loss"]
    assert res["history"][-1]["lr"] < 0.1 * 0.2  # cosine decay reached the tail


def test_linear_probe_fashion_mnist_pixels_and_determinism(fmnist_small):
    xtr, ytr, xte, yte = fmnist_small
    x_train = torch.from_numpy(xtr.reshape(2000, -1).astype(np.float32) / 255)
    x_val = torch.from_numpy(xte.reshape(500, -1).astype(np.float32) / 255)
    y_train, y_val = torch.from_numpy(ytr), torch.from_numpy(yte)
    rng_state = torch.get_rng_state()
    a = linear_probe(x_train, y_train, x_val, y_val, 10, epochs=10, lr=0.1, seed=3)
    assert torch.equal(torch.get_rng_state(), rng_state)  # the global RNG is left alone
    b = linear_probe(x_train, y_train, x_val, y_val, 10, epochs=10, lr=0.1, seed=3)
    assert a == b
    assert a["top1"] > 75.0
    assert a["top1"] == max(h["val_top1"] for h in a["history"]) >= a["final_top1"]


def test_linear_probe_handles_trailing_single_row_and_rejects_bad_args():
    x = torch.randn(257, 8)
    y = (x[:, 0] > 0).long()
    assert linear_probe(x, y, x, y, 2, epochs=1, batch_size=256)["top1"] > 50.0  # 257 = 256 + 1: no BN crash
    with pytest.raises(ValueError, match="epochs"):
        linear_probe(x, y, x, y, 2, epochs=0)


# ---------------------------------------------------------------- distributed
def _knn_worker(
    rank: int, world: int, init_file: str, shards: list, num_classes: int, k: int, t: float, out_dir: str
) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        xtr, ytr, xte, yte = shards[rank]
        res = knn_evaluate(xtr, ytr, xte, yte, num_classes, k=k, temperature=t, chunk=16)
        gathered = all_gather_variable(xtr)
        torch.save({"res": res, "gathered": gathered}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    # Skip interpreter teardown: after an autograd all_gather, torch 2.14's static destructors may abort
    # ("terminate called without an active exception"), which would fail a correct run at random.
    # Results are already saved; a failure above still raises and exits non-zero.
    os._exit(0)


def test_knn_evaluate_two_gloo_processes_equal_single_process(tmp_path):
    xtr, ytr, xte, yte = random_problem(1, 500, 150)
    # Unequal shards (as a DistributedSampler without padding gives): 300 / 200 train, 97 / 53 test.
    shards = [(xtr[:300], ytr[:300], xte[:97], yte[:97]), (xtr[300:], ytr[300:], xte[97:], yte[97:])]
    k, t = DINO_KNN
    mp.spawn(_knn_worker, args=(2, str(tmp_path / "init"), shards, 10, k, t, str(tmp_path)), nprocs=2)
    single = knn_classify(xtr, ytr, xte, yte, 10, k=k, temperature=t)
    # each test shard alone scores differently, so only a correct all-reduce can reproduce `single`
    assert knn_classify(xtr, ytr, xte[:97], yte[:97], 10, k=k, temperature=t)["top1"] != single["top1"]
    assert knn_classify(xtr, ytr, xte[97:], yte[97:], 10, k=k, temperature=t)["top1"] != single["top1"]
    # and a bank without the other rank's shard scores differently: the gather matters
    assert knn_classify(xtr[:300], ytr[:300], xte, yte, 10, k=k, temperature=t) != single
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.equal(out["gathered"], xtr)  # padded gather trimmed back, in rank order
        assert out["res"] == pytest.approx(single, abs=1e-9)
    # and the single-process path of knn_evaluate is knn_classify
    assert knn_evaluate(xtr, ytr, xte, yte, 10, k=k, temperature=t) == single
