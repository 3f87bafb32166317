"""RandomState under 2-process DDP: the ranks draw different numbers, and each resumes its own generators."""

import json

from tests.test_cli import cli


def draws_args(root, epochs: int) -> list[str]:
    return ["--model", "tests.tiny_module.RandomDraws", "--data", "tests.tiny_module.GeneratorFreeData",
            "--trainer.default_root_dir", str(root), "--trainer.logger", "false",
            "--trainer.max_epochs", str(epochs), "--trainer.strategy", "ddp", "--trainer.devices", "2",
            "--trainer.accelerator", "cpu"]


def draws(root) -> list[list[float]]:
    return [json.loads((root / f"draws.rank{rank}.json").read_text()) for rank in (0, 1)]


def test_ranks_draw_differently_and_each_resumes_its_own_generators(tmp_path):
    cli("fit", *draws_args(tmp_path / "straight", epochs=2))
    cli("fit", *draws_args(tmp_path / "split", epochs=1))
    cli("fit", *draws_args(tmp_path / "split", epochs=2), "--ckpt_path", "last")
    straight, resumed = draws(tmp_path / "straight"), draws(tmp_path / "split")
    # 4 items in batches of 2 over 2 ranks: one step per epoch on each rank
    assert [len(rank_draws) for rank_draws in straight] == [2, 2]
    assert straight[0][0] != straight[1][0] and straight[0][1] != straight[1][1]  # per-step draws differ by rank
    # the resumed run draws epoch 2 only, each rank from its own saved generators
    assert resumed == [straight[0][1:], straight[1][1:]]
