"""VisualLatentText: P1 keeps the latent text-dependent, P2 learns paraphrases, resume is exact,
P2 starts from a P1 checkpoint, 2-process evaluation equals 1-process, the spec-sized configs stay valid."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint

from callbacks.phase_gate import GateCriterion, PhaseGate
from callbacks.random_state import RandomState
from datamodules.blocks_text import BlocksTextDataModule
from modules.visual_latent import VisualLatentText
from tests.conftest import StopAfterEpoch, quiet_trainer
from tests.test_cli import cli
from tests.test_index_tables import InterruptAtStep, Interrupted

TINY_MODEL = {"dim": 32, "depth": 1, "heads": 2, "ffn_dim": 64, "dropout": 0.0, "head_dim": 16, "head_depth": 1,
              "head_ffn_dim": 32, "query_channels": 8, "grid_size": 16, "embedding_dim": 32,
              "readout_hidden_dim": 64, "pool_levels": (1, 2), "lr": 2e-3, "warmup_steps": 5, "blur_epochs": 0}
TINY_DATA = {"num_train_scenes": 256, "views_per_scene": 4, "counterfactuals_per_scene": 8,
             "counterfactuals_per_anchor": 2, "vocab_size": 512,
             "batch_size": 32, "eval_batch_size": 16, "eval_items": 32}


def tiny(**model_overrides) -> tuple[VisualLatentText, BlocksTextDataModule]:
    data = BlocksTextDataModule(**TINY_DATA)
    model = VisualLatentText(vocab_size=data.vocab_size, max_length=data.max_length,
                             **(TINY_MODEL | model_overrides))
    return model, data


def validate(model, data, root) -> dict[str, float]:
    return quiet_trainer(1, root, enable_checkpointing=False).validate(model, data, verbose=False)[0]


def test_p1_priors_fall_and_the_latent_keeps_depending_on_the_text(tmp_path):
    L.seed_everything(0)
    model, data = tiny(contrastive_weight=0.0)
    data.setup("fit")
    batch = data.on_after_batch_transfer(next(iter(data.train_dataloader())), 0)
    with torch.no_grad():
        before = model.prior_loss(model.latent(batch["view_a"]))[0].item()
    quiet_trainer(6, tmp_path, enable_checkpointing=False).fit(model, data)
    model.eval()
    with torch.no_grad():
        after = model.prior_loss(model.latent(batch["view_a"]))[0].item()
    assert after < 0.7 * before
    assert validate(model, data, tmp_path)["val/text_dependence"] > 0.2


def test_p2_learns_to_retrieve_paraphrases(tmp_path):
    L.seed_everything(0)
    model, data = tiny()
    untrained = validate(model, data, tmp_path)
    quiet_trainer(8, tmp_path, enable_checkpointing=False).fit(model, data)
    trained = validate(model, data, tmp_path)
    # pool: 32 items x (4 paraphrases + 4 counterfactuals); chance R@5 = 1 - (1 - 4/256)^5 ~ 0.08
    assert trained["val/r5"] > 0.5 and trained["val/r5"] > untrained["val/r5"] + 0.2
    assert trained["val/cos_gap"] > untrained["val/cos_gap"]


@pytest.mark.parametrize("stop", ["epoch_end", "mid_epoch"])
def test_resume_is_exact(tmp_path, stop):
    """Interrupted after epoch 1 of 3, or after the first batch of epoch 2, and resumed ==
    uninterrupted: weights (EMA included), optimizer, schedule, dropout draws and the gate's streaks."""

    def run(root, interrupt=(), ckpt_path=None):
        L.seed_everything(0)
        model, data = tiny(dropout=0.1)
        gate = PhaseGate("P2", [GateCriterion("alpha", "val/channels_alpha_in_range", ">=", 1.0, 2)])
        checkpoint = ModelCheckpoint(dirpath=root / "checkpoints", save_last=True,
                                     every_n_train_steps=4 if stop == "mid_epoch" else None)
        callbacks = [checkpoint, RandomState(), EMAWeightAveraging(decay=0.9), gate, *interrupt]
        fit_trainer = quiet_trainer(3, root, callbacks, limit_train_batches=3, limit_val_batches=1)
        fit_trainer.fit(model, data, ckpt_path=ckpt_path)
        return model, fit_trainer, gate

    straight, straight_trainer, straight_gate = run(tmp_path / "straight")
    if stop == "epoch_end":
        run(tmp_path / "resumed", [StopAfterEpoch(0)])
    else:
        with pytest.raises(Interrupted):
            run(tmp_path / "resumed", [InterruptAtStep(4)])
    resumed, resumed_trainer, resumed_gate = run(tmp_path / "resumed",
                                                 ckpt_path=str(tmp_path / "resumed/checkpoints/last.ckpt"))
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    opt_a = straight_trainer.optimizers[0].state_dict()["state"]
    opt_b = resumed_trainer.optimizers[0].state_dict()["state"]
    assert all(torch.equal(opt_a[k]["exp_avg"], opt_b[k]["exp_avg"]) for k in opt_a)
    for name in ("val/r1", "val/tv", "val/alpha_c0", "train/loss_epoch"):
        assert straight_trainer.callback_metrics[name] == resumed_trainer.callback_metrics[name], name
    assert straight_gate.state_dict() == resumed_gate.state_dict()


def test_p2_starts_from_a_p1_checkpoint(tmp_path):
    L.seed_everything(0)
    p1, data = tiny(contrastive_weight=0.0)
    quiet_trainer(1, tmp_path, limit_train_batches=2, limit_val_batches=1, enable_checkpointing=False).fit(p1, data)
    path = tmp_path / "p1.ckpt"
    torch.save({"state_dict": p1.state_dict(), "BlocksTextDataModule": data.state_dict()}, path)
    p2, _ = tiny(init_from=str(path))
    assert all(torch.equal(a, b) for a, b in zip(p1.state_dict().values(), p2.state_dict().values(), strict=True))
    # the weights bring their tokenizer: a P2 corpus that would train another one gets P1's
    other_data = BlocksTextDataModule(**(TINY_DATA | {"vocab_size": 450}))
    one_step = quiet_trainer(1, tmp_path, limit_train_batches=1, limit_val_batches=1, enable_checkpointing=False)
    one_step.fit(p2, other_data)
    assert other_data.tokenizer.to_str() == data.tokenizer.to_str()
    with pytest.raises(ValueError, match="does not match"):
        tiny(init_from=str(path), dim=48)
    torch.save({"weights": 1}, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match="not a Lightning checkpoint"):
        tiny(init_from=str(tmp_path / "bad.ckpt"))


def test_unknown_prior_names_are_rejected():
    with pytest.raises(ValueError, match="unknown priors \\['tvv'\\]"):
        tiny(prior_weights={"tvv": 0.1})


@pytest.mark.parametrize("config", ["configs/p1_priors.yaml", "configs/p2_contrastive.yaml"])
def test_spec_sized_configs_run_one_step(tmp_path, config):
    """The GPU-sized defaults (6 x 384 Transformer, 32 x 32 x 6 grid) through one step and one evaluation."""
    cli("fit", "--config", config, "--trainer.default_root_dir", str(tmp_path), "--trainer.fast_dev_run", "1",
        "--data.init_args.num_train_scenes", "40", "--data.init_args.batch_size", "2",
        "--data.init_args.eval_items", "4", "--data.init_args.eval_batch_size", "4", timeout=600)
    report = json.loads((tmp_path / "gate_report.json").read_text())
    assert report["phase"] == ("P1" if "p1" in config else "P2")
    assert {c["name"] for c in report["criteria"]} >= {"spectrum_alpha", "tv_plateau", "text_dependence"}
    assert all(c["value"] is not None for c in report["criteria"])
    assert (tmp_path / "tokenizer.json").exists()


def test_two_process_evaluation_matches_one_process(tmp_path):
    """DDP fit (InfoNCE over all-gathered embeddings), then validation on 2 ranks with uneven shards
    (13 items: 7 + 6) gives the metrics of 1 rank: the gathered latents and embeddings are complete."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"init_args": {k: list(v) if isinstance(v, tuple) else v for k, v in TINY_MODEL.items()}},
        "data": {"init_args": TINY_DATA | {"eval_items": 13, "eval_batch_size": 4}},
        "trainer": {"callbacks": None, "limit_train_batches": 2, "max_epochs": 1, "enable_progress_bar": False},
    }))
    base = ["--config", "configs/p2_contrastive.yaml", "--config", str(config)]
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    cli("fit", *base, "--trainer.default_root_dir", str(tmp_path / "fit"), *ddp)
    checkpoint = str(tmp_path / "fit/checkpoints/last.ckpt")
    cli("validate", *base, "--trainer.default_root_dir", str(tmp_path / "one"), "--ckpt_path", checkpoint)
    cli("validate", *base, "--trainer.default_root_dir", str(tmp_path / "two"), "--ckpt_path", checkpoint, *ddp)
    one = json.loads((tmp_path / "one/metrics.json").read_text())["validate"]
    two = json.loads((tmp_path / "two/metrics.json").read_text())["validate"]
    for name in ("val/r1", "val/r5", "val/cos_gap", "val/tv", "val/alpha_c0", "val/text_dependence"):
        assert two[name] == pytest.approx(one[name], abs=1e-5), name


def test_bf16_mixed_fit_gives_finite_metrics(tmp_path):
    L.seed_everything(0)
    model, data = tiny()
    trainer = quiet_trainer(1, tmp_path, enable_checkpointing=False, limit_train_batches=3, limit_val_batches=1,
                            precision="bf16-mixed")
    trainer.fit(model, data)
    metrics = trainer.callback_metrics
    for name in ("train/loss_epoch", "train/info_nce", "val/r1", "val/tv", "val/cos_gap", "val/alpha_c0"):
        assert torch.isfinite(metrics[name]), name
