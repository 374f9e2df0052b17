"""The ``bpfl`` command line: demo, train, test, predict, data, figures, pretrain-toy-clip.

``bpfl demo`` is the README's main job: it generates the offline synthetic dataset, trains the teaching-scale
configuration on the *seen* group of categories, evaluates zero-shot on the *unseen* group (and on held-out
images of the seen group), and writes tables and a Figure-3-style panel to ``runs/demo/``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import typing
from pathlib import Path

#: Honest summary line printed whenever a run used random CLIP weights.
RANDOM_BACKBONE_NOTE = (
    "NOTE: this run used a CLIP backbone with RANDOM weights (no pretrained weights could be had offline). "
    "The numbers show that the pipeline works (mechanics), not what Bayes-PFL achieves: with random features "
    "zero-shot transfer to unseen categories is at chance (pixel AUROC ~0.4-0.5 measured), while held-out images "
    "of the seen categories can be better. Use real CLIP weights (--backbone ViT-L-14-336 --pretrained openai, "
    "or a local file) or the kit's toy-pretrained CLIP (bpfl pretrain-toy-clip) to see transfer."
)


# ------------------------------------------------------------------------------------------ config helpers
def _coerce(value: str, annotation):
    text = str(annotation)
    if value.lower() in {"none", "null"} and "None" in text:
        return None
    if "tuple" in text:
        parts = [p for p in value.replace("(", "").replace(")", "").split(",") if p.strip()]
        inner = float if "float" in text else int
        return tuple(inner(p) for p in parts)
    if "bool" in text:
        if value.lower() in {"1", "true", "yes", "on"}:
            return True
        if value.lower() in {"0", "false", "no", "off"}:
            return False
        raise ValueError(f"expected true/false, got {value!r}")
    if "int" in text and "float" not in text:
        return int(value)
    if "float" in text:
        return float(value)
    return value


def parse_overrides(items: list[str] | None) -> dict:
    """``["kl_weight=0.01", "layers=6,12,18,24"]`` -> typed config overrides."""
    from .config import BayesPFLConfig

    hints = typing.get_type_hints(BayesPFLConfig)
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if key not in hints:
            raise SystemExit(f"--set {key}: unknown config field; known: {', '.join(sorted(hints))}")
        try:
            out[key] = _coerce(value.strip(), hints[key])
        except ValueError as e:
            raise SystemExit(f"--set {item}: {e}")
    return out


def build_config(args) -> "BayesPFLConfig":
    from .config import BayesPFLConfig

    preset = getattr(args, "preset", "paper")
    base = {"paper": BayesPFLConfig.paper, "released": BayesPFLConfig.released_code,
            "teaching": BayesPFLConfig.teaching}[preset]()
    changes = {}
    for field in ("backbone", "image_size", "epochs", "batch_size", "lr", "seed"):
        v = getattr(args, field.replace("-", "_"), None)
        if v is not None:
            changes[field] = v
    if getattr(args, "pretrained", None) is not None:
        changes["pretrained"] = None if args.pretrained in {"random", "none", ""} else args.pretrained
    if getattr(args, "layers", None):
        changes["layers"] = tuple(args.layers)
    if getattr(args, "samples", None):
        changes["test_samples"] = args.samples
    if getattr(args, "precision", None):
        changes["precision"] = args.precision
    if getattr(args, "prompt_design", None):
        changes["prompt_design"] = args.prompt_design
    changes.update(parse_overrides(getattr(args, "set", None)))
    cfg = dataclasses.replace(base, **changes)
    if getattr(args, "ablation", None):
        from .config import with_ablations
        cfg = with_ablations(cfg, args.ablation)
    if "layers" not in changes and cfg.backbone != "ViT-L-14-336":
        from .backbone import default_layers
        cfg = cfg.replace(layers=default_layers(cfg.backbone))
    return cfg


# ------------------------------------------------------------------------------------------ backbone choice
def resolve_auto_backbone(device=None) -> tuple[str, str | None, int, str]:
    """``--backbone auto``: real pretrained CLIP if it can be had, else the toy CLIP, else the tiny random one.

    Returns (name, pretrained, image_size, reason).
    """
    import open_clip

    from .backbone import TINY_BACKBONE, _cached_tag_file, _offline_requested, _reachable

    cfg = open_clip.get_pretrained_cfg("ViT-B-16", "openai")
    if _cached_tag_file(cfg, None):
        return "ViT-B-16", "openai", 224, "OpenAI ViT-B-16 weights found in the local cache (teaching scale, 224 px)"
    if not _offline_requested() and _reachable("huggingface.co"):
        return "ViT-B-16", "openai", 224, "OpenAI ViT-B-16 weights are downloadable (teaching scale, 224 px)"
    try:
        from .toyclip import TOY_ARCH, TOY_IMAGE_SIZE, default_toy_clip_path, recipe_differences
        path = default_toy_clip_path()
        if Path(path).is_file():
            diff = recipe_differences(path)
            stale = ("; built with an older recipe (" + ", ".join(f"{k}={a}, now {b}" for k, (a, b) in diff.items())
                     + f"): rebuild it with `bpfl pretrain-toy-clip --no-resume`" if diff else "")
            return (TOY_ARCH, str(path), TOY_IMAGE_SIZE,
                    f"the kit's toy-pretrained CLIP found at {path} (offline teaching stand-in, not OpenAI CLIP)"
                    + stale)
    except Exception:  # toy CLIP not available in this version
        pass
    return (TINY_BACKBONE, None, 224,
            "no pretrained CLIP weights are cached and the hub is unreachable: offline stand-in "
            f"'{TINY_BACKBONE}' with RANDOM weights (mechanics only)")


def banner(text: str) -> None:
    line = "=" * min(100, max(40, len(text) + 4))
    print(f"{line}\n  {text}\n{line}", flush=True)


# ------------------------------------------------------------------------------------------ commands
def cmd_data(args) -> int:
    from .data import check_dataset, make_synthetic_dataset, read_records, write_meta_json

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
    from .data import open_dataset
    return open_dataset(root, layout=layout, split=split, categories=categories, image_size=image_size,
                        skip_bad=skip_bad)


def cmd_train(args) -> int:
    from .model import BayesPFL
    from .train import seed_everything, train

    cfg = build_config(args)
    if args.selection:
        cfg = cfg.replace(selection=args.selection)
    # under torchrun: build each rank's model on its own GPU (cuda:LOCAL_RANK); only rank 0 talks and writes
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.device in (None, "auto", "cuda"):
        import torch
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    seed_everything(cfg.seed)
    if rank0:
        banner(f"training Bayes-PFL: {cfg.backbone} ({cfg.pretrained or 'random weights'}) at {cfg.image_size}px "
               f"on {args.data} [{args.split} split]")
    if args.split == "test" and rank0:
        print("[bpfl] protocol: training on the auxiliary dataset's TEST split, as the paper does "
              "(train on VisA -> test elsewhere; train on MVTec-AD -> test on VisA).")
    dataset = _open(args.data, args.layout, args.split, args.categories, cfg.image_size, args.skip_bad)
    if rank0:
        print(dataset.summary())
    model = BayesPFL(cfg, device=args.device)
    val_fn = None
    if cfg.selection != "last":
        val_fn = _make_val_fn(args, cfg, dataset)
        if cfg.selection == "aux-val":
            from .train import split_holdout
            dataset, _ = split_holdout(dataset, args.val_fraction, cfg.seed)
    out = Path(args.out)
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.json")
    res = train(model, dataset, out, resume=args.resume, checkpoint_every=args.checkpoint_every,
                max_steps=args.max_steps, progress=not args.quiet and rank0, val_fn=val_fn)
    if rank0:
        print(f"[bpfl] done in {res.seconds:.0f}s; checkpoint: {res.checkpoint}; loss log: {out / 'train_log.csv'}")
    return 0


def _make_val_fn(args, cfg, train_set):
    from .evaluate import evaluate
    from .train import split_holdout

    if cfg.selection == "aux-val":
        _, held = split_holdout(train_set, args.val_fraction, cfg.seed)
        print(f"[bpfl] selection: best pixel AP on a {args.val_fraction:.0%} validation split of the AUXILIARY set")
        data = held
    else:
        if not args.val_data:
            raise SystemExit("--selection released-target needs --val-data ROOT (a TARGET dataset)")
        print("[bpfl] WARNING: selection=released-target picks the epoch by pixel AP on categories of the TARGET "
              "dataset, as the released code does. This is model selection on test data (leakage); "
              "numbers obtained this way are not zero-shot.")
        data = _open(args.val_data, "auto", "test", args.val_categories, cfg.image_size)

    def val(model) -> float:
        r = evaluate(model, data, n_samples=5, progress=False, aupro_variant=None)
        return r.mean("pixel_ap")
    return val


def cmd_test(args) -> int:
    from .evaluate import evaluate, evaluate_seeds, format_mean_std
    from .train import load_model

    overrides = parse_overrides(args.set)
    model = load_model(args.checkpoint, device=args.device, **overrides)
    dataset = _open(args.data, args.layout, "test", args.categories, model.config.image_size, args.skip_bad)
    banner(f"zero-shot test of {args.checkpoint} on {args.data}: {model.backbone.describe()}")
    print(dataset.summary())
    res = evaluate(model, dataset, n_samples=args.samples, seed=args.seeds[0], map_sigma=args.sigma,
                   aupro_variant=args.aupro, out_dir=args.out, overlays=args.overlays,
                   batch_size=args.batch_size)
    print((res.table.drop(index="n_averaged", errors="ignore") * 100).round(1).to_string())
    if len(args.seeds) > 1:
        summary = evaluate_seeds(model, dataset, args.seeds, n_samples=args.samples, map_sigma=args.sigma,
                                 aupro_variant=args.aupro, out_dir=args.out, progress=False,
                                 batch_size=args.batch_size)
        print(f"mean ± std over seeds {args.seeds} (%):")
        print(format_mean_std(summary).to_string())
    if model.backbone.is_random:
        print(RANDOM_BACKBONE_NOTE)
    print(f"[bpfl] results in {args.out}: metrics.csv, metrics.md, scores.csv, provenance.json")
    return 0


def cmd_predict(args) -> int:
    import matplotlib.pyplot as plt
    import numpy as np
    import torch

    from .data import IMAGE_EXTENSIONS, load_image
    from .evaluate import smooth_maps
    from .train import load_model
    from .viz import overlay

    model = load_model(args.checkpoint, device=args.device, **parse_overrides(args.set))
    src = Path(args.input)
    if src.is_dir():
        files = sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise SystemExit(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found under {src}")
    elif src.is_file():
        files = [src]
    else:
        raise SystemExit(f"{src}: no such file or folder")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    gen = torch.Generator().manual_seed(args.seed)
    size = model.config.image_size
    for path in files:
        image = load_image(path, size)
        name = args.class_name or path.parent.name
        if src.is_dir() and args.class_name is None and path.parent == src:
            name = src.name
        with torch.no_grad():
            res = model(image[None], [name], n_samples=args.samples, generator=gen)
        amap = smooth_maps(res.anomaly_map.cpu().numpy(), model.config.map_sigma)[0]
        stem = path.stem
        plt.imsave(out / f"{stem}_heatmap.png", np.clip(amap, 0, 1), cmap="jet", vmin=0, vmax=1)
        plt.imsave(out / f"{stem}_overlay.png", np.clip(overlay(image, amap), 0, 1))
        rows.append({"path": str(path), "class_name": name, "image_score": float(res.image_score[0]),
                     "text_score": float(res.text_score[0]), "map_max": float(res.map_max[0])})
        print(f"{path}: score {rows[-1]['image_score']:.4f} (s_text {rows[-1]['text_score']:.4f}, "
              f"max map {rows[-1]['map_max']:.4f}) -> {out / (stem + '_overlay.png')}")
    import pandas as pd
    pd.DataFrame(rows).to_csv(out / "predictions.csv", index=False)
    if model.backbone.is_random:
        print(RANDOM_BACKBONE_NOTE)
    return 0


def cmd_figures(args) -> int:
    import torch

    from .evaluate import predict_dataset
    from .train import load_model
    from .viz import figure3_panel, save_figure, set_style

    set_style()
    model = load_model(args.checkpoint, device=args.device)
    ds = _open(args.data, "auto", "test", args.categories, model.config.image_size)
    picks = []
    for cat, idx in ds.by_category().items():
        anomalous = [i for i in idx if ds.records[i].label == 1][:args.per_category]
        picks += anomalous
    images, masks, maps, titles = [], [], [], []
    for batch, out in predict_dataset(model, ds, picks, n_samples=args.samples, progress=False):
        images += list(batch["image"])
        masks += list(batch["mask"])
        maps += list(out.anomaly_map.cpu().numpy())
        titles += list(batch["class_name"])
    fig = figure3_panel(images, masks, maps, titles)
    paths = save_figure(fig, Path(args.out) / "figure3_panel")
    print("wrote " + ", ".join(map(str, paths)))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo
    return run_demo(args)


def cmd_pretrain_toy_clip(args) -> int:
    from . import toyclip
    return toyclip.run(args)


# ------------------------------------------------------------------------------------------ parser
def _add_backbone_args(p, default_backbone=None):
    p.add_argument("--backbone", default=default_backbone,
                   help="open_clip architecture (ViT-L-14-336, ViT-B-16, bpfl-tiny, local-dir:PATH)")
    p.add_argument("--pretrained", default=None,
                   help="open_clip tag (openai), a checkpoint FILE, or 'random'")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--layers", type=int, nargs="+", default=None, help="1-based vision blocks (paper: 6 12 18 24)")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: first available)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bpfl", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="offline end-to-end run: data -> train on seen -> zero-shot on unseen")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--data", default="data/synthetic")
    p.add_argument("--backbone", default="auto", help="'auto' (default) or an open_clip architecture")
    p.add_argument("--pretrained", default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--samples", type=int, default=None, help="R at test time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--tiny", action="store_true", help="tiny sizes for tests/CI (seconds, not minutes)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.set_defaults(func=cmd_demo)

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
    p.add_argument("--prompt-design", default=None, choices=["bayes-pfl", "winclip", "aprilgan+", "anomalyclip+"])
    p.add_argument("--ablation", nargs="*", default=None, help="Table 2 / Figure 5 ablations: " + ", ".join(
        ["no-isd", "no-iad", "no-isd-iad", "no-rca", "no-ort", "no-x-cls", "no-x-patch", "no-s-text", "no-s-img",
         "isd-isd", "iad-iad"]))
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

    p = sub.add_parser("test", help="zero-shot evaluation of a checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--layout", default="auto")
    p.add_argument("--categories", nargs="*", default=None)
    p.add_argument("--out", default="runs/test")
    p.add_argument("--samples", type=int, default=None, help="R (default: config.test_samples)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--sigma", type=float, default=None, help="Gaussian sigma for maps (default: config)")
    p.add_argument("--aupro", nargs="+", default=["mvtec"], choices=["mvtec", "cflow"])
    p.add_argument("--overlays", type=int, default=0, help="overlay PNGs per category")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--skip-bad", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE")
    p.set_defaults(func=cmd_test)

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

    p = sub.add_parser("figures", help="Figure-3-style panel of maps for a checkpoint on a dataset")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--categories", nargs="*", default=None)
    p.add_argument("--per-category", type=int, default=2)
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--out", default="runs/figures")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_figures)

    p = sub.add_parser("pretrain-toy-clip", help="pretrain the kit's small offline CLIP on captioned procedural images")
    try:
        from . import toyclip
        toyclip.add_arguments(p)
    except Exception:  # noqa: BLE001 - older checkouts without the toy CLIP
        pass
    p.set_defaults(func=cmd_pretrain_toy_clip)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MPLBACKEND", "Agg")
    args = build_parser().parse_args(argv)
    from .backbone import WeightsNotAvailableError
    from .data import DatasetError
    try:
        return int(args.func(args) or 0)
    except (WeightsNotAvailableError, DatasetError, FileNotFoundError) as e:
        print(f"bpfl {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; checkpoints written so far are kept (resume with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
