"""The attribute flow (spec 001, issue 11) on generated attribute embeddings: learning beats the no-op,
probes see real embeddings only, prototypes come from real means, resume is exact."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import modules.attribute_flow as attribute_flow_module
from callbacks.flow_map import FlowMap
from callbacks.prototype_refresh import PrototypeRefresh
from callbacks.random_state import RandomState
from clustering.attributes import combination_codes
from datamodules.attribute_embeddings import AttributeEmbeddingsDataModule
from modules.attribute_flow import AttributeFlow
from modules.attribute_transfer import transfer_metrics
from tests.conftest import StopAfterEpoch, quiet_trainer

DIM, NUM_ATTRIBUTES = 16, 3


@pytest.fixture(scope="module")
def attribute_files(tmp_path_factory):
    """Three attributes, each the sign of its own coordinate, plus identity noise in the rest."""
    rng = np.random.default_rng(0)
    attributes = rng.integers(0, 2, (800, NUM_ATTRIBUTES)).astype(np.float32)
    z = rng.normal(size=(800, DIM)).astype(np.float32) * 0.5
    z[:, :NUM_ATTRIBUTES] += 2 * attributes - 1
    folder = tmp_path_factory.mktemp("attribute-data")
    np.save(folder / "z.npy", z)
    np.save(folder / "attributes.npy", attributes)
    return folder


def data_for(folder) -> AttributeEmbeddingsDataModule:
    return AttributeEmbeddingsDataModule(embeddings=str(folder / "z.npy"), attributes=str(folder / "attributes.npy"),
                                         attribute_names=["a", "b", "c"], batch_size=64, seed=0)


def model_for(**overrides) -> AttributeFlow:
    return AttributeFlow(**({"embedding_dim": DIM, "num_attributes": NUM_ATTRIBUTES, "hidden": 64, "steps": 5,
                             "alpha": 0.2, "lr": 3e-3, "warmup_steps": 5} | overrides))


def real_means_refresh() -> PrototypeRefresh:
    return PrototypeRefresh(memory_attr="prototypes", features_method="prototype_features", rule="means",
                            every_n_epochs=1, momentum=0.9, normalize=True, report_method="on_prototypes_refreshed")


@pytest.mark.parametrize(("source", "margin"), [("real_means", 0.5), ("batch_flowed", 0.1)])
def test_smoke_fit_flips_attributes_better_than_the_noop(attribute_files, tmp_path, source, margin):
    L.seed_everything(0)
    data, model = data_for(attribute_files), model_for(prototype_source=source)
    trainer = quiet_trainer(6, tmp_path, [real_means_refresh(), FlowMap()], enable_checkpointing=False)
    trainer.fit(model, data)
    metrics = trainer.test(model, data, verbose=False)[0]
    test = data.split_tables("test")
    probes = (model.probe_weights, model.probe_biases)
    noop = transfer_metrics(test["z"], test["z"], test["attributes"], test["target"], probes, data.attribute_names,
                            test["z"], test["attributes"])
    assert noop["flipped_accuracy"] < 0.1
    assert metrics["test/flipped_accuracy"] > noop["flipped_accuracy"] + margin  # the spec's literal form learns less
    assert metrics["test/kept_accuracy"] > 0.6  # chance: 0.5
    assert metrics["test/movement"] > 0.1
    assert (tmp_path / "plots" / "test_flow_map.png").exists()


def test_probes_are_fitted_on_real_probe_embeddings_only(attribute_files, tmp_path, monkeypatch):
    seen = []
    original = attribute_flow_module.fit_probes

    def recording(z, attributes, **kwargs):
        seen.append(z.clone())
        return original(z, attributes, **kwargs)

    monkeypatch.setattr(attribute_flow_module, "fit_probes", recording)
    L.seed_everything(0)
    data, model = data_for(attribute_files), model_for()
    quiet_trainer(1, tmp_path, [real_means_refresh()], enable_checkpointing=False).fit(model, data)
    assert len(seen) == 1  # once, then frozen
    assert torch.equal(seen[0], data.split_tables("probe")["z"])  # real embeddings of the probe split, nothing flowed
    weights = model.probe_weights.clone()
    quiet_trainer(1, tmp_path, [real_means_refresh()], enable_checkpointing=False).fit(model, data)
    assert len(seen) == 1 and torch.equal(model.probe_weights, weights)


def test_prototypes_are_the_normalized_means_of_real_embeddings(attribute_files, tmp_path):
    L.seed_everything(0)
    data, model = data_for(attribute_files), model_for()
    quiet_trainer(1, tmp_path, [real_means_refresh()], enable_checkpointing=False, limit_val_batches=0).fit(model, data)
    train = data.split_tables("train")
    codes = combination_codes(train["attributes"])
    for code in range(2**NUM_ATTRIBUTES):
        mean = torch.nn.functional.normalize(train["z"][codes == code].mean(dim=0), dim=0)
        assert torch.allclose(model.prototypes.prototypes[code], mean, atol=1e-5)
    assert torch.equal(model.filled_codes, torch.arange(2**NUM_ATTRIBUTES))


def test_real_means_without_the_refresh_callback_name_it(attribute_files, tmp_path):
    with pytest.raises(RuntimeError, match="PrototypeRefresh"):
        quiet_trainer(1, tmp_path, enable_checkpointing=False).fit(model_for(), data_for(attribute_files))


def test_resume_is_exact(attribute_files, tmp_path):
    def run(root, stop=(), ckpt_path=None):
        L.seed_everything(0)
        model = model_for(separation_weight=0.2)
        callbacks = [real_means_refresh(), ModelCheckpoint(dirpath=root / "checkpoints", save_last=True),
                     RandomState(), *stop]
        quiet_trainer(3, root, callbacks, limit_val_batches=0).fit(model, data_for(attribute_files), ckpt_path=ckpt_path)
        return model

    straight = run(tmp_path / "straight")
    run(tmp_path / "resumed", [StopAfterEpoch(0)])
    resumed = run(tmp_path / "resumed", ckpt_path=str(tmp_path / "resumed/checkpoints/last.ckpt"))
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_cycle_term_is_the_way_back_to_the_source():
    torch.manual_seed(0)
    model = model_for(prototype_source="batch_flowed", cycle_weight=2.0)
    z = torch.nn.functional.normalize(torch.randn(12, DIM), dim=1)
    source = torch.randint(0, 2, (12, NUM_ATTRIBUTES)).float()
    target = 1 - source
    batch = {"z": z, "attributes": source, "target": target}
    with_cycle = model.training_step(batch, 0)
    model.hparams.cycle_weight = 0.0
    without = model.training_step(batch, 0)
    back = model.move(model.move(z, source, target), target, source)
    expected = 2.0 * (back - z).pow(2).sum(dim=1).mean()
    torch.testing.assert_close(with_cycle - without, expected)
    assert float(expected) > 0
