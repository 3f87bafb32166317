"""Spec 004 phases P1 to P5 on the CPU profiles, scored by their phase gates.

    python benchmarks/visual_latent.py --out benchmarks/results/visual_latent.json
    python benchmarks/visual_latent.py --runs p1 p2 p2_scratch p1_spec_var p3 p3_spec_raw --out FILE.json
    python benchmarks/visual_latent.py --runs p5 --start p4=DIR/p4/checkpoints/last.ckpt --out FILE.json

Each run is exactly what the command line runs (``cli.py fit`` with the phase config plus its CPU
profile); ``p2`` starts from the last checkpoint of ``p1``, ``p2_scratch`` is the main job as
``make demo`` runs it, ``p1_spec_var`` is P1 with the anti-collapse term off (the spec's literal
priors); ``p3`` starts from the last checkpoint of ``p2`` (or of ``p2_scratch`` without it), and
``p3_spec_raw`` is P3 with the spec's literal invariance term on raw ``z``; ``p4`` trains the decoder on the
frozen encoder of ``p3`` (or ``p2``, ``p2_scratch``), and ``p4_seed1``, ``p4_seed2`` do the same under other
seeds (the decoder's weights, the corpus and its draws; the encoder is the same), and ``p4_pixel_memory`` reads
``V`` as the spec flattens it, a memory token per pixel (the configs read 8 x 8 patches). ``p2_spec_latent`` is the
main job with the spec's literal latent (the grid head alone, its maps read raw), ``p4_spec_latent`` P4 on it.
``p2_token_blobs`` is the main job with a Gaussian blob per token over the grid head's texture
(``latent_head: grid_and_token_blobs``), ``p2_token_blobs_shapes`` the same with shape-flip negatives too, and
``p4_token_blobs``, ``p4_token_blobs_shapes`` P4 on each (with the default data). ``p2_shapes`` is the main job with
shape-flip negatives, ``p2_decoder`` the main job with P4's decoder and its loss (``L_dec``) trained beside InfoNCE,
and ``p4_shapes``, ``p4_after_p2_decoder`` P4 on each (a fresh decoder, the default data);
``p2_decoder_hiding_content`` is ``p2_decoder`` with no content word shown in its decoder's prefix (none can
be copied from it), ``p4_after_p2_decoder_hiding_content`` P4 on it. ``p2_token_warmup`` trains P2's Transformer
alone on P2's InfoNCE (``modules.token_contrastive``; no gate), ``p2_warm`` is the main job started from its
Transformer (rotary positions), ``p4_warm`` P4 on that. ``p5`` trains every network of ``p4``
with P5's loss stack (round trip and copy suppression), ``p5_seed1`` and ``p5_seed2`` the same from the same P4
checkpoint under other seeds. Prints a markdown table of every gate
criterion's value and writes
``{"runs": [{"run", "phase", "passed", "wall_seconds", "criteria": [...]}], ...}``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from benchmarks.record import write_record  # noqa: E402
from callbacks.latent_prediction_writer import LatentPredictionWriter  # noqa: E402
from cli import main as cli_main  # noqa: E402
from text.blocks import COUNTERFACTUAL_KINDS
from text.blocks.sentences import CONTENT_KINDS

P1 = ["configs/p1_priors.yaml", "configs/profiles/p1_priors_cpu.yaml"]
P2 = ["configs/p2_contrastive.yaml", "configs/profiles/p2_contrastive_cpu.yaml"]
P3 = ["configs/p3_invariance.yaml", "configs/profiles/p3_invariance_cpu.yaml"]
P4 = ["configs/p4_decoder.yaml", "configs/profiles/p4_decoder_cpu.yaml"]
P5 = ["configs/p5_round_trip.yaml", "configs/profiles/p5_round_trip_cpu.yaml"]
TOKEN_WARMUP = ["configs/p2_token_warmup.yaml", "configs/profiles/p2_token_warmup_cpu.yaml"]
# P2 and P4 on the warm-started Transformer: its rotary positions, and P2 reads only the Transformer of the warm-up.
ROPE = ["--model.init_args.positions", "rope"]
# The spec's literal latent: the grid head alone, read with each map's brightness and contrast (the configs'
# default is slot blobs over that texture, read through standardized maps).
SPEC_LATENT = ["--model.init_args.latent_head", "grid", "--model.init_args.standardize_maps", "false"]
# A blob per token over the grid head's texture (modules.networks.slot_splat.TokenSplatHead), and a fifth kind of
# training negative that flips one group's shape (every view gets one of each of the five kinds).
TOKEN_BLOBS = ["--model.init_args.latent_head", "grid_and_token_blobs"]
SHAPE_NEGATIVES = ["--data.init_args.counterfactual_kinds", "[color, relation, count, swap_arguments, shape]",
                   "--data.init_args.counterfactuals_per_scene", "30"]
# P2 with the spec's L_dec of P4 and P5 beside InfoNCE (gamma 0.7): a decoder of P4's CPU size writes each sentence
# back from its latent, which asks the latent for the words InfoNCE may leave out.
P2_DECODER = ["--model.init_args.decoder_depth", "2", "--model.init_args.decoder_dim", "128",
              "--model.init_args.decoder_heads", "4", "--model.init_args.decoder_ffn_dim", "512",
              "--model.init_args.decoder_weight", "0.7"]
# Per run: its configs, its options, and the runs whose last checkpoint it may start from (the first present).
RUNS = {
    "p1": (P1, [], ()),
    "p2": (P2, [], ("p1",)),
    "p2_scratch": (P2, [], ()),
    "p1_spec_var": (P1, ["--model.init_args.text_variance_weight", "0.0"], ()),
    "p3": (P3, [], ("p2", "p2_scratch")),
    "p3_spec_raw": (P3, ["--model.init_args.invariance_unit", "false"], ("p2", "p2_scratch")),
    "p4": (P4, [], ("p3", "p2", "p2_scratch")),
    **{f"p4_seed{seed}": (P4, ["--seed_everything", str(seed), "--data.init_args.seed", str(seed)],
                          ("p3", "p2", "p2_scratch")) for seed in (1, 2)},
    "p4_pixel_memory": (P4, ["--model.init_args.decoder_patch_size", "1"], ("p3", "p2", "p2_scratch")),
    "p2_spec_latent": (P2, SPEC_LATENT, ()),
    "p4_spec_latent": (P4, SPEC_LATENT, ("p2_spec_latent",)),
    "p2_token_blobs": (P2, TOKEN_BLOBS, ()),
    "p4_token_blobs": (P4, TOKEN_BLOBS, ("p2_token_blobs",)),
    "p2_token_blobs_shapes": (P2, TOKEN_BLOBS + SHAPE_NEGATIVES, ()),
    "p4_token_blobs_shapes": (P4, TOKEN_BLOBS, ("p2_token_blobs_shapes",)),
    "p2_shapes": (P2, SHAPE_NEGATIVES, ()),
    "p4_shapes": (P4, [], ("p2_shapes",)),
    "p2_decoder": (P2, P2_DECODER, ()),
    "p4_after_p2_decoder": (P4, [], ("p2_decoder",)),
    "p2_decoder_hiding_content": (P2, [*P2_DECODER, "--model.init_args.decoder_hides_content", "true"], ()),
    "p4_after_p2_decoder_hiding_content": (P4, [], ("p2_decoder_hiding_content",)),
    "p2_token_warmup": (TOKEN_WARMUP, [], ()),
    "p2_warm": (P2, [*ROPE, "--model.init_args.init_prefixes", "[encoder.encoder.]"], ("p2_token_warmup",)),
    "p4_warm": (P4, ROPE, ("p2_warm",)),
    "p5": (P5, [], ("p4",)),
    **{f"p5_seed{seed}": (P5, ["--seed_everything", str(seed), "--data.init_args.seed", str(seed)], ("p4",))
       for seed in (1, 2)},
}


RECONSTRUCTED = 10  # held-out sentences whose reconstructions a decoder run reports
# Read at the last validation beside the gate: where the latent's across-sentence variance lies, and the
# cosine gap per counterfactual kind, since the gate's averaged gap passes while one kind stays at 0 (whether
# the latent tells who is related to whom: swapped relation arguments).
REPORTED = ("r1", "r1_with_counterfactuals", "cos_gap", *(f"cos_gap_{kind}" for kind in COUNTERFACTUAL_KINDS), "text_dependence",
            "spatial_text_dependence", "template_share", "shift_cos_1px", "shift_cos_2px", "shift_cos_4px",
            "content_accuracy",
            "content_exact_accuracy", "content_exact_ceiling", "content_accuracy_shuffled",
            "content_accuracy_wrong_latent", "function_accuracy", "shuffle_ce_increase",
            "content_attention_entropy", *(f"content_accuracy_{kind}" for kind in CONTENT_KINDS),
            *(f"{name}{suffix}" for name in ("graph_f1", "rouge_l", "round_trip_cosine", "round_trip_cosine_other",
                                             "unparsed_share", "verbatim_share") for suffix in ("", "_greedy")))


def start_options(name: str, done: list[str], workdir: Path, given: dict[str, str]) -> list[str]:
    """``init_from`` the last checkpoint of the first of the run's starts done before it in this invocation, or
    else the checkpoint ``--start`` gives for one of them."""
    starts = RUNS[name][2]
    if not starts:
        return []
    start = next((run for run in starts if run in done), None)
    if start is not None:
        return ["--model.init_args.init_from", str(workdir / start / "checkpoints" / "last.ckpt")]
    start = next((run for run in starts if run in given), None)
    if start is None:
        raise SystemExit(f"run {name} starts from the checkpoint of one of {list(starts)}: run one before it or "
                         f"give its checkpoint with --start")
    return ["--model.init_args.init_from", given[start]]


def run(name: str, workdir: Path, seed: int, extra: list[str], done: list[str], given: dict[str, str]) -> dict:
    configs, options, _ = RUNS[name]
    if "--seed_everything" in options:  # a run under its own seed
        seed = int(options[options.index("--seed_everything") + 1])
    root = workdir / name
    args = ["fit"]
    for config in configs:
        args += ["--config", str(REPO / config)]
    args += ["--seed_everything", str(seed), "--data.init_args.seed", str(seed),
             "--trainer.default_root_dir", str(root), "--trainer.logger", "false",
             "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    args += [*options, *start_options(name, done, workdir, given), *extra]
    start = time.perf_counter()
    cli = cli_main(args)
    seconds = time.perf_counter() - start
    gated = (root / "gate_report.json").exists()  # the warm-up of P2's Transformer has no gate
    report = json.loads((root / "gate_report.json").read_text()) if gated else {
        "phase": "no gate", "passed": None, "evaluations": None, "global_step": cli.trainer.global_step,
        "criteria": []}
    last = cli.trainer.callback_metrics
    result = {"run": name, "seed": seed, "phase": report["phase"], "passed": report["passed"],
              "evaluations": report["evaluations"], "global_step": report["global_step"],
              "wall_seconds": seconds, "criteria": report["criteria"],
              "metrics": {key: float(last[f"val/{key}"]) for key in REPORTED if f"val/{key}" in last}}
    if getattr(cli.model, "decoder", None) is not None:
        result["reconstructions"] = reconstructions(cli, root)
        with (root / "plots" / "round_trips_latest.csv").open() as rows:
            result["round_trips"] = list(csv.DictReader(rows))
    return result


def reconstructions(cli, root: Path, count: int = RECONSTRUCTED) -> list[dict]:
    """The first ``count`` held-out test sentences through ``cli.py predict`` on the trained model: each input,
    its greedy reconstruction from the latent alone and its teacher-forced content accuracies."""
    data = cli.datamodule
    sentences = [item["sentence"] for item in data.eval_pack["test"][:count]]
    path = root / "reconstruct.txt"
    path.write_text("\n".join(sentences) + "\n")
    options = {key: value for key, value in data.hparams.items() if not key.startswith("_")}
    predict_data = type(data)(**(options | {"predict_file": str(path)}))
    predict_data.load_state_dict(data.state_dict())  # the tokenizer the weights read
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(root / "predict"), callbacks=[LatentPredictionWriter()])
    trainer.predict(cli.model, predict_data, return_predictions=False)
    with (root / "predict" / "reconstructions.csv").open() as handle:
        return [{key: row[key] for key in ("input", "output")}
                | {key: float(row[key]) for key in ("content_accuracy", "content_exact_accuracy")}
                for row in csv.DictReader(handle)]


def markdown(results: list[dict]) -> str:
    names = list(dict.fromkeys(c["name"] for r in results for c in r["criteria"]))
    lines = ["| run | phase | passed | steps | wall s | " + " | ".join(names) + " |",
             "|---|---|---|---|---|" + "---|" * len(names)]
    for r in results:
        by_name = {c["name"]: c for c in r["criteria"]}
        cells = []
        for name in names:
            c = by_name.get(name)
            cells.append("" if c is None else f"{c['value']:.3g} {'✓' if c['passed'] else '✗'}")
        lines.append(f"| {r['run']} | {r['phase']} | {r['passed']} | {r['global_step']} | "
                     f"{r['wall_seconds']:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def metrics_table(results: list[dict]) -> str:
    lines = ["| run | " + " | ".join(REPORTED) + " |", "|---|" + "---|" * len(REPORTED)]
    for r in results:
        cells = [f"{r['metrics'][key]:.3g}" if key in r["metrics"] else "" for key in REPORTED]
        lines.append(f"| {r['run']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def reconstructions_table(rows: list[dict]) -> str:
    lines = ["| input | reconstruction (greedy, from the latent) | content acc. (meaning) | content acc. (exact) |",
             "|---|---|---|---|"]
    lines += [f"| {r['input']} | {r['output']} | {r['content_accuracy']:.2f} | {r['content_exact_accuracy']:.2f} |"
              for r in rows]
    return "\n".join(lines)


def round_trips_table(rows: list[dict]) -> str:
    lines = ["| input | written from the latent | Graph F1 | ROUGE-L |", "|---|---|---|---|"]
    lines += [f"| {r['input']} | {r['output']} | {float(r['graph_f1']):.2f} | {float(r['rouge_l']):.2f} |"
              for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=["p1", "p2"], choices=list(RUNS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--start", action="append", default=[], metavar="RUN=CHECKPOINT",
                        help="the checkpoint of a run done earlier, for the runs that start from it")
    args, extra = parser.parse_known_args()  # the rest go to cli.py, e.g. --trainer.max_epochs=4
    given = dict(start.split("=", 1) for start in args.start)
    for index, name in enumerate(args.runs):
        if RUNS[name][2] and not set(RUNS[name][2]) & (set(args.runs[:index]) | set(given)):
            parser.error(f"run {name} starts from the checkpoint of one of {list(RUNS[name][2])}: list one before it "
                         f"or give its checkpoint with --start")
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as temporary:
        workdir = Path(args.workdir or temporary)
        results = []
        for name in args.runs:
            results.append(run(name, workdir, args.seed, extra, args.runs[:len(results)], given))
            print(json.dumps({k: v for k, v in results[-1].items() if k != "criteria"}), flush=True)

    print(markdown(results))
    print()
    print(metrics_table(results))
    for result in results:
        if "reconstructions" in result:
            print(f"\n{result['run']}:\n" + reconstructions_table(result["reconstructions"]))
        if result["phase"] == "P5":
            print(f"\n{result['run']}, round trips:\n" + round_trips_table(result["round_trips"]))
    write_record(args.out, {"results": results}, args.threads)


if __name__ == "__main__":
    main()
