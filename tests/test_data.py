"""qnwb.data: IDX / MNIST / CIFAR-10 readers on files written here, corpora, CURVES, bouncing balls, pixel MNIST."""

import ast
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import qnwb.data as data
from qnwb.core import make_generator
from qnwb.data import (
    BOX,
    CIFAR10_FILES,
    MNIST_FILES,
    CharCorpus,
    WordCorpus,
    ball_trajectories,
    bouncing_balls,
    bouncing_balls_figure,
    curves_dataset,
    curves_figure,
    default_corpus,
    load_cifar10,
    load_mnist,
    make_curves,
    next_frame_batch,
    pixel_sequences,
    read_idx,
    render_balls,
    write_cifar10_batch,
    write_idx,
)
from qnwb.losses import matching_loss

# ---------------------------------------------------------------------------------------------
# IDX


def _sample(dtype, shape, seed=0):
    g = make_generator(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g, dtype=dtype) * 1e3
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64).to(dtype)


@pytest.mark.parametrize(
    "dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.float32, torch.float64]
)
@pytest.mark.parametrize("shape", [(7,), (3, 4), (2, 3, 5), (1, 2, 1, 3), (0, 4)])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, dtype, shape, suffix):
    t = _sample(dtype, shape)
    path = write_idx(tmp_path / f"x.idx{suffix}", t)
    back = read_idx(path)
    assert back.dtype == dtype and back.shape == shape
    assert torch.equal(back, t)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == (suffix == ".gz")


def test_idx_bytes_are_big_endian(tmp_path):
    raw = write_idx(tmp_path / "a", torch.tensor([[1, -2]], dtype=torch.int16)).read_bytes()
    assert raw == bytes([0, 0, 0x0B, 2, 0, 0, 0, 1, 0, 0, 0, 2, 0x00, 0x01, 0xFF, 0xFE])
    assert read_idx(tmp_path / "a", dtype=torch.float64).dtype == torch.float64


def test_idx_gzip_detected_by_content(tmp_path):
    """A gzipped file read under a name without .gz (and the other way round)."""
    t = torch.arange(12, dtype=torch.uint8).view(3, 4)
    write_idx(tmp_path / "a.gz", t).rename(tmp_path / "plain-name")
    assert torch.equal(read_idx(tmp_path / "plain-name"), t)


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"\x01\x00\x08\x01\x00\x00\x00\x01\x05", "not an IDX file"),
        (b"", "not an IDX file"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x01\x05", "unknown IDX type code 0x07"),
        (b"\x00\x00\x08\x02\x00\x00\x00\x01", "truncated header"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x03\x05", "truncated"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x01\x05\x06", "trailing bytes"),
    ],
)
def test_idx_bad_files(tmp_path, raw, message):
    (tmp_path / "bad").write_bytes(raw)
    with pytest.raises(ValueError, match=message):
        read_idx(tmp_path / "bad")


def test_idx_bad_gzip(tmp_path):
    (tmp_path / "bad.gz").write_bytes(b"\x1f\x8b" + b"not really gzip")
    with pytest.raises(ValueError, match="cannot be decompressed"):
        read_idx(tmp_path / "bad.gz")


@pytest.mark.parametrize(
    "value", [torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.bool), [1, 2]]
)
def test_write_idx_rejects_other_types(tmp_path, value):
    with pytest.raises(TypeError, match="tensor:"):
        write_idx(tmp_path / "x", value)


# ---------------------------------------------------------------------------------------------
# MNIST


def _write_mnist(root, split, n, gz=True, seed=0):
    g = make_generator(seed)
    images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.int64).to(torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=g, dtype=torch.int64).to(torch.uint8)
    suffix = ".gz" if gz else ""
    write_idx(Path(root) / (MNIST_FILES[split][0] + suffix), images)
    write_idx(Path(root) / (MNIST_FILES[split][1] + suffix), labels)
    return images, labels


@pytest.mark.parametrize("split, gz", [("train", True), ("test", False)])
def test_load_mnist(tmp_path, split, gz, device):
    images, labels = _write_mnist(tmp_path, split, 5, gz)
    x, y = load_mnist(tmp_path, split, device=device)
    assert x.shape == (5, 28, 28) and x.dtype == torch.float32 and x.device.type == device.type
    assert y.dtype == torch.int64 and y.device.type == device.type
    assert torch.equal(y.cpu(), labels.long())
    assert torch.allclose(x.cpu(), images.float() / 255)
    assert 0 <= x.min() and x.max() <= 1


def test_load_mnist_names_the_missing_files(tmp_path):
    root = tmp_path / "mnist"
    root.mkdir()
    write_idx(root / "train-labels-idx1-ubyte.gz", torch.zeros(2, dtype=torch.uint8))
    with pytest.raises(FileNotFoundError) as info:
        load_mnist(root, "train")
    message = str(info.value)
    assert "train-images-idx3-ubyte" in message and str(root.resolve()) in message
    assert "never downloads" in message
    assert "t10k-images-idx3-ubyte" in message  # where the whole set goes
    with pytest.raises(
        FileNotFoundError, match="t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte"
    ):
        load_mnist(tmp_path / "nowhere", "test")


def test_load_mnist_checks_contents(tmp_path):
    _write_mnist(tmp_path, "test", 3)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", torch.zeros(4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="expected 3 uint8 labels"):
        load_mnist(tmp_path, "test")
    with pytest.raises(ValueError, match="split: must be one of 'train', 'test'"):
        load_mnist(tmp_path, "valid")


# ---------------------------------------------------------------------------------------------
# CIFAR-10


def test_cifar10_round_trip(tmp_path, device):
    g = make_generator(1)
    parts = [
        torch.randint(0, 256, (2, 3, 32, 32), generator=g, dtype=torch.int64).to(torch.uint8)
        for _ in range(5)
    ]
    labels = [[i, (i + 3) % 10] for i in range(5)]
    for name, images, y in zip(CIFAR10_FILES["train"], parts, labels):
        write_cifar10_batch(tmp_path / name, images, y)
    x, y = load_cifar10(tmp_path, "train", device=device)
    assert x.shape == (10, 3, 32, 32) and x.device.type == device.type and y.dtype == torch.int64
    assert torch.equal((x.cpu() * 255).round().to(torch.uint8), torch.cat(parts))
    assert y.tolist() == sum(labels, [])


def test_cifar10_layout_is_row_major_channel_first(tmp_path):
    """Row n of b'data' is red plane, green plane, blue plane, each 32 × 32 row-major."""
    flat = torch.zeros(1, 3072, dtype=torch.uint8)
    flat[0, 1024 * 2 + 32 * 5 + 7] = 255  # blue, row 5, column 7
    write_cifar10_batch(tmp_path / "test_batch", flat, [9])
    with open(tmp_path / "test_batch", "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    assert (
        set(batch) >= {b"data", b"labels"}
        and batch[b"data"].shape == (1, 3072)
        and batch[b"labels"] == [9]
    )
    x, y = load_cifar10(tmp_path, "test")
    assert x[0, 2, 5, 7] == 1 and x.sum() == 1 and y.tolist() == [9]


def test_cifar10_missing_files(tmp_path):
    write_cifar10_batch(tmp_path / "data_batch_1", np.zeros((1, 3072), np.uint8), [0])
    with pytest.raises(FileNotFoundError) as info:
        load_cifar10(tmp_path, "train")
    message = str(info.value)
    assert "data_batch_2, data_batch_3, data_batch_4, data_batch_5 not found" in message
    assert str(tmp_path.resolve()) in message and "test_batch" in message


def test_cifar10_refuses_code_in_pickles(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f, protocol=2)
    with pytest.raises(ValueError, match="refusing to load (__builtin__|builtins).print"):
        load_cifar10(tmp_path, "test")


def test_write_cifar10_batch_checks(tmp_path):
    with pytest.raises(TypeError, match="images: expected uint8"):
        write_cifar10_batch(tmp_path / "b", np.zeros((1, 3072), np.float32), [0])
    with pytest.raises(ValueError, match="labels: expected 1 ints in 0..9"):
        write_cifar10_batch(tmp_path / "b", np.zeros((1, 3072), np.uint8), [10])


# ---------------------------------------------------------------------------------------------
# Character corpora

TEXT = "the quick brown fox jumps over the lazy dog. " * 20


def test_char_corpus_vocabulary_and_split():
    corpus = CharCorpus(TEXT, validation=0.25)
    assert corpus.vocabulary == sorted(set(TEXT)) and corpus.n_in == corpus.n_out == len(set(TEXT))
    assert len(corpus.train) + len(corpus.valid) == len(TEXT)
    assert len(corpus.valid) == round(0.25 * len(TEXT))
    assert (
        corpus.decode(corpus.train) + corpus.decode(corpus.valid) == TEXT
    )  # the validation split is the tail
    assert corpus.decode(corpus.encode("lazy fox")) == "lazy fox"
    with pytest.raises(ValueError, match="not in the vocabulary: 'XZ'"):
        corpus.encode("Zebra X")


def test_char_corpus_batch_is_shifted_by_one(device):
    corpus = CharCorpus(TEXT, validation=0.2)
    V = len(corpus.vocabulary)
    x, y = corpus.batch(
        16, length=12, generator=make_generator(0), device=device, dtype=torch.float64
    )
    assert x.shape == y.shape == (16, 12, V) and x.dtype == y.dtype == torch.float64
    assert x.device.type == y.device.type == device.type
    assert torch.equal(
        x.sum(-1), torch.ones(16, 12, dtype=torch.float64, device=device)
    )  # one-hot rows
    assert torch.equal(x.argmax(-1)[:, 1:], y.argmax(-1)[:, :-1])
    for i in range(16):  # every window is a piece of the training text
        window = corpus.decode(x[i].cpu()) + corpus.decode(y[i, -1:].cpu())
        assert window in TEXT[: len(corpus.train)]


def test_char_corpus_seeds():
    corpus = CharCorpus(TEXT)
    a, b, c = (corpus.batch(8, 10, generator=s) for s in (make_generator(3), 3, 4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_char_corpus_index_targets_match_the_softmax_loss():
    corpus = CharCorpus(TEXT)
    x, onehot = corpus.batch(4, 9, generator=0)
    _, index = corpus.batch(4, 9, generator=0, one_hot_targets=False)
    assert index.dtype == torch.int64 and torch.equal(index, onehot.argmax(-1))
    z = torch.randn(4, 9, corpus.n_out, generator=make_generator(1))
    loss = matching_loss("softmax_cross_entropy")
    assert torch.allclose(loss(z, index), loss(z, onehot))


def test_char_corpus_epoch_covers_every_window_once():
    corpus = CharCorpus(TEXT, validation=0.3)
    length = 7
    count = corpus.windows(length, "validation")
    assert count == (len(corpus.valid) - 1) // length
    batches = list(
        corpus.epoch(5, length, "validation", one_hot_inputs=False, one_hot_targets=False)
    )
    assert [len(x) for x, _ in batches] == [5] * (count // 5) + ([count % 5] if count % 5 else [])
    inputs = torch.cat([x for x, _ in batches])
    assert torch.equal(
        inputs.flatten(), corpus.valid[: count * length]
    )  # in text order, back to back
    shuffled = torch.cat(
        [x for x, _ in corpus.epoch(5, length, "validation", shuffle=0, one_hot_inputs=False)]
    )
    assert not torch.equal(shuffled, inputs)
    assert sorted(map(tuple, shuffled.tolist())) == sorted(map(tuple, inputs.tolist()))


def test_char_corpus_errors(tmp_path):
    corpus = CharCorpus("abcdefgh", validation=0.25)
    with pytest.raises(
        ValueError,
        match="length: windows of length \\+ 1 = 3 characters do not fit in the validation split",
    ):
        corpus.batch(1, length=2, split="validation")
    with pytest.raises(ValueError, match="split: must be one of 'train', 'validation'"):
        corpus.batch(1, length=2, split="test")
    with pytest.raises(ValueError, match="cases: must be a positive int"):
        corpus.batch(0)
    with pytest.raises(TypeError, match="dtype: expected a floating-point"):
        corpus.batch(1, 2, dtype=torch.int32)
    with pytest.raises(TypeError, match="generator: expected a torch.Generator"):
        corpus.batch(1, 2, generator="seed")
    with pytest.raises(ValueError, match="validation: must be in \\[0, 1\\)"):
        CharCorpus("abc", validation=1.0)
    with pytest.raises(TypeError, match="text: expected a str"):
        CharCorpus(b"abc")
    (tmp_path / "t.txt").write_text("héllo wörld\n", encoding="utf-8")
    assert CharCorpus.from_file(tmp_path / "t.txt", validation=0).decode(range(3)) == "\n d"


def test_default_corpus():
    corpus = default_corpus()
    assert len(corpus.train) + len(corpus.valid) > 100_000
    assert len(corpus.vocabulary) > 60 and "e" in corpus.vocabulary
    x, y = corpus.batch(3, generator=0)
    assert x.shape == y.shape == (3, 50, len(corpus.vocabulary))
    x, y = corpus.batch(2, split="validation", generator=0, one_hot_inputs=False)
    assert x.shape == (2, 50) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y.argmax(-1)[:, :-1])


# ---------------------------------------------------------------------------------------------
# Word corpora


def test_word_corpus_unk_and_cap():
    text = "a a a a b b b c c d e\n" * 2
    corpus = WordCorpus(text, max_vocabulary=3, validation=0)
    assert corpus.vocabulary == ["<unk>", "a", "b"]  # capped: unk plus the two most frequent words
    assert (
        corpus.decode(corpus.train).split()[:11] == "a a a a b b b <unk> <unk> <unk> <unk>".split()
    )
    assert corpus.unknown_rate() == pytest.approx(8 / 22)
    assert corpus.encode("b zebra a").tolist() == [2, 0, 1]
    roomy = WordCorpus(text, max_vocabulary=100, validation=0)
    assert roomy.vocabulary == ["<unk>", "a", "b", "c", "d", "e"]  # by frequency, ties alphabetical
    assert roomy.unknown_rate() == 0


def test_word_corpus_existing_unk_counts_as_that_word():
    corpus = WordCorpus("<unk> <unk> <unk> x y y", max_vocabulary=2, validation=0)
    assert corpus.vocabulary == ["<unk>", "y"]
    assert corpus.train.tolist() == [0, 0, 0, 0, 1, 1]


def test_word_corpus_vocabulary_from_training_only():
    corpus = WordCorpus("one two three four five six seven eight nine ten", validation=0.2)
    assert (
        corpus.decode(corpus.valid) == "<unk> <unk>"
    )  # nine and ten appear only in the validation tail
    assert "nine" not in corpus.vocabulary and len(corpus.train) == 8


def test_word_corpus_from_files_and_eos(tmp_path, device):
    (tmp_path / "train.txt").write_text(" the cat sat \n the dog sat \n", encoding="utf-8")
    (tmp_path / "valid.txt").write_text(" the cow sat \n", encoding="utf-8")
    corpus = WordCorpus.from_files(tmp_path / "train.txt", tmp_path / "valid.txt", eos="<eos>")
    assert len(corpus.train) == 8 and corpus.decode(corpus.valid) == "the <unk> sat <eos>"
    assert corpus.vocabulary[:4] == ["<unk>", "<eos>", "sat", "the"]
    x, y = corpus.batch(3, length=4, generator=0, device=device)
    assert x.shape == y.shape == (3, 4, len(corpus.vocabulary)) and x.device.type == device.type
    xi, yi = corpus.batch(
        3, length=4, generator=0, device=device, one_hot_inputs=False, one_hot_targets=False
    )
    assert xi.dtype == yi.dtype == torch.int64 and xi.shape == (3, 4)
    assert (
        torch.equal(xi, x.argmax(-1))
        and torch.equal(yi, y.argmax(-1))
        and torch.equal(xi[:, 1:], yi[:, :-1])
    )
    without = WordCorpus.from_files(tmp_path / "train.txt", validation=0.5)
    assert "<eos>" not in without.vocabulary and len(without.train) == len(without.valid) == 3


def test_word_corpus_errors():
    with pytest.raises(ValueError, match="max_vocabulary: must be at least 2"):
        WordCorpus("a b c", max_vocabulary=1)
    with pytest.raises(TypeError, match="max_vocabulary: expected an int"):
        WordCorpus("a b c", max_vocabulary=2.5)
    with pytest.raises(ValueError, match="eos: expected one whitespace-free token"):
        WordCorpus("a b c", eos="end of line")
    with pytest.raises(ValueError, match="text: the training split needs at least two words"):
        WordCorpus("a", validation=0)


# ---------------------------------------------------------------------------------------------
# Pixel-by-pixel MNIST


def test_pixel_sequences_layout(device):
    images = torch.rand(3, 28, 28, generator=make_generator(0))
    labels = torch.tensor([0, 9, 4])
    x, y = pixel_sequences(images, labels, device=device)
    assert x.shape == (3, 784, 1) and y.shape == (3, 784, 10) and x.device.type == device.type
    assert torch.equal(x[..., 0].cpu(), images.reshape(3, 784))
    assert x[1, 28 * 3 + 20, 0].item() == images[1, 3, 20].item()  # scan lines
    assert torch.isnan(y[:, :-1]).all()
    assert torch.equal(y[:, -1].cpu(), torch.nn.functional.one_hot(labels, 10).float())
    loss = matching_loss("softmax_cross_entropy")(torch.zeros(3, 784, 10, device=device), y)
    assert torch.isclose(loss.cpu(), torch.tensor(math.log(10)))  # only the last step counts


def test_pixel_sequences_permutation_and_errors():
    images = torch.rand(2, 16, generator=make_generator(1), dtype=torch.float64)
    order = torch.randperm(16, generator=make_generator(2))
    x, y = pixel_sequences(images, torch.tensor([1, 2]), classes=3, permutation=order)
    assert (
        x.dtype == torch.float64
        and torch.equal(x[..., 0], images[:, order])
        and y.shape == (2, 16, 3)
    )
    with pytest.raises(ValueError, match="permutation: expected a permutation of 0..15"):
        pixel_sequences(images, torch.tensor([1, 2]), permutation=torch.zeros(16, dtype=torch.long))
    with pytest.raises(ValueError, match="labels: must be in 0..2"):
        pixel_sequences(images, torch.tensor([1, 3]), classes=3)
    with pytest.raises(TypeError, match="images: expected a floating-point tensor"):
        pixel_sequences(images.long(), torch.tensor([1, 2]))


# ---------------------------------------------------------------------------------------------
# CURVES


def test_make_curves_shapes_range_and_seeds():
    curves = make_curves(50, make_generator(0))
    assert curves.shape == (50, 28, 28) and curves.dtype == torch.float32
    assert curves.min() >= 0 and curves.max() <= 1
    assert (curves.amax((1, 2)) > 0.8).all()  # every image has a stroke ...
    inked = (curves > 0.5).sum((1, 2))
    assert (inked >= 15).all() and (inked < 28 * 28 / 2).all()  # ... and is mostly background
    assert (curves == 0).float().mean() > 0.5
    assert torch.equal(curves, make_curves(50, 0))
    assert not torch.equal(curves, make_curves(50, 1))
    assert torch.equal(make_curves(50, 0, dtype=torch.float64), curves.double())


def test_make_curves_options(device):
    small = make_curves(4, 0, size=16, points=5, width=0.6, device=device)
    assert small.shape == (4, 16, 16) and small.device.type == device.type
    assert torch.equal(
        small.cpu(), make_curves(4, 0, size=16, points=5, width=0.6)
    )  # same data on every device
    line = make_curves(1, 0, points=2)  # two points: a straight stroke
    assert line.max() > 0.8
    with pytest.raises(ValueError, match="points: at most"):
        make_curves(1, 0, points=20)
    with pytest.raises(ValueError, match="width: must be a positive number"):
        make_curves(1, 0, width=0)
    with pytest.raises(ValueError, match="size: must be at least 8"):
        make_curves(1, 0, size=4)


def test_spline_passes_through_its_points_smoothly():
    x = torch.tensor([[2.0, 9.0, 15.0, 26.0]], dtype=torch.float64)
    y = torch.tensor([[5.0, 20.0, 3.0, 12.0]], dtype=torch.float64)
    samples = 2000
    curve = data._spline_points(x, y, samples=samples)[0]
    assert torch.allclose(curve[::samples], torch.stack([x[0], y[0]], -1))  # through every knot
    assert data._natural_spline_moments(x, y)[0, [0, -1]].eq(0).all()  # natural end conditions
    for knot in (1, 2):  # slopes agree on both sides of an inner knot (C¹)
        i = knot * samples
        left = (curve[i, 1] - curve[i - 1, 1]) / (curve[i, 0] - curve[i - 1, 0])
        right = (curve[i + 1, 1] - curve[i, 1]) / (curve[i + 1, 0] - curve[i, 0])
        assert left == pytest.approx(right.item(), abs=0.05)


def test_curves_dataset_caches(tmp_path, monkeypatch):
    train, test = curves_dataset(tmp_path, train=40, test=12, seed=5)
    assert train.shape == (40, 784) and test.shape == (12, 784)
    assert torch.equal((train * 255).round() / 255, train)  # 8-bit grey levels
    files = list(tmp_path.glob("*.pt"))
    assert [f.name for f in files] == ["curves-28px-seed5-40-12.pt"]
    stamp = files[0].stat().st_mtime_ns

    def no_generation(*args, **kwargs):
        raise AssertionError("curves_dataset made the images again instead of reading the cache")

    monkeypatch.setattr(data, "make_curves", no_generation)
    again = curves_dataset(tmp_path, train=40, test=12, seed=5, dtype=torch.float64)
    assert torch.equal(again[0].float(), train) and torch.equal(again[1].float(), test)
    assert files[0].stat().st_mtime_ns == stamp
    monkeypatch.undo()
    bigger = curves_dataset(tmp_path, train=60, test=12, seed=5)
    assert torch.equal(bigger[1], test)  # the test set does not depend on the training size
    assert not torch.equal(curves_dataset(None, train=40, test=12, seed=6)[0], train)


def test_curves_dataset_rewrites_a_foreign_file(tmp_path):
    path = tmp_path / "curves-28px-seed0-4-2.pt"
    path.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="not a cache of these curves"):
        train, _ = curves_dataset(tmp_path, train=4, test=2)
    assert torch.equal(curves_dataset(tmp_path, train=4, test=2)[0], train)
    assert torch.equal(train, curves_dataset(None, train=4, test=2)[0])


def test_curves_figure():
    fig = curves_figure(make_curves(6, 0).view(6, 784), n=4, columns=2)
    assert len(fig.data) == 4
    assert sorted(a.text for a in fig.layout.annotations) == [f"image {i}" for i in range(4)]
    with pytest.raises(ValueError, match="rows of 10 pixels are not square"):
        curves_figure(torch.zeros(2, 10))


# ---------------------------------------------------------------------------------------------
# Bouncing balls


def test_bouncing_balls_shapes_range_and_seeds(device):
    videos = bouncing_balls(8, generator=make_generator(0), device=device)
    assert (
        videos.shape == (8, 30, 225)
        and videos.device.type == device.type
        and videos.dtype == torch.float32
    )
    assert videos.min() >= 0 and videos.max() <= 1 and videos.max() == 1
    cpu = bouncing_balls(8, generator=0)
    assert torch.equal(videos.cpu(), cpu)
    assert not torch.equal(cpu, bouncing_balls(8, generator=1))
    assert bouncing_balls(2, length=5, size=20, balls=2, generator=0).shape == (2, 5, 400)


def test_ball_mass_is_conserved_per_frame():
    """Each frame holds about 3 discs' worth of ink: ∫ exp(−(ρ²/r²)⁴) dA = π r² Γ(5/4), in pixels."""
    videos = bouncing_balls(64, generator=2, dtype=torch.float64)
    one_ball = (15 / BOX) ** 2 * math.pi * 1.2**2 * math.gamma(1.25)
    ratio = videos.sum(-1) / (3 * one_ball)
    assert ratio.median() == pytest.approx(1, abs=0.02)
    assert 0.85 < ratio.min() and ratio.max() < 1.08  # balls touching or at a wall lose a little


def test_balls_stay_in_the_box_and_collide():
    r = 1.2
    centres = ball_trajectories(64, length=60, generator=3)
    assert centres.shape == (64, 60, 3, 2)
    assert centres.min() >= r and centres.max() <= BOX - r
    pairs = torch.triu_indices(3, 3, 1)
    gaps = (centres[:, :, pairs[0]] - centres[:, :, pairs[1]]).norm(dim=-1)
    # Colliding balls overlap by at most one sub-step of approach (a ball moves at most √3 · 0.5 per frame,
    # if it takes all the energy of three).
    assert gaps.min() > 2 * r - 2 * math.sqrt(3) * 0.5 / 2
    ghosts = ball_trajectories(64, length=60, generator=3, collide=False)
    ghost_gaps = (ghosts[:, :, pairs[0]] - ghosts[:, :, pairs[1]]).norm(dim=-1)
    assert ghost_gaps.min() < r  # without collisions balls pass through each other
    assert not torch.equal(ghosts, centres)


def test_ball_speed_is_constant_between_walls():
    r, speed = 1.2, 0.5
    centres = ball_trajectories(32, length=40, generator=4, collide=False, speed=speed)
    step = centres.diff(dim=1).norm(dim=-1)  # (cases, length − 1, balls)
    clear = ((centres[:, :-1] > r + speed) & (centres[:, :-1] < BOX - r - speed)).all(-1)
    clear &= ((centres[:, 1:] > r + speed) & (centres[:, 1:] < BOX - r - speed)).all(-1)
    assert clear.sum() > 100
    assert torch.allclose(step[clear], torch.full_like(step[clear], speed))
    assert (step <= speed + 1e-12).all()  # a reflection only shortens the displacement


def test_render_balls_draws_soft_discs():
    centre = torch.tensor([[[5.0, 5.0]]], dtype=torch.float64)  # one ball in the middle of the box
    frame = render_balls(centre, size=10, radius=1.2).view(10, 10)
    assert frame[4, 4] == pytest.approx(math.exp(-((0.5**2 * 2 / 1.44) ** 4)))
    assert frame[0, 0] < 1e-12
    offset = render_balls(torch.tensor([[[2.5, 7.5]]], dtype=torch.float64), size=10).view(10, 10)
    assert offset[7, 2] == offset.max()  # rows are y, columns are x


def test_next_frame_batch():
    videos = bouncing_balls(3, length=6, generator=0)
    inputs, targets = next_frame_batch(videos)
    assert inputs is videos and targets.shape == videos.shape
    assert torch.equal(targets[:, :-1], videos[:, 1:])
    assert torch.isnan(targets[:, -1]).all()
    error = matching_loss("squared_error")(inputs, targets)  # NaN targets are skipped
    assert torch.isfinite(error) and error > 0
    with pytest.raises(ValueError, match="videos: expected a floating-point tensor"):
        next_frame_batch(videos[:, :1])


def test_ball_errors():
    with pytest.raises(ValueError, match="balls: could not place 40 balls"):
        ball_trajectories(2, balls=40, generator=0)
    with pytest.raises(ValueError, match="radius: must be in"):
        ball_trajectories(2, radius=6, generator=0)
    with pytest.raises(ValueError, match="speed: a ball may move less than"):
        ball_trajectories(2, speed=20, generator=0)


@pytest.mark.cuda
def test_a_cuda_generator_is_refused():
    with pytest.raises(ValueError, match="generator: qnwb draws data on the CPU"):
        ball_trajectories(2, generator=torch.Generator(device="cuda"))


def test_bouncing_balls_figure():
    video = bouncing_balls(1, length=12, generator=0)[0]
    grid = bouncing_balls_figure(video, frames=8, columns=4)
    assert len(grid.data) == 8
    animation = bouncing_balls_figure(video, animate=True)
    assert len(animation.frames) == 12


# ---------------------------------------------------------------------------------------------
# Layering


def test_data_imports_only_lower_layers():
    source = Path(data.__file__).read_text(encoding="utf-8")
    imported = {
        node.module
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ImportFrom) and node.level
    }
    assert imported <= {"core", "losses", "tasks"}
