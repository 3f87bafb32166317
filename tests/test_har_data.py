"""IMU windows with label text (issue 10): the UCI HAR and .npz readers and their errors, validation
splits, channel statistics, label matching by text, holdout, training batches and their draws."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import pywt
import torch
import torch.nn.functional as F

from datamodules.har_files import UCI_CHANNELS, read_uci_har, read_window_archive, read_windows
from datamodules.imu_windows import IMUTextDataModule, random_rotations
from tests.conftest import quiet_trainer
from tests.har_fixtures import write_uci_har, write_window_npz


@pytest.fixture(scope="module")
def text_cache(tmp_path_factory):
    """One description-embedding cache for the whole file: each label table is embedded once."""
    return str(tmp_path_factory.mktemp("text-cache"))


@pytest.fixture(scope="module")
def with_subjects(tmp_path_factory):
    return write_uci_har(tmp_path_factory.mktemp("uci-subjects"), num_train=60, num_test=30)


@pytest.fixture(scope="module")
def without_subjects(tmp_path_factory):
    return write_uci_har(tmp_path_factory.mktemp("uci-plain"), num_train=60, num_test=30, subjects=False)


def signal_file(root, channel, split="train"):
    return root / split / "Inertial Signals" / f"{channel}_{split}.txt"


def replace_line(path, number, line):
    lines = path.read_text().splitlines()
    lines[number - 1] = line
    path.write_text("\n".join(lines) + "\n")


# ---- the UCI HAR reader --------------------------------------------------------------------------
def test_uci_reader_reads_channels_in_order_labels_and_subjects(with_subjects):
    windows = read_uci_har(with_subjects, "train")
    assert windows.signals.shape == (60, 9, 128) and windows.signals.dtype == torch.float32
    assert windows.channel_names == UCI_CHANNELS == [
        "body_acc_x", "body_acc_y", "body_acc_z", "body_gyro_x", "body_gyro_y", "body_gyro_z",
        "total_acc_x", "total_acc_y", "total_acc_z"]
    for channel, name in enumerate(UCI_CHANNELS):
        expected = np.loadtxt(signal_file(with_subjects, name), dtype=np.float32)
        assert np.array_equal(windows.signals[:, channel].numpy(), expected), name
    y = np.loadtxt(with_subjects / "train/y_train.txt", dtype=np.int64)
    assert windows.label_names == ["WALKING", "SITTING", "LAYING"]
    assert windows.labels.tolist() == (y - 1).tolist()  # ids 1, 2, 3 in the order of activity_labels.txt
    assert windows.subjects.tolist() == [1 + i // 10 for i in range(60)]
    assert read_uci_har(with_subjects, "test").subjects.unique().tolist() == [7, 8, 9, 10, 11, 12]


def test_label_ids_follow_the_label_file_not_their_values(tmp_path):
    root = write_uci_har(tmp_path, num_train=6, num_test=3, subjects=False)
    (root / "activity_labels.txt").write_text("3 LAYING\n1 WALKING\n2 SITTING\n")
    windows = read_uci_har(root, "train")
    y = np.loadtxt(root / "train/y_train.txt", dtype=np.int64)
    assert windows.label_names == ["LAYING", "WALKING", "SITTING"] and windows.subjects is None
    assert windows.labels.tolist() == [{3: 0, 1: 1, 2: 2}[int(value)] for value in y]


def break_missing(root):
    signal_file(root, "body_gyro_y").unlink()
    return r"missing signal file\(s\) of split 'train': .*body_gyro_y_train.txt"


def break_row_length(root):
    path = signal_file(root, "total_acc_z")
    replace_line(path, 3, " ".join(path.read_text().splitlines()[2].split()[:127]))
    return r"total_acc_z_train.txt, line 3: 127 values, but line 1 has 128"


def break_file_length(root):
    path = signal_file(root, "body_acc_y")
    path.write_text("".join(" ".join(line.split()[:64]) + "\n" for line in path.read_text().splitlines()))
    return r"body_acc_y_train.txt, line 1: 64 values, but .*body_acc_x_train.txt has 128 per line"


def break_label(root):
    replace_line(root / "train/y_train.txt", 5, "9")
    return r"y_train.txt, line 5: label id 9 is not in .*activity_labels.txt \(ids \[1, 2, 3\]\)"


def break_nan(root):
    path = signal_file(root, "body_acc_x")
    values = path.read_text().splitlines()[3].split()
    replace_line(path, 4, " ".join(["nan", *values[1:]]))
    return r"body_acc_x_train.txt, line 4: NaN or inf sample \(1 such lines\)"


def break_number(root):
    path = signal_file(root, "body_gyro_z")
    replace_line(path, 2, path.read_text().splitlines()[1].replace(" ", " abc ", 1))
    return r"body_gyro_z_train.txt, line 2: not a number"


def break_line_count(root):
    path = root / "train/y_train.txt"
    path.write_text(path.read_text() + "1\n")
    return r"y_train.txt has 9 lines but .*body_acc_x_train.txt has 8"


@pytest.mark.parametrize("damage", [break_missing, break_row_length, break_file_length, break_label,
                                    break_nan, break_number, break_line_count])
def test_bad_uci_files_are_named_with_their_line(tmp_path, damage):
    root = write_uci_har(tmp_path, num_train=8, num_test=4, subjects=False)
    message = damage(root)
    with pytest.raises(ValueError, match=message):
        read_uci_har(root, "train")


# ---- window archives and the layout dispatch -----------------------------------------------------
def test_window_archives_file_and_folder(tmp_path, with_subjects):
    path = write_window_npz(tmp_path / "archive/test.npz", num=12, label_names=("Running", "Walking"),
                            subjects=3)
    windows = read_window_archive(path)
    with np.load(path) as archive:
        assert torch.equal(windows.signals, torch.from_numpy(archive["windows"]))
        assert windows.labels.tolist() == archive["labels"].tolist()
    assert windows.label_names == ["Running", "Walking"] and windows.channel_names == UCI_CHANNELS
    assert windows.subjects.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert torch.equal(read_windows(tmp_path / "archive", "test").signals, windows.signals)  # {split}.npz
    assert torch.equal(read_windows(path, "train").signals, windows.signals)  # a file given for the split
    assert read_windows(with_subjects, "test").source == f"{with_subjects} (test)"
    with pytest.raises(ValueError, match=r"no windows of split 'train'; looked for a UCI HAR folder .*"
                                         r"activity_labels.txt.*train.npz"):
        read_windows(tmp_path / "archive", "train")


def test_bad_window_archives_name_the_key_or_row(tmp_path):
    windows = np.zeros((5, 3, 16), dtype=np.float32)
    windows[3, 1, 7] = np.inf
    np.savez(tmp_path / "inf.npz", windows=windows, labels=np.zeros(5, dtype=np.int64),
             label_names=np.array(["a"]))
    with pytest.raises(ValueError, match=r"inf.npz: 'windows' rows \[3\] hold NaN or inf"):
        read_window_archive(tmp_path / "inf.npz")
    np.savez(tmp_path / "nolabels.npz", windows=windows)
    with pytest.raises(ValueError, match=r"nolabels.npz: lacks \['labels', 'label_names'\]"):
        read_window_archive(tmp_path / "nolabels.npz")
    np.savez(tmp_path / "flat.npz", windows=windows[:, 0], labels=np.zeros(5, dtype=np.int64),
             label_names=np.array(["a"]))
    with pytest.raises(ValueError, match=r"flat.npz: 'windows' must be numbers of shape \[N, C, T\], "
                                         r"got float32 \(5, 16\)"):
        read_window_archive(tmp_path / "flat.npz")
    np.savez(tmp_path / "range.npz", windows=np.zeros((5, 3, 16)), labels=np.array([0, 0, 2, 0, 0]),
             label_names=np.array(["a", "b"]))
    with pytest.raises(ValueError, match=r"range.npz: 'labels' row 2 is 2, outside the 2 label_names"):
        read_window_archive(tmp_path / "range.npz")
    np.savez(tmp_path / "short.npz", windows=np.zeros((5, 3, 16)), labels=np.zeros(4, dtype=np.int64),
             label_names=np.array(["a"]))
    with pytest.raises(ValueError, match=r"short.npz: 'labels' must be integers of shape \(5,\)"):
        read_window_archive(tmp_path / "short.npz")


# ---- validation splits ---------------------------------------------------------------------------
def test_validation_holds_out_whole_subjects_by_seed(with_subjects):
    subjects = read_uci_har(with_subjects, "train").subjects

    def held_subjects(seed):
        data = IMUTextDataModule(str(with_subjects), val_fraction=0.2, seed=seed)
        train, val = subjects[data.split_rows("train")], subjects[data.split_rows("val")]
        assert not set(train.tolist()) & set(val.tolist())
        assert len(train) + len(val) == 60
        return sorted(set(val.tolist()))

    # 6 subjects of 10 windows: one subject (10 windows) is nearest to 20 % of 60 (12)
    first = held_subjects(0)
    assert len(first) == 1 and held_subjects(0) == first
    assert {tuple(held_subjects(seed)) for seed in range(1, 6)} - {tuple(first)}


def test_validation_without_subjects_is_stratified_by_seed(without_subjects):
    def val_rows(seed):
        data = IMUTextDataModule(str(without_subjects), val_fraction=0.1, seed=seed)
        assert torch.bincount(data.split_labels("val")).tolist() == [2, 2, 2]  # 10 % of 20 per label
        assert torch.bincount(data.split_labels("train")).tolist() == [18, 18, 18]
        return data.split_rows("val").tolist()

    assert val_rows(3) == val_rows(3) != val_rows(4)


# ---- normalization -------------------------------------------------------------------------------
def test_channel_statistics_come_from_train_and_travel_in_the_state(with_subjects, text_cache):
    raw_train = read_uci_har(with_subjects, "train").signals
    raw_test = read_uci_har(with_subjects, "test").signals
    data = IMUTextDataModule(str(with_subjects), seed=0)
    train = raw_train[data.split_rows("train")].double()
    stats = data.channel_stats()
    assert stats["names"] == UCI_CHANNELS
    assert np.allclose(stats["mean"], train.mean((0, 2)).numpy(), atol=1e-6)
    assert np.allclose(stats["std"], train.transpose(0, 1).flatten(1).std(1).numpy(), atol=1e-6)
    mean, std = torch.tensor(stats["mean"])[:, None], torch.tensor(stats["std"])[:, None]
    assert torch.allclose(data.host_tables("test")["window"], (raw_test - mean) / std, atol=1e-5)

    other = IMUTextDataModule(str(with_subjects), seed=1)  # another validation subject: other statistics
    assert other.channel_stats()["mean"] != stats["mean"]
    state = data.state_dict()
    assert set(state) == {"channel_stats"}  # no trainer: no loader place
    other.load_state_dict(state)
    assert other.channel_stats() == stats
    assert torch.equal(other.host_tables("test")["window"], data.host_tables("test")["window"])

    with_bands = IMUTextDataModule(str(with_subjects), wavelet_levels=1)
    with pytest.raises(ValueError, match=r"channel statistics are for channels \['body_acc_x'.*"
                                         r"but the data has"):
        with_bands.load_state_dict(state)


def test_wavelet_bands_are_appended_channels(tmp_path, with_subjects):
    data = IMUTextDataModule(str(with_subjects), wavelet="db4", wavelet_levels=2)
    assert (data.num_channels, data.window_length) == (27, 128)
    assert data.channel_names[9:12] == ["swt1_body_acc_x", "swt1_body_acc_y", "swt1_body_acc_z"]
    assert data.channel_names[18] == "swt2_body_acc_x"
    raw = read_uci_har(with_subjects, "test").signals
    (_, detail2), (_, detail1) = pywt.swt(raw[:, 4].numpy(), "db4", level=2, axis=-1)
    stats = data.channel_stats()
    test = data.host_tables("test")["window"]
    for channel, detail in ((9 + 4, detail1), (18 + 4, detail2)):
        assert np.allclose(test[:, channel].numpy() * stats["std"][channel] + stats["mean"][channel], detail,
                           atol=1e-5)
    short = write_uci_har(tmp_path, num_train=6, num_test=3, length=100)
    with pytest.raises(ValueError, match="wavelet_levels=3 needs a window length divisible by 8; the windows "
                                         "have 100 samples"):
        IMUTextDataModule(str(short), wavelet_levels=3).setup("test")


def test_channels_must_agree_and_rotation_needs_xyz_triads(tmp_path, with_subjects):
    unnamed = tmp_path / "unnamed"
    for split in ("train", "test"):
        write_window_npz(unnamed / f"{split}.npz", num=12, num_channels=6, channel_names=None)
    with pytest.raises(ValueError, match=r"has channels \['channel_0', .* but .* has \['body_acc_x'"):
        IMUTextDataModule(str(with_subjects), eval_data_dir=str(unnamed / "test.npz")).setup("test")
    data = IMUTextDataModule(str(unnamed), rotate=True, batch_size=4, val_fraction=0.25)
    with pytest.raises(ValueError, match=r"rotate=True turns consecutive \(x, y, z\) channel triads, but the "
                                         r"channels are \['channel_0'"):
        data.train_dataloader()


# ---- label text ----------------------------------------------------------------------------------
def test_labels_are_matched_by_text_and_new_ones_appended(tmp_path, with_subjects, text_cache):
    eval_file = write_window_npz(tmp_path / "other.npz", num=10, label_names=("Running", "Walking"))
    data = IMUTextDataModule(str(with_subjects), eval_data_dir=str(eval_file), text_cache_dir=text_cache)
    assert data.label_names == ["walking", "sitting", "lying", "running"]  # LAYING is spelled lying
    with np.load(eval_file) as archive:
        expected = [{0: 3, 1: 0}[int(label)] for label in archive["labels"]]  # Running -> 3, Walking -> 0
    assert data.split_labels("test").tolist() == expected
    assert data.seen_label_ids.tolist() == [0, 1, 2] and data.unseen_label_ids.tolist() == [3]
    assert (data.num_labels, data.text_dim, data.num_channels, data.batch_size) == (4, 384, 9, 64)

    labels, embeddings = data.description_labels, data.description_embeddings
    assert embeddings.shape == (len(data.descriptions), 384) and len(labels) == len(data.descriptions)
    first = [data.descriptions[int((labels == label).nonzero()[0])] for label in range(4)]
    assert first == data.label_names  # each label's descriptions start with its canonical text
    assert torch.allclose(data.label_embeddings.norm(dim=1), torch.ones(4))
    running = F.normalize(embeddings[labels == 3].mean(0), dim=0)
    assert torch.allclose(data.label_embeddings[3], running, atol=1e-6)
    assert "test=10" in str(data) and "labels=4" in str(data)


def test_holdout_activities_leave_train_and_val_but_stay_in_test(with_subjects):
    data = IMUTextDataModule(str(with_subjects), holdout_activities=["Sitting"])
    assert 1 not in data.split_labels("train").tolist() + data.split_labels("val").tolist()
    assert len(data.split_labels("train")) + len(data.split_labels("val")) == 40
    assert torch.bincount(data.split_labels("test")).tolist() == [10, 10, 10]
    assert data.seen_label_ids.tolist() == [0, 2] and data.unseen_label_ids.tolist() == [1]
    with pytest.raises(ValueError, match=r"holdout_activities \['swimming'\] match no label; the labels are "
                                         r"\['walking', 'sitting', 'lying'\]"):
        IMUTextDataModule(str(with_subjects), holdout_activities=["swimming"]).setup("fit")
    everything = IMUTextDataModule(str(with_subjects), holdout_activities=["walking", "sitting", "LAYING"])
    with pytest.raises(ValueError, match="the train split holds no windows"):
        everything.setup("fit")


# ---- training batches ----------------------------------------------------------------------------
def first_batch(data, epoch=0):
    loader = data.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return data.on_after_batch_transfer(next(iter(loader)), 0)


def test_a_training_batch_carries_a_description_of_its_label(with_subjects, text_cache):
    data = IMUTextDataModule(str(with_subjects), batch_size=16, text_cache_dir=text_cache)
    batch = first_batch(data)
    assert torch.equal(batch["label"], data.split_labels("train")[batch["index"]])
    assert torch.equal(data.description_labels[batch["description"]], batch["label"])
    assert torch.equal(batch["text"], data.description_embeddings[batch["description"]])
    assert torch.equal(batch["window"], data.host_tables("train")["window"][batch["index"]])  # not augmented
    # no trainer: batches are gathered from the test tables
    evaluation = data.on_after_batch_transfer(next(iter(data.test_dataloader())), 0)
    assert set(evaluation) == {"index", "window", "label"} and len(evaluation["index"]) == 30


def test_rotation_keeps_each_triads_norm_at_every_step(with_subjects, text_cache):
    data = IMUTextDataModule(str(with_subjects), batch_size=16, rotate=True, wavelet_levels=1,
                             text_cache_dir=text_cache)
    batch = first_batch(data)
    stats = data.channel_stats()
    mean, std = torch.tensor(stats["mean"])[:, None], torch.tensor(stats["std"])[:, None]
    rotated = (batch["window"] * std + mean).view(16, 6, 3, 128)
    original = (data.host_tables("train")["window"][batch["index"]] * std + mean).view(16, 6, 3, 128)
    assert torch.allclose(rotated.norm(dim=2), original.norm(dim=2), atol=1e-4)
    assert not torch.allclose(rotated, original, atol=1e-2)
    rotations = batch["rotation"]
    assert torch.allclose(rotations @ rotations.transpose(1, 2), torch.eye(3).expand(16, 3, 3), atol=1e-5)
    assert torch.allclose(torch.linalg.det(random_rotations(256, torch.Generator().manual_seed(0))),
                          torch.ones(256), atol=1e-5)


def test_scale_and_jitter_are_applied_as_drawn(with_subjects, text_cache):
    data = IMUTextDataModule(str(with_subjects), batch_size=16, scale_sigma=0.2, jitter_sigma=0.1,
                             text_cache_dir=text_cache)
    batch = first_batch(data)
    stats = data.channel_stats()
    mean, std = torch.tensor(stats["mean"])[:, None], torch.tensor(stats["std"])[:, None]
    raw = data.host_tables("train")["window"][batch["index"]] * std + mean
    expected = (raw * batch["scale"][:, None, None] - mean) / std + batch["jitter"]
    assert torch.allclose(batch["window"], expected, atol=1e-5)
    assert 0.05 < batch["jitter"].std() < 0.15 and batch["scale"].std() > 0.05


def test_draws_repeat_for_a_seed_and_epoch_and_change_with_the_epoch(with_subjects, text_cache):
    def draws(seed, epoch):
        data = IMUTextDataModule(str(with_subjects), batch_size=16, seed=seed, scale_sigma=0.1, rotate=True,
                                 text_cache_dir=text_cache)
        return first_batch(data, epoch)

    first, again, later = draws(0, 0), draws(0, 0), draws(0, 1)
    for key in ("index", "description", "scale", "rotation", "window", "text"):
        assert torch.equal(first[key], again[key]), key
    assert not torch.equal(first["index"], later["index"])
    assert not torch.allclose(first["rotation"], later["rotation"])


# ---- in a trainer --------------------------------------------------------------------------------
class WindowProbe(L.LightningModule):
    """Reads what a batch of each stage carries; keeps the test split's windows it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(9, 384)
        self.test_windows: list[torch.Tensor] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return (F.normalize(self.layer(batch["window"].mean(2)), dim=1) * batch["text"]).sum(1).neg().mean()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val/loss", self.layer(batch["window"].mean(2)).pow(2).mean())

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.test_windows.append(batch["window"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_an_evaluation_from_a_checkpoint_normalizes_as_training_did(tmp_path, with_subjects, text_cache):
    def data(seed):
        return IMUTextDataModule(str(with_subjects), batch_size=16, seed=seed, text_cache_dir=text_cache)

    trained = data(0)
    trainer = quiet_trainer(1, tmp_path, limit_train_batches=2)
    trainer.fit(WindowProbe(), trained)
    path = tmp_path / "trained.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["IMUTextDataModule"]
    assert saved["channel_stats"] == trained.channel_stats()

    evaluated, probe = data(1), WindowProbe()  # another validation subject, other statistics of its own
    assert evaluated.channel_stats() != trained.channel_stats()
    quiet_trainer(1, tmp_path).test(probe, evaluated, ckpt_path=str(path))
    assert evaluated.channel_stats() == trained.channel_stats()
    assert torch.equal(torch.cat(probe.test_windows), trained.host_tables("test")["window"])
