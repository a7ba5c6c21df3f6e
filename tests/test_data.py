import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.engine.datasets import DatasetError, ImageDataset, fingerprint, split_validation, stratified_counts, stratified_sample
from core.engine.loader import BatchLoader, random_crop_flip
from core.engine.sources import load_digits, load_splits


def test_builtin_digits_needs_no_network():
    train, test = load_digits()
    assert train.images.shape[1:] == (1, 16, 16) and train.images.dtype == torch.uint8
    assert len(train) + len(test) == 1797 and len(test) == 359
    assert sorted(set(train.labels.tolist())) == list(range(10))
    assert train.images.max() == 255 and train.images.min() == 0


def test_validation_split_is_stratified_disjoint_and_seeded():
    splits = load_splits("digits", val_fraction=0.1, seed=3)
    train, val = splits.train, splits.val
    assert len(train) + len(val) == 1797 - 359
    for label in range(10):
        n_val, n_train = (val.labels == label).sum().item(), (train.labels == label).sum().item()
        assert n_val == round(0.1 * (n_val + n_train))
    again = load_splits("digits", val_fraction=0.1, seed=3)
    assert torch.equal(again.val.labels, val.labels) and again.split_fingerprint == splits.split_fingerprint
    other = load_splits("digits", val_fraction=0.1, seed=4)
    assert other.split_fingerprint != splits.split_fingerprint  # another split of the same data
    train_all, test = load_digits()
    assert other.fingerprint == splits.fingerprint == fingerprint(train_all, test)  # the data's, as the API shows it


def test_validation_split_partitions_the_training_data():
    n = 600
    ids = torch.arange(n)
    images = torch.zeros(n, 1, 2, 2, dtype=torch.uint8)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = (ids % 256).to(torch.uint8), (ids // 256).to(torch.uint8)
    data = ImageDataset(images, ids % 3, ["a", "b", "c"])
    train, val = split_validation(data, 0.2, seed=0)
    decode = lambda d: set((d.images[:, 0, 0, 0].long() + 256 * d.images[:, 0, 0, 1].long()).tolist())
    assert decode(train).isdisjoint(decode(val)) and decode(train) | decode(val) == set(range(n))
    assert len(val) == 120 and torch.bincount(val.labels).tolist() == [40, 40, 40]


def test_fingerprint_changes_with_any_pixel():
    train, _ = load_digits()
    changed = ImageDataset(train.images.clone(), train.labels, train.classes)
    changed.images[5, 0, 3, 3] ^= 1
    assert fingerprint(train) != fingerprint(changed)
    assert fingerprint(train) == fingerprint(ImageDataset(train.images.clone(), train.labels.clone(), list(train.classes)))


def naive_crop_flip(image, dy, dx, flip, padding):
    padded = F.pad(image, (padding,) * 4)
    _, h, w = image.shape
    crop = padded[:, dy : dy + h, dx : dx + w]
    return crop.flip(2) if flip else crop


def test_batched_crop_flip_equals_per_image_crop_flip():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 9, 7), dtype=torch.uint8, generator=g)
    out = random_crop_flip(images, 4, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    dy, dx = torch.randint(0, 9, (64,), generator=g), torch.randint(0, 9, (64,), generator=g)
    flip = torch.rand(64, generator=g) < 0.5
    expected = torch.stack([naive_crop_flip(images[i], dy[i], dx[i], flip[i], 4) for i in range(64)])
    assert torch.equal(out, expected)
    assert flip.any() and (~flip).any() and (dy != 4).any()


def test_training_batches_depend_only_on_seed_and_epoch():
    train, _ = load_digits()
    loader = BatchLoader(train, 100, train=True, seed=7)
    loader.set_epoch(3)
    first = [x for x, _ in loader]
    loader.set_epoch(4)
    other = [x for x, _ in loader]
    fresh = BatchLoader(train, 100, train=True, seed=7)
    fresh.set_epoch(3)
    assert all(torch.equal(a, b) for a, (b, _) in zip(first, fresh, strict=True))
    assert not torch.equal(first[0], other[0])
    assert len(first) == 15 and first[-1].shape[0] == len(train) - 1400  # last partial batch kept
    assert first[0].dtype == torch.float32 and first[0].min() >= 0 and first[0].max() <= 1


@pytest.mark.parametrize("train", [True, False])
def test_streaming_from_host_memory_gives_the_same_batches(train):
    """The path for datasets too large for the device: gathered ahead by threads, then copied."""
    data, _ = load_digits()
    on_device = BatchLoader(data, 100, train=train, seed=3, keep_on_device=True)
    streamed = BatchLoader(data, 100, train=train, seed=3, keep_on_device=False, workers=3, prefetch=2)
    for epoch in (0, 1):
        on_device.set_epoch(epoch)
        streamed.set_epoch(epoch)
        pairs = list(zip(on_device, streamed, strict=True))
        assert len(pairs) == 15
        for (x1, y1), (x2, y2) in pairs:
            assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_evaluation_batches_are_unaugmented_and_in_order():
    train, _ = load_digits()
    x, y = next(iter(BatchLoader(train, 10)))
    assert torch.equal(x, train.images[:10].float() / 255) and torch.equal(y, train.labels[:10])


def test_paper_protocol_trains_on_all_training_data_and_selects_on_the_test_set():
    train, test = load_digits()
    paper = load_splits("digits", selection="test")
    assert paper.selection == "test" and paper.val is paper.test
    assert torch.equal(paper.train.images, train.images) and torch.equal(paper.test.labels, test.labels)
    held_out = load_splits("digits", val_fraction=0.1)
    assert held_out.selection == "validation" and len(held_out.train) + len(held_out.val) == len(paper.train)
    assert paper.fingerprint == held_out.fingerprint and paper.split_fingerprint != held_out.split_fingerprint
    assert "paper protocol" in paper.protocol and "selected on the test set" in paper.protocol
    assert f"{len(held_out.val)} validation images held out" in held_out.protocol
    with pytest.raises(DatasetError, match="selection must be one of validation, test"):
        load_splits("digits", selection="train")


def test_cifar_offline_names_the_folder(tmp_path):
    with pytest.raises(DatasetError) as err:
        load_splits("cifar10", data_root=tmp_path, download=False)
    assert str(tmp_path / "cifar10") in str(err.value) and "cifar-10-batches-py" in str(err.value)


def test_unknown_dataset_is_named(tmp_path):
    with pytest.raises(DatasetError, match="no-such-thing"):
        load_splits(str(tmp_path / "no-such-thing.zip"))


def test_npz_file_through_load_splits(tmp_path):
    g = np.random.default_rng(0)
    path = tmp_path / "mine.npz"
    np.savez(
        path,
        x_train=g.integers(0, 256, (40, 12, 12, 3), dtype=np.uint8),
        y_train=np.arange(40) % 4,
        x_test=g.integers(0, 256, (8, 12, 12, 3), dtype=np.uint8),
        y_test=np.arange(8) % 4,
    )
    splits = load_splits(str(path), val_fraction=0.2)
    assert splits.input_shape == (3, 12, 12) and len(splits.classes) == 4
    assert len(splits.train) == 32 and len(splits.val) == 8 and len(splits.test) == 8


def test_tinyimagenet_standard_layout(tmp_path):
    from PIL import Image

    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n01443537", "n01629819"]
    (root).mkdir()
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    g = np.random.default_rng(0)
    for w in wnids:
        folder = root / "train" / w / "images"
        folder.mkdir(parents=True)
        for i in range(3):
            Image.fromarray(g.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"{w}_{i}.JPEG")
    (root / "val" / "images").mkdir(parents=True)
    lines = []
    for i, w in enumerate([wnids[1], wnids[0]]):
        Image.fromarray(g.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")

    splits = load_splits("tinyimagenet", data_root=tmp_path, val_fraction=0.34)
    assert splits.input_shape == (3, 64, 64) and splits.classes == wnids
    assert len(splits.train) + len(splits.val) == 6 and splits.test.labels.tolist() == [1, 0]


def test_tinyimagenet_missing_names_the_folder(tmp_path):
    with pytest.raises(DatasetError, match="tiny-imagenet-200"):
        load_splits("tinyimagenet", data_root=tmp_path)


def test_stratified_counts_give_every_class_its_share_and_each_class_at_least_one():
    assert stratified_counts([50, 50, 50, 50], 100) == [25, 25, 25, 25]
    assert stratified_counts([50, 50, 50, 50], 50) == [13, 13, 12, 12]
    assert stratified_counts([3, 100, 1], 10) == [1, 8, 1]  # the small classes are seen
    assert stratified_counts([0, 5, 5], 3) == [0, 2, 1]
    assert stratified_counts([10, 10], 25) == [10, 10]  # at most what there is
    assert stratified_counts([50, 50, 50, 50], 2) == [1, 1, 0, 0]  # fewer images than classes
    for sizes in ([7, 1, 90, 13], [200] * 10, [1] * 5):
        for n in range(0, sum(sizes) + 1, 7):
            counts = stratified_counts(sizes, n)
            assert sum(counts) == n and all(0 <= k <= s for k, s in zip(counts, sizes, strict=True))


def test_a_stratified_sample_is_seeded_sorted_and_drawn_within_each_class():
    labels = torch.arange(3).repeat_interleave(40)  # sorted by class, as a folder dataset's test split
    dataset = ImageDataset(torch.zeros(120, 1, 4, 4, dtype=torch.uint8), labels, ["a", "b", "c"])
    index = stratified_sample(dataset, 30, seed=5)
    assert torch.equal(index, index.sort().values) and torch.bincount(labels[index]).tolist() == [10, 10, 10]
    assert torch.equal(index, stratified_sample(dataset, 30, seed=5))
    assert not torch.equal(index[:10], torch.arange(10))  # not the first images of the class
    assert torch.equal(stratified_sample(dataset, 500, seed=5), torch.arange(120))
