"""The ``bpfl`` command line: demo, train, test, predict, data, figures, pretrain-toy-clip.

``bpfl demo`` is the README's main job: it generates the offline synthetic dataset, trains the teaching-scale
configuration on the *seen* group of categories, evaluates zero-shot on the *unseen* group (and on held-out
images of the seen group), and writes tables and a Figure-3-style panel to ``runs/demo/``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from . import toyclip
from .backbone import WeightsNotAvailableError, default_layers
from .backbone_choice import choose_backbone, run_notes
from .bundled_weights import BundledWeightsError
from .config import ABLATIONS, BayesPFLConfig
from .config import build_config as _build_config
from .config import parse_overrides as _parse_overrides
from .console import banner
from .data import (
    DatasetError,
    check_dataset,
    is_synthetic_root,
    make_synthetic_dataset,
    open_dataset,
    read_records,
    write_meta_json,
)
from .demo import run_demo
from .evaluate import evaluate, evaluate_mc_seeds, format_mean_std, selection_score
from .figures import figure3_method_maps, figure3_models
from .model import BayesPFL
from .notebook import tools as notebook_tools
from .predict import find_images, output_stems, predict_images, save_prediction_images, write_predictions_csv
from .seeds import evaluate_checkpoints, finished_checkpoint, mark_finished, seed_dir
from .train import CheckpointError, load_model, read_checkpoint, seed_everything, split_holdout, train
from .viz import figure3_methods, figure3_panel, save_figure, set_style

#: the prompt designs of Figure 4 (bpfl.prompt_designs), by their --prompt-design / --designs names
DESIGNS = ("bayes-pfl", "winclip", "aprilgan+", "anomalyclip+")


# ------------------------------------------------------------------------------------------ config from options
#: --backbone values resolved by bpfl.backbone_choice.choose_backbone (others are open_clip names taken as given)
CHOSEN_BY_RULE = ("auto", "toy", "tiny", "bpfl-toy", "bpfl-tiny")


def parse_overrides(items: list[str] | None) -> dict:
    """``--set key=value ...`` -> typed config overrides; a bad item ends the command with its message."""
    try:
        return _parse_overrides(items)
    except ValueError as e:
        raise SystemExit(f"--set {e}") from None


def build_config(args) -> BayesPFLConfig:
    """The configuration of ``bpfl train``: ``--preset``, the backbone (``--backbone auto`` and the teaching
    preset without ``--backbone`` follow :func:`bpfl.backbone_choice.choose_backbone`), the other options,
    ``--set`` and ``--ablation``."""
    preset = getattr(args, "preset", "paper")
    changes = {}
    backbone = getattr(args, "backbone", None)
    chosen = backbone in CHOSEN_BY_RULE or (backbone is None and preset == "teaching")
    if chosen:
        choice = choose_backbone(backbone or "auto", getattr(args, "pretrained", None),
                                 getattr(args, "image_size", None))
        print(f"[bpfl] backbone: {choice.label()} -- {choice.reason}")
        changes.update(choice.overrides())
    for name in ("backbone", "image_size", "epochs", "batch_size", "lr", "seed"):
        v = getattr(args, name, None)
        if v is not None and not (name == "backbone" and chosen):
            changes[name] = v
    if getattr(args, "pretrained", None) is not None and not chosen:
        changes["pretrained"] = None if args.pretrained in {"random", "none", ""} else args.pretrained
    if getattr(args, "layers", None):
        changes["layers"] = tuple(args.layers)
    if getattr(args, "samples", None):
        changes["test_samples"] = args.samples
    if getattr(args, "precision", None):
        changes["precision"] = args.precision
    if getattr(args, "prompt_design", None):
        changes["prompt_design"] = args.prompt_design
    try:
        return _build_config(preset, changes, getattr(args, "ablation", None), getattr(args, "set", None),
                             default_layers=default_layers)
    except ValueError as e:
        raise SystemExit(f"bpfl: {e}") from None


def print_notes(model_or_config, data: str | Path) -> None:
    """The notes the weights call for (random: mechanics only; toy CLIP off the synthetic set: meaningless)."""
    for note in run_notes(model_or_config, synthetic_data=is_synthetic_root(data)):
        print(note)


# ------------------------------------------------------------------------------------------ commands
def cmd_data(args) -> int:
    if args.data_cmd == "generate":
        t0 = time.perf_counter()
        recs = make_synthetic_dataset(args.root, seed=args.seed, preset=args.preset)
        print(f"wrote {len(recs)} images ({len(set(r.class_name for r in recs))} categories) to {args.root} "
              f"in {time.perf_counter() - t0:.1f}s (seed {args.seed})")
        return 0
    if args.data_cmd == "check":
        report = check_dataset(args.root, layout=args.layout)
        print(report.format())
        return 0 if report.ok else 1
    if args.data_cmd == "meta":
        recs = read_records(args.root, args.layout, split="all")
        path = write_meta_json(recs, args.root, args.name)
        print(f"wrote {path} ({len(recs)} records)")
        return 0
    return 2


def _open(root, layout, split, categories, image_size, skip_bad=False):
    return open_dataset(root, layout=layout, split=split, categories=categories, image_size=image_size,
                        skip_bad=skip_bad)


def cmd_train(args) -> int:
    cfg = build_config(args)
    if args.selection:
        cfg = cfg.replace(selection=args.selection)
    # under torchrun: build each rank's model on its own GPU (cuda:LOCAL_RANK); only rank 0 talks and writes
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.device in (None, "auto", "cuda"):
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # --seeds: one independent training run per seed (the paper's seeds), each in OUT/seed<k>/
    multi = args.seeds is not None
    seeds = list(dict.fromkeys(args.seeds)) if multi else [cfg.seed]
    if rank0:
        banner(f"training Bayes-PFL: {cfg.backbone} ({cfg.pretrained or 'random weights'}) at {cfg.image_size}px "
               f"on {args.data} [{args.split} split]"
               + (f"; {len(seeds)} training runs, seeds {seeds}" if multi else ""))
    if args.split == "test" and rank0:
        print("[bpfl] protocol: training on the auxiliary dataset's TEST split, as the paper does "
              "(train on VisA -> test elsewhere; train on MVTec-AD -> test on VisA).")
    dataset = _open(args.data, args.layout, args.split, args.categories, cfg.image_size, args.skip_bad)
    if rank0:
        print(dataset.summary())
    val_target = None
    if cfg.selection == "released-target":
        if not args.val_data:
            raise SystemExit("--selection released-target needs --val-data ROOT (a TARGET dataset)")
        if rank0:
            print("[bpfl] WARNING: selection=released-target picks the epoch by pixel AP on categories of the TARGET "
                  "dataset, as the released code does. This is model selection on test data (leakage); "
                  "numbers obtained this way are not zero-shot.")
        val_target = _open(args.val_data, "auto", "test", args.val_categories, cfg.image_size)
    out_root = Path(args.out)
    backbone, written = None, []
    for seed in seeds:
        run_cfg = cfg.replace(seed=seed)
        out = seed_dir(out_root, seed) if multi else out_root
        budget = {"epochs": None, "max_steps": args.max_steps}
        if multi and args.resume and finished_checkpoint(out, run_cfg, budget) is not None:
            if rank0:
                print(f"[bpfl] seed {seed}: finished run found in {out}; not retrained")
            written.append(finished_checkpoint(out, run_cfg, budget))
            continue
        train_set, val_fn = dataset, None
        if run_cfg.selection != "last":
            val_set = val_target
            if run_cfg.selection == "aux-val":
                train_set, val_set = split_holdout(dataset, args.val_fraction, run_cfg.seed)
                if rank0:
                    print(f"[bpfl] selection: best pixel AP on a {args.val_fraction:.0%} validation split of the "
                          "AUXILIARY set")
            if rank0:
                print(f"[bpfl] validation at R = {run_cfg.validation_samples or run_cfg.test_samples}")
            val_fn = lambda m, data=val_set: selection_score(m, data)  # noqa: E731
        seed_everything(run_cfg.seed)
        model = BayesPFL(run_cfg, backbone=backbone, device=args.device)
        backbone = model.backbone  # one frozen CLIP for every run
        if rank0:
            out.mkdir(parents=True, exist_ok=True)
            run_cfg.save(out / "config.json")
        res = train(model, train_set, out, resume=args.resume, checkpoint_every=args.checkpoint_every,
                    max_steps=args.max_steps, progress=not args.quiet and rank0, val_fn=val_fn)
        written.append(res.checkpoint)
        if rank0:
            if multi:
                mark_finished(out, run_cfg, budget, res.checkpoint, res.seconds)
            print(f"[bpfl] {'seed %d: ' % seed if multi else ''}done in {res.seconds:.0f}s; checkpoint: "
                  f"{res.checkpoint}; loss log: {out / 'train_log.csv'}")
        del model
    if multi and rank0:
        print(f"[bpfl] {len(written)} independent training runs (seeds {seeds}). Mean ± std over them: "
              f"bpfl test --checkpoint {' '.join(str(p) for p in written)} --data TARGET")
    return 0


def cmd_test(args) -> int:
    mc_seeds = args.mc_seeds
    if args.seeds is not None:
        print("[bpfl] note: --seeds means Monte-Carlo redraws of the prompt samples of ONE trained model (it is "
              "--mc-seeds now). The paper's seeds are independent training runs: train them with "
              "`bpfl train --seeds 0 1 2 3 4` and pass every checkpoint to --checkpoint.")
        if mc_seeds is not None and mc_seeds != args.seeds:
            raise SystemExit("give --mc-seeds or its old name --seeds, not both")
        mc_seeds = args.seeds
    mc_seeds = mc_seeds or [0]
    overrides = parse_overrides(args.set)
    checkpoints = args.checkpoint
    if len(checkpoints) > 1:  # independent training runs: mean ± std over them
        if len(mc_seeds) > 1:
            raise SystemExit("several --checkpoint files give the spread over training runs, several --mc-seeds the "
                             "spread over Monte-Carlo redraws of one model: choose one")
        size = BayesPFLConfig.from_dict(read_checkpoint(checkpoints[0])["config"]).replace(**overrides).image_size
        dataset = _open(args.data, args.layout, "test", args.categories, size, args.skip_bad)
        name = Path(args.data).name
        banner(f"zero-shot test of {len(checkpoints)} training runs on {args.data}")
        print(dataset.summary())
        runs = evaluate_checkpoints(checkpoints, {name: dataset}, args.out, device=args.device,
                                    config_overrides=overrides, n_samples=args.samples, mc_seed=mc_seeds[0],
                                    batch_size=args.batch_size, aupro_variant=args.aupro, map_sigma=args.sigma,
                                    overlays=args.overlays)
        shown = runs.runs.drop(columns=["checkpoint"]).astype(float)
        print((shown.drop(columns=["seed"]) * 100).round(1).assign(seed=shown["seed"].astype(int)).to_string())
        print(f"{runs.caption} (%):")
        print(runs.table.T.to_string())
        config = BayesPFLConfig.from_dict(read_checkpoint(checkpoints[0])["config"])
        print_notes(config, args.data)
        print(f"[bpfl] results in {args.out}: runs.csv, summary.csv, summary.md; per run <run>/eval/{name}/")
        return 0
    model = load_model(checkpoints[0], device=args.device, **overrides)
    dataset = _open(args.data, args.layout, "test", args.categories, model.config.image_size, args.skip_bad)
    banner(f"zero-shot test of {checkpoints[0]} on {args.data}: {model.backbone.describe()}")
    print(dataset.summary())
    res = evaluate(model, dataset, n_samples=args.samples, seed=mc_seeds[0], map_sigma=args.sigma,
                   aupro_variant=args.aupro, out_dir=args.out, overlays=args.overlays,
                   batch_size=args.batch_size)
    print((res.table.drop(index="n_averaged", errors="ignore") * 100).round(1).to_string())
    if len(mc_seeds) > 1:
        summary = evaluate_mc_seeds(model, dataset, mc_seeds, n_samples=args.samples, map_sigma=args.sigma,
                                    aupro_variant=args.aupro, out_dir=args.out, progress=False,
                                    batch_size=args.batch_size)
        print(f"{summary.attrs['caption']} (%), NOT the spread over training runs:")
        print(format_mean_std(summary).to_string())
    print_notes(model, args.data)
    print(f"[bpfl] results in {args.out}: metrics.csv, metrics.md, scores.csv, provenance.json"
          + (", mc_seeds.csv, mc_seeds_summary.csv/.md" if len(mc_seeds) > 1 else ""))
    return 0


def cmd_predict(args) -> int:
    """``bpfl predict``: :func:`bpfl.predict.predict_images`, printing each score and saving its PNGs.

    Unreadable images are skipped and listed on stderr at the end; predictions.csv holds the readable ones;
    the exit status is 1 when any image was skipped.
    """
    src = Path(args.input)
    try:
        files = find_images(src)
    except ValueError as e:
        raise SystemExit(f"bpfl predict: error: {e}") from None
    model = load_model(args.checkpoint, device=args.device, **parse_overrides(args.set))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stems = output_stems(files, src if src.is_dir() else None)

    def show(pred) -> None:
        _, overlay_png = save_prediction_images(pred, out, stems[pred.path])
        print(f"{pred.path}: score {pred.image_score:.4f} (s_text {pred.text_score:.4f}, "
              f"max map {pred.map_max:.4f}) -> {overlay_png}")

    report = predict_images(model, files, class_name=args.class_name, n_samples=args.samples, seed=args.seed,
                            on_prediction=show)
    csv_path = write_predictions_csv(report.rows, out / "predictions.csv")
    print(f"[bpfl] predicted {len(report.rows)} of {len(files)} image(s); scores in {csv_path}")
    print_notes(model, args.input)
    if report.failures:
        print(f"bpfl predict: skipped {len(report.failures)} of {len(files)} image(s) that could not be read "
              "(fix or remove them and run again):", file=sys.stderr)
        for failure in report.failures:
            print(f"  {failure.path}: {failure.reason}", file=sys.stderr)
        return 1
    return 0


def cmd_figures(args) -> int:
    set_style()
    known = DESIGNS
    given = {}
    for item in args.design_checkpoint or []:
        name, _, path = item.partition("=")
        if name not in known or not path:
            raise SystemExit(f"--design-checkpoint expects NAME=PATH with NAME one of {', '.join(known)}; "
                             f"got {item!r}")
        given[name] = path
    checkpoints = {}
    for design in dict.fromkeys(args.designs):
        path = given.get(design) or (args.checkpoint if design == "bayes-pfl" else None)
        if path is None and design != "winclip":
            raise SystemExit(f"{design} is trained: give its checkpoint ("
                             + ("--checkpoint" if design == "bayes-pfl" else f"--design-checkpoint {design}=PATH")
                             + "); only winclip needs none")
        checkpoints[design] = path
    models = figure3_models(checkpoints, device=args.device)
    ds = _open(args.data, "auto", "test", args.categories, next(iter(models.values())).config.image_size)
    picks = []
    for idx in ds.by_category().values():
        picks += [i for i in idx if ds.records[i].label == 1][:args.per_category]
    images, masks, titles, maps = figure3_method_maps(models, ds, picks, n_samples=args.samples)
    limits = (0.0, 1.0) if args.limits == "probability" else "data"
    out = Path(args.out)
    paths = save_figure(figure3_methods(images, masks, maps, titles, limits=limits), out / "figure3_methods")
    if "bayes-pfl" in maps:  # the single-method panel (image / ground truth / map / overlay), as before
        paths += save_figure(figure3_panel(images, masks, maps["bayes-pfl"], titles), out / "figure3_panel")
    print("wrote " + ", ".join(map(str, paths)))
    return 0


def cmd_demo(args) -> int:
    return run_demo(args)


def cmd_pretrain_toy_clip(args) -> int:
    return toyclip.run(args)


def cmd_notebooks(args) -> int:
    return notebook_tools.run(args)


# ------------------------------------------------------------------------------------------ parser
def _add_backbone_args(p, default_backbone=None):
    p.add_argument("--backbone", default=default_backbone,
                   help="'auto' (real CLIP if cached, else the bundled toy CLIP), 'toy', 'tiny' (random weights), "
                        "or an open_clip architecture (ViT-L-14-336, ViT-B-16, local-dir:PATH); default: the "
                        "preset's (paper: ViT-L-14-336/openai; teaching: auto)")
    p.add_argument("--pretrained", default=None,
                   help="open_clip tag (openai), a checkpoint FILE, or 'random'")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--layers", type=int, nargs="+", default=None, help="1-based vision blocks (paper: 6 12 18 24)")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: first available)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None)


def _add_demo_parser(sub) -> None:
    """``bpfl demo``."""
    p = sub.add_parser("demo", help="offline end-to-end run: data -> train on seen -> zero-shot on unseen")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--data", default="data/synthetic")
    p.add_argument("--backbone", default="auto",
                   help="'auto' (default: real CLIP if cached, else the bundled toy CLIP), 'toy', 'tiny' (random "
                        "weights) or an open_clip architecture")
    p.add_argument("--pretrained", default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--samples", type=int, default=None, help="R at test time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--tiny", action="store_true", help="tiny sizes for tests/CI (seconds, not minutes)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.set_defaults(func=cmd_demo)


def _add_train_parser(sub) -> None:
    """``bpfl train``."""
    p = sub.add_parser("train", help="train on an auxiliary dataset (paper protocol: its test split)")
    p.add_argument("--data", required=True)
    p.add_argument("--layout", default="auto")
    p.add_argument("--split", default="test", choices=["test", "train", "all"])
    p.add_argument("--categories", nargs="*", default=None)
    p.add_argument("--out", default="runs/train")
    p.add_argument("--preset", default="paper", choices=["paper", "released", "teaching"])
    _add_backbone_args(p)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="one independent training run per seed, into OUT/seed<k>/ (the paper's 5 seeds: "
                        "--seeds 0 1 2 3 4); with --resume, finished runs are kept and killed ones continue")
    p.add_argument("--prompt-design", default=None, choices=DESIGNS)
    p.add_argument("--ablation", nargs="*", default=None,
                   help="Table 2 / Figure 5 ablations: " + ", ".join(ABLATIONS))
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N steps")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--selection", choices=["last", "aux-val", "released-target"], default=None)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--val-data", default=None, help="TARGET data for --selection released-target")
    p.add_argument("--val-categories", nargs="*", default=None)
    p.add_argument("--skip-bad", action="store_true", help="leave out unreadable items (counted) instead of failing")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="any BayesPFLConfig field, e.g. kl_weight=0.01")
    p.set_defaults(func=cmd_train)


def _add_test_parser(sub) -> None:
    """``bpfl test``."""
    p = sub.add_parser("test", help="zero-shot evaluation of one checkpoint, or of several training runs")
    p.add_argument("--checkpoint", required=True, nargs="+",
                   help="one checkpoint, or one per training run (mean ± std over the runs: the paper's seeds)")
    p.add_argument("--data", required=True)
    p.add_argument("--layout", default="auto")
    p.add_argument("--categories", nargs="*", default=None)
    p.add_argument("--out", default="runs/test")
    p.add_argument("--samples", type=int, default=None, help="R (default: config.test_samples)")
    p.add_argument("--mc-seeds", type=int, nargs="+", default=None,
                   help="Monte-Carlo sampling seeds: several give mean ± std over redraws of the prompt samples of "
                        "ONE trained model (not training runs; default 0)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="old name of --mc-seeds (Monte-Carlo redraws)")
    p.add_argument("--sigma", type=float, default=None, help="Gaussian sigma for maps (default: config)")
    p.add_argument("--aupro", nargs="+", default=["mvtec"], choices=["mvtec", "cflow"])
    p.add_argument("--overlays", type=int, default=0, help="overlay PNGs per category")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--skip-bad", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE")
    p.set_defaults(func=cmd_test)


def _add_predict_parser(sub) -> None:
    """``bpfl predict``."""
    p = sub.add_parser("predict", help="one image or a folder -> score, heatmap and overlay PNGs")
    p.add_argument("input")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--class-name", default=None, help="object words for the prompt (default: parent folder)")
    p.add_argument("--out", default="runs/predict")
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE")
    p.set_defaults(func=cmd_predict)


def _add_data_parser(sub) -> None:
    """``bpfl data``."""
    p = sub.add_parser("data", help="generate the synthetic dataset, check a dataset, write meta.json")
    dsub = p.add_subparsers(dest="data_cmd", required=True)
    g = dsub.add_parser("generate")
    g.add_argument("root")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--preset", default="default", choices=["default", "tiny"])
    c = dsub.add_parser("check")
    c.add_argument("root")
    c.add_argument("--layout", default="auto")
    m = dsub.add_parser("meta")
    m.add_argument("root")
    m.add_argument("--name", default=None)
    m.add_argument("--layout", default="auto")
    p.set_defaults(func=cmd_data)


def _add_figures_parser(sub) -> None:
    """``bpfl figures``."""
    p = sub.add_parser("figures", help="Figure 3: anomaly maps of Bayes-PFL and the baselines on the same images")
    p.add_argument("--checkpoint", default=None, help="the Bayes-PFL checkpoint")
    p.add_argument("--designs", nargs="+", default=["bayes-pfl"],
                   choices=DESIGNS,
                   help="one row per method (winclip needs no checkpoint: training-free)")
    p.add_argument("--design-checkpoint", nargs="*", default=None, metavar="NAME=PATH",
                   help="checkpoints of the other trained designs, e.g. aprilgan+=runs/ag/last.pt")
    p.add_argument("--limits", choices=["probability", "data"], default="probability",
                   help="the one colour scale of all panels: 0-1 (default) or the min-max over all maps")
    p.add_argument("--data", required=True)
    p.add_argument("--categories", nargs="*", default=None)
    p.add_argument("--per-category", type=int, default=2)
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--out", default="runs/figures")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_figures)


def _add_pretrain_toy_clip_parser(sub) -> None:
    """``bpfl pretrain-toy-clip``."""
    p = sub.add_parser("pretrain-toy-clip", help="pretrain the kit's small offline CLIP on captioned procedural images")
    toyclip.add_arguments(p)
    p.set_defaults(func=cmd_pretrain_toy_clip)


def _add_notebooks_parser(sub) -> None:
    """``bpfl notebooks``."""
    p = sub.add_parser("notebooks", help="student copies of the notebooks (no solutions); static HTML rendering")
    notebook_tools.add_arguments(p)
    p.set_defaults(func=cmd_notebooks)


def build_parser() -> argparse.ArgumentParser:
    """The ``bpfl`` parser: one sub-command per ``_add_<command>_parser``."""
    parser = argparse.ArgumentParser(prog="bpfl", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo_parser(sub)
    _add_train_parser(sub)
    _add_test_parser(sub)
    _add_predict_parser(sub)
    _add_data_parser(sub)
    _add_figures_parser(sub)
    _add_pretrain_toy_clip_parser(sub)
    _add_notebooks_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MPLBACKEND", "Agg")
    for stream in (sys.stdout, sys.stderr):  # file names in any script, even undecodable ones, can be printed
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (WeightsNotAvailableError, DatasetError, FileNotFoundError, CheckpointError, BundledWeightsError) as e:
        print(f"bpfl {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; checkpoints written so far are kept (resume with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
