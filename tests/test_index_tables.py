"""The index-tables base: loader state, mid-epoch resume (flow, TEMI), seeds from seed_everything, draws."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from callbacks.random_state import RandomState
from datamodules.flow_data import FlowDataModule, training_draw
from datamodules.index_batches import EpochPermutation, IndexBatchLoader
from datamodules.index_tables import resolve_seed
from tests.conftest import quiet_trainer
from tests.test_temi_module import blob_module
from tests.tiny_module import TinyModule


def test_a_restored_loader_skips_the_batches_already_handed_out():
    def loader():
        return IndexBatchLoader(EpochPermutation(100, 10, shuffle=True, drop_last=True, seed=4),
                                training_draw("gaussian", (3,)))

    straight = loader()
    straight.sampler.set_epoch(2)
    epoch = list(straight)
    interrupted = loader()
    interrupted.sampler.set_epoch(2)
    batches = iter(interrupted)
    for _ in range(4):
        next(batches)
    state = interrupted.state_dict()
    assert state == {"epoch": 2, "batches_yielded": 4}

    resumed = loader()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(2)
    rest = list(resumed)
    assert len(rest) == 6 and resumed.state_dict() == {"epoch": 2, "batches_yielded": 10}
    for a, b in zip(epoch[4:], rest, strict=True):
        assert all(torch.equal(a[key], b[key]) for key in ("index", "x0", "t", "noise"))
    assert len(list(resumed)) == 10  # the skip applies once: the next pass is a whole epoch

    ended = loader()
    ended.load_state_dict({"epoch": 2, "batches_yielded": 10})  # saved at the end of epoch 2
    ended.sampler.set_epoch(3)
    assert len(list(ended)) == 10
    with pytest.raises(KeyError, match=r"lacks \['batches_yielded'\]"):
        loader().load_state_dict({"epoch": 1})


def test_data_seeds_fall_back_to_the_global_seed(monkeypatch):
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    assert resolve_seed(None) == 0 and resolve_seed(5) == 5
    L.seed_everything(3)
    assert resolve_seed(None) == 3 and resolve_seed(5) == 5
    implicit, explicit = FlowDataModule(dataset="moons", num_train=256, batch_size=32), FlowDataModule(
        dataset="moons", num_train=256, batch_size=32, seed=3)
    assert implicit.hparams.seed == 3
    assert torch.equal(implicit.train_split["x"], explicit.train_split["x"])
    assert torch.equal(next(iter(implicit.train_dataloader()))["t"], next(iter(explicit.train_dataloader()))["t"])
    assert FlowDataModule(dataset="moons", seed=1).hparams.seed == 1
    L.seed_everything(0)
    assert not torch.equal(FlowDataModule(dataset="moons", num_train=256).train_split["x"], implicit.train_split["x"])


def test_flow_draws_belong_to_items_whatever_the_number_of_ranks():
    """Rank r of 2 (batch 16) gets the r-th half of the 1-rank batch (32): same items, same x0, t and noise;
    the two ranks' items have different flow times."""
    def loader(batch_size, rank=0, world_size=1):
        return IndexBatchLoader(EpochPermutation(256, batch_size, True, True, seed=2, rank=rank, world_size=world_size),
                                training_draw("gaussian", (1, 4, 4)))

    single, ranks = loader(32), [loader(16, r, 2) for r in range(2)]
    for whole, part0, part1 in zip(single, *ranks, strict=True):
        for key in ("index", "x0", "t", "noise"):
            assert torch.equal(whole[key], torch.cat([part0[key], part1[key]])), key
        assert not torch.equal(part0["t"], part1["t"])
    t = torch.cat([batch["t"] for batch in single])
    assert 0.4 < t.mean() < 0.6 and len(t.unique()) == len(t)  # U(0, 1), one draw per item


class Interrupted(RuntimeError):
    pass


class InterruptAtStep(Callback):
    """Raises before the batch after ``step``, once the checkpoint of ``step`` is written."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise Interrupted(f"stopped at step {self.step}")


class FlowProbe(TinyModule):
    """The tiny module reading a flow batch: every value it trains on comes from the data's draws."""

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        t = batch["t"][:, None]
        x_t = (1 - t) * (batch["x0"] + 0.1 * batch["noise"]) + t * batch["x"]
        return (self.layer(x_t).squeeze(1) - batch["t"]).pow(2).mean()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val/loss", self.layer(batch["x"]).pow(2).mean())


def weights_match(a, b) -> bool:
    return all(torch.allclose(x, y, atol=1e-5, rtol=0) for x, y in zip(a.parameters(), b.parameters(), strict=True))


# Checkpoints written every 13 steps, or at every validation (every 3 of the 10 batches of an epoch).
CHECKPOINT_EVERY = {"steps": ({"every_n_train_steps": 13}, {}), "validation": ({}, {"val_check_interval": 0.3})}


@pytest.mark.parametrize("every", CHECKPOINT_EVERY)
def test_a_fit_stopped_mid_epoch_resumes_exactly(tmp_path, every):
    """Checkpoint at step 13 (epoch 1, batch 3 of 10), stopped, resumed == 3 epochs straight (weights
    within 1e-5); the same resume without the loader's state does not match."""
    checkpoint_args, trainer_args = CHECKPOINT_EVERY[every]

    def run(root, callbacks=(), ckpt_path=None):
        L.seed_everything(0)
        data = FlowDataModule(dataset="moons", num_train=320, num_eval=64, batch_size=32)
        model = FlowProbe()
        checkpoint = ModelCheckpoint(dirpath=root / "checkpoints", save_last=True, **checkpoint_args)
        trainer = quiet_trainer(3, root, [checkpoint, RandomState(), *callbacks], **trainer_args)
        trainer.fit(model, data, ckpt_path=ckpt_path)
        return model, trainer

    straight, straight_trainer = run(tmp_path / "straight")
    with pytest.raises(Interrupted):
        run(tmp_path / "resumed", [InterruptAtStep(13)])
    path = tmp_path / "resumed/checkpoints/last.ckpt"
    saved = torch.load(path, weights_only=False)
    assert saved["global_step"] == 13
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches_yielded": 3}]
    assert saved["FlowDataModule"] == {"train_loader": {"epoch": 1, "batches_yielded": 3}}
    resumed, resumed_trainer = run(tmp_path / "resumed", ckpt_path=str(path))
    assert resumed_trainer.global_step == straight_trainer.global_step == 30
    assert weights_match(straight, resumed)

    # as if the loader kept no state: epoch 1 starts over
    del saved["loops"]["fit_loop"]["state_dict"]["combined_loader"], saved["FlowDataModule"]
    torch.save(saved, tmp_path / "stateless.ckpt")
    stateless, _ = run(tmp_path / "stateless", ckpt_path=str(tmp_path / "stateless.ckpt"))
    assert not weights_match(straight, stateless)


class ReadsItsOwnLoader(Callback):
    """Builds and reads a training loader of its own before every step, as a feature pass would."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        next(iter(trainer.datamodule.train_dataloader()))


def test_the_saved_place_is_the_fits_loader_not_one_a_callback_built(tmp_path):
    data = FlowDataModule(dataset="moons", num_train=320, num_eval=64, batch_size=32)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=13)
    quiet_trainer(2, tmp_path, [checkpoint, ReadsItsOwnLoader()], max_steps=13,
                  limit_val_batches=0).fit(FlowProbe(), data)
    saved = torch.load(tmp_path / "epoch=1-step=13.ckpt", weights_only=False)
    assert saved["global_step"] == 13
    assert saved["FlowDataModule"] == {"train_loader": {"epoch": 1, "batches_yielded": 3}}


def test_batches_gathered_by_hand_after_fit_read_the_evaluation_tables(tmp_path):
    data = FlowDataModule(dataset="moons", num_train=320, num_eval=64, batch_size=32)
    quiet_trainer(1, tmp_path, limit_train_batches=2, limit_val_batches=0, enable_checkpointing=False).fit(
        FlowProbe(), data)
    assert data.trainer.state.stage is None
    batch = data.on_after_batch_transfer(next(iter(data.val_dataloader())), 0)
    assert torch.equal(batch["x"], data.eval_split["x"][batch["index"]])


def test_a_temi_fit_stopped_mid_epoch_resumes_to_the_straight_weights(blob_files, tmp_path):
    """TEMI asks for ``estimated_stepping_batches`` in ``configure_optimizers``, so Lightning builds the
    training loader before restoring the checkpoint and drops the loader state saved with its fit loop
    (Lightning issue 20550). Checkpoint at step 7 (epoch 1, batch 2 of 5), stopped, resumed == 3 epochs
    straight (weights within 1e-5) through the datamodule's copy of that state; without the copy, the
    resumed epoch 1 starts over and the weights differ."""

    def run(root, callbacks=(), ckpt_path=None):
        L.seed_everything(0)
        model, data = blob_module(blob_files)
        checkpoint = ModelCheckpoint(dirpath=root / "checkpoints", save_last=True, every_n_train_steps=7)
        trainer = quiet_trainer(3, root, [checkpoint, RandomState(), *callbacks])
        trainer.fit(model, data, ckpt_path=ckpt_path)
        return model, trainer

    straight, straight_trainer = run(tmp_path / "straight")
    with pytest.raises(Interrupted):
        run(tmp_path / "resumed", [InterruptAtStep(7)])
    path = tmp_path / "resumed/checkpoints/last.ckpt"
    saved = torch.load(path, weights_only=False)
    assert saved["global_step"] == 7
    assert saved["EmbeddingsDataModule"] == {"train_loader": {"epoch": 1, "batches_yielded": 2}}
    resumed, resumed_trainer = run(tmp_path / "resumed", ckpt_path=str(path))
    assert resumed_trainer.global_step == straight_trainer.global_step == 15
    assert weights_match(straight, resumed)

    del saved["EmbeddingsDataModule"]  # only the fit loop's copy of the loader state is left
    torch.save(saved, tmp_path / "loop_state_only.ckpt")
    loop_state_only, _ = run(tmp_path / "loop_state_only", ckpt_path=str(tmp_path / "loop_state_only.ckpt"))
    assert not weights_match(straight, loop_state_only)


def test_a_loader_place_read_outside_a_resumed_fit_is_ignored():
    """A fresh fit reading another run's datamodule state (``init_from``) starts its epoch at the first batch."""
    data = FlowDataModule(dataset="moons", num_train=320, batch_size=32)
    data.load_state_dict({"train_loader": {"epoch": 0, "batches_yielded": 10}})
    assert len(list(data.train_dataloader())) == 10
