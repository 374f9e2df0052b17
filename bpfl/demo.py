"""``bpfl demo``: the offline end-to-end run (the README's main job).

1. generate the synthetic dataset (MVTec layout, two disjoint groups of categories) under ``data/synthetic``;
2. choose the backbone (``--backbone auto``: real CLIP if cached/downloadable, else the kit's toy CLIP if built,
   else the tiny random stand-in) and say which and why;
3. train the teaching-scale configuration on the *seen* group (70 % of its test split; the paper's protocol
   trains on the auxiliary set's test split);
4. evaluate on the held-out 30 % of the seen categories and, zero-shot, on the *unseen* categories;
5. write ``results.md`` / ``results.csv`` (both side by side, with provenance), per-split metrics and scores,
   and a Figure-3-style panel, and print where everything is.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import torch

from .cli import RANDOM_BACKBONE_NOTE, banner, parse_overrides, resolve_auto_backbone
from .config import BayesPFLConfig
from .evaluate import evaluate, markdown_table, predict_dataset, provenance_markdown
from .model import BayesPFL
from .train import seed_everything, split_holdout, train
from .viz import figure3_panel, save_figure, set_style

HEADLINE = ["image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "pixel_aupro"]


def run_demo(args) -> int:
    from .backbone import default_layers
    from .data import SYNTHETIC_GROUPS, SYNTHETIC_PRESETS, make_synthetic_dataset, open_dataset
    from .data.synthetic import MARKER

    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data_root = Path(args.data)
    preset = "tiny" if args.tiny else "default"
    marker = data_root / MARKER
    want = {**SYNTHETIC_PRESETS[preset], "seed": args.seed}
    have = json.loads(marker.read_text()) if marker.exists() else {}
    if any(have.get(k) != v for k, v in want.items()):
        print(f"[demo] generating the synthetic dataset ({preset}) in {data_root} ...", flush=True)
        make_synthetic_dataset(data_root, seed=args.seed, preset=preset)
    if args.backbone == "auto":
        name, pretrained, size, reason = resolve_auto_backbone(args.device)
    else:
        name, pretrained = args.backbone, args.pretrained
        size, reason = 224, "chosen with --backbone/--pretrained"
    banner(f"backbone: {name} ({pretrained or 'RANDOM weights'}) -- {reason}")
    overrides = dict(backbone=name, pretrained=pretrained, image_size=size, layers=default_layers(name),
                     seed=args.seed)
    if pretrained:
        from .toyclip import TOY_ARCH, TOY_BAYESPFL_LR
        if name == TOY_ARCH:  # Bayes-PFL's learning rate on the toy CLIP (the preset's suits random weights)
            overrides["lr"] = TOY_BAYESPFL_LR
    if args.tiny:
        overrides.update(epochs=1, test_samples=2, batch_size=4)
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.samples is not None:
        overrides["test_samples"] = args.samples
    overrides.update(parse_overrides(args.set))
    cfg = BayesPFLConfig.teaching(**overrides)
    seed_everything(cfg.seed)

    seen = open_dataset(data_root, split="test", categories=SYNTHETIC_GROUPS["seen"], image_size=cfg.image_size)
    unseen = open_dataset(data_root, split="test", categories=SYNTHETIC_GROUPS["unseen"], image_size=cfg.image_size)
    train_set, held_out = split_holdout(seen, 0.3, cfg.seed)
    print(f"[demo] train: {len(train_set)} images of the seen categories {SYNTHETIC_GROUPS['seen']} "
          f"(their test split, as the paper's protocol); held out: {len(held_out)}; "
          f"unseen: {len(unseen)} images of {SYNTHETIC_GROUPS['unseen']}", flush=True)

    model = BayesPFL(cfg, device=args.device)
    cfg.save(out / "config.json")
    res = train(model, train_set, out / "train", resume=args.resume, progress=True)
    print(f"[demo] trained in {res.seconds:.0f}s", flush=True)

    results = {}
    for split_name, ds in (("seen (held-out images)", held_out), ("unseen (zero-shot)", unseen)):
        folder = out / ("seen_heldout" if split_name.startswith("seen") else "unseen")
        results[split_name] = evaluate(model, ds, seed=cfg.seed, out_dir=folder, dataset_name=f"synthetic:{split_name}",
                                       protocol="train on seen synthetic categories -> test", progress=False)
    side = pd.DataFrame({k: r.table.loc["mean", [c for c in HEADLINE if c in r.table.columns]]
                         for k, r in results.items()}).T
    side.index.name = "split"
    side.to_csv(out / "results.csv")
    prov = next(iter(results.values())).provenance
    note = RANDOM_BACKBONE_NOTE if model.backbone.is_random else ""
    md = [f"# bpfl demo: Bayes-PFL on the synthetic dataset\n", provenance_markdown(prov), "",
          "Mean over categories (metrics in [0, 1]); per-category tables in `seen_heldout/metrics.md` and "
          "`unseen/metrics.md`.", "", markdown_table(side.round(3)), ""]
    if note:
        md += [f"**{note}**", ""]
    (out / "results.md").write_text("\n".join(md))

    # Figure 3 style: two anomalous images per split
    set_style()
    images, masks, maps, titles = [], [], [], []
    for split_name, ds in (("seen", held_out), ("unseen", unseen)):
        picks = [i for i, r in enumerate(ds.records) if r.label == 1][:: max(1, len(ds) // 6)][:3]
        for batch, o in predict_dataset(model, ds, picks, progress=False):
            images += list(batch["image"])
            masks += list(batch["mask"])
            maps += list(o.anomaly_map.cpu().numpy())
            titles += [f"{split_name}: {c}" for c in batch["class_name"]]
    fig = figure3_panel(images, masks, maps, titles)
    fig_paths = save_figure(fig, out / "figure3_panel")

    print()
    print(markdown_table(side.round(3)))
    print()
    if note:
        print(note)
    print(f"[demo] finished in {time.perf_counter() - t_start:.0f}s. Outputs in {out}/:")
    for p in ["results.md", "results.csv", "config.json", "train/last.pt", "train/train_log.csv",
              "seen_heldout/metrics.md", "unseen/metrics.md", "unseen/scores.csv"] + [x.name for x in fig_paths]:
        print(f"  {out / p}")
    return 0
