"""MethodModule: one optimizer and schedule for every method, evaluation gathered over ranks (also
from a rank with an empty shard), weights started from a checkpoint by name prefix, opt-in compile."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from modules.method_base import MethodModule, read_checkpoint
from tests.conftest import quiet_trainer


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.layer(x))


class TinyMethod(MethodModule):
    """An encoder and, optionally, a decoder (a model with new parts); scores the gathered rows."""

    NETWORKS = ("encoder",)

    def __init__(self, decoder: bool = False, lr: float = 0.1, betas: tuple[float, float] = (0.9, 0.999),
                 weight_decay: float = 0.0, warmup_steps: int = 10, min_lr_factor: float = 0.1,
                 compile: bool = False, init_from: str | None = None, init_prefixes: list[str] | None = None,
                 result_dir: str | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.encoder = Encoder()
        self.decoder = nn.Linear(3, 2) if decoder else None
        self.load_initial_weights()

    def training_step(self, batch, batch_idx):
        return self.encoder(batch[0]).pow(2).mean()

    def evaluation_outputs(self, batch) -> dict[str, torch.Tensor]:
        return {"z": self.encoder(batch[0]), "index": batch[1]}

    def validation_step(self, batch, batch_idx) -> None:
        if self.global_rank == 0:  # rank 1's shard is empty: it collects nothing
            super().validation_step(batch, batch_idx)

    def evaluate(self, split, outputs) -> None:
        result = {name: {"shape": list(rows.shape), "dtype": str(rows.dtype)} for name, rows in outputs.items()}
        with open(f"{self.hparams.result_dir}/rank{self.global_rank}.json", "w") as file:
            json.dump(result | {"index": outputs["index"].tolist()}, file)


class CloseProcessGroup(L.Callback):
    """Closes the spawned ranks' gloo group before their interpreters exit: left to teardown, its
    threads can abort a finished rank ("terminate called without an active exception")."""

    def teardown(self, trainer, pl_module, stage) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def loader(n: int = 6) -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(n, 2), torch.arange(n)), batch_size=4)


def test_one_schedule_warmup_at_most_half_the_run_then_cosine_to_the_floor(tmp_path):
    model = TinyMethod(warmup_steps=100, result_dir=str(tmp_path))  # over half of the 6 steps: clamped to 3
    lrs = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    quiet_trainer(3, tmp_path, [Record()], enable_checkpointing=False).fit(model, loader(), loader())
    assert lrs[:4] == pytest.approx([0.0, 0.1 / 3, 0.2 / 3, 0.1])
    assert lrs[-1] == pytest.approx(0.01 + 0.09 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 2 / 3)).item()))
    assert model.total_steps == 6


def test_every_rank_gets_the_whole_evaluation_set_also_when_its_shard_is_empty(tmp_path):
    """2 DDP processes; rank 1 collects nothing yet takes part in the gather with empty rows of the right shape."""
    model = TinyMethod(result_dir=str(tmp_path))
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, callbacks=[CloseProcessGroup()])
    trainer.validate(model, loader(6), verbose=False)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert ranks[0] == ranks[1]
    assert ranks[0]["z"] == {"shape": [6, 3], "dtype": "torch.float32"}
    assert ranks[0]["index"] == list(range(6))  # rank 0's rows only, rank 1 added none


def test_init_from_loads_by_prefix_lists_new_weights_and_carries_the_datamodule_state(tmp_path):
    encoder_only = TinyMethod()
    path = tmp_path / "encoder.ckpt"
    torch.save({"state_dict": encoder_only.state_dict(), "epoch": 3, "SomeTextData": {"tokenizer": "vocab"}}, path)
    with pytest.warns(UserWarning, match=r"2 weights are not in the checkpoint and start fresh: \['decoder.weight'"):
        with_decoder = TinyMethod(decoder=True, init_from=str(path))
    assert torch.equal(with_decoder.encoder.layer.weight, encoder_only.encoder.layer.weight)
    assert with_decoder._init_data_state == ("SomeTextData", {"tokenizer": "vocab"})

    full = tmp_path / "full.ckpt"
    torch.save({"state_dict": with_decoder.state_dict()}, full)
    with pytest.raises(ValueError, match=r"unexpected weights \['decoder.bias', 'decoder.weight'\]"):
        TinyMethod(init_from=str(full))
    encoder_part = TinyMethod(init_from=str(full), init_prefixes=["encoder."])
    assert torch.equal(encoder_part.encoder.layer.bias, with_decoder.encoder.layer.bias)
    with pytest.raises(ValueError, match=r"no weights start with \['head.'\]"):
        TinyMethod(init_from=str(full), init_prefixes=["head."])


def test_unreadable_or_foreign_checkpoints_get_an_error_naming_the_file(tmp_path):
    model = TinyMethod()
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": model.state_dict()}, path)
    path.write_bytes(path.read_bytes()[:50])  # truncated, as by a kill during the write
    with pytest.raises(ValueError, match=f"cannot read the checkpoint {path}"):
        read_checkpoint(path)
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt is not a Lightning checkpoint"):
        TinyMethod(init_from=str(tmp_path / "other.pt"))


@pytest.mark.skipif(not hasattr(torch, "compile"), reason="torch.compile is not available")
def test_compiled_fit_runs_and_keeps_the_plain_parameter_names(tmp_path):
    L.seed_everything(0)
    plain_names = list(TinyMethod().state_dict())
    model = TinyMethod(compile=True)
    quiet_trainer(1, tmp_path, enable_checkpointing=False, limit_val_batches=0).fit(model, loader(8))
    assert model.encoder._compiled_call_impl is not None  # compiled in place
    assert list(model.state_dict()) == plain_names
    assert all(torch.isfinite(p).all() for p in model.parameters())
