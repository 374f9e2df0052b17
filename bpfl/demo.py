"""``bpfl demo``: the offline end-to-end run (the README's main job).

1. generate the synthetic dataset (MVTec layout, two disjoint groups of categories) under ``data/synthetic``;
2. choose the backbone (``--backbone auto``: real CLIP if cached/downloadable, else the kit's bundled toy CLIP;
   :func:`bpfl.backbone_choice.choose_backbone`) and say which and why;
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

from .backbone_choice import choose_backbone, run_notes, set_cpu_threads
from .config import BayesPFLConfig, parse_overrides
from .console import banner
from .data import SYNTHETIC_GROUPS, ensure_synthetic, open_dataset
from .evaluate import evaluate, markdown_table, predict_dataset, provenance_markdown
from .model import BayesPFL
from .toyclip.pretrain import peak_rss_mb
from .train import seed_everything, split_holdout, train
from .viz import figure3_panel, pick_examples, save_figure, set_style

HEADLINE = ["image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "pixel_aupro"]


def run_demo(args) -> int:
    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data_root = ensure_synthetic(args.data, "tiny" if args.tiny else "default", seed=args.seed)
    choice = choose_backbone(args.backbone, args.pretrained)
    banner(f"backbone: {choice.label()} -- {choice.reason}")
    overrides = dict(choice.overrides(), seed=args.seed)
    if args.tiny:
        overrides.update(epochs=1, test_samples=2, batch_size=4)
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.samples is not None:
        overrides["test_samples"] = args.samples
    try:
        overrides.update(parse_overrides(args.set))
    except ValueError as e:
        raise SystemExit(f"bpfl demo: --set {e}") from None
    cfg = BayesPFLConfig.teaching(**overrides)
    seed_everything(cfg.seed)

    seen = open_dataset(data_root, split="test", categories=SYNTHETIC_GROUPS["seen"], image_size=cfg.image_size)
    unseen = open_dataset(data_root, split="test", categories=SYNTHETIC_GROUPS["unseen"], image_size=cfg.image_size)
    train_set, held_out = split_holdout(seen, 0.3, cfg.seed)
    print(f"[demo] train: {len(train_set)} images of the seen categories {SYNTHETIC_GROUPS['seen']} "
          f"(their test split, as the paper's protocol); held out: {len(held_out)}; "
          f"unseen: {len(unseen)} images of {SYNTHETIC_GROUPS['unseen']}", flush=True)

    model = BayesPFL(cfg, device=args.device)
    threads = set_cpu_threads(cfg.backbone, model.device)
    print(f"[demo] device {model.device}, torch threads {threads}", flush=True)
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
    counts = {"seen (held-out images)": held_out, "unseen (zero-shot)": unseen}
    side.insert(0, "images", [f"{len(counts[k])} ({sum(r.label for r in counts[k].records)} anomalous)"
                              for k in side.index])
    side.to_csv(out / "results.csv")
    prov = next(iter(results.values())).provenance
    note = " ".join(run_notes(model, synthetic_data=True))
    md = ["# bpfl demo: Bayes-PFL on the synthetic dataset\n", provenance_markdown(prov), "",
          f"Trained on {len(train_set)} images of the seen categories ({', '.join(SYNTHETIC_GROUPS['seen'])}; "
          f"their test split, the paper's protocol); evaluated on the held-out images of those categories and, "
          f"zero-shot, on the unseen categories ({', '.join(SYNTHETIC_GROUPS['unseen'])}), synthetic split "
          f"'{'tiny' if args.tiny else 'default'}' at {cfg.image_size} px. Mean over categories (metrics in "
          "[0, 1]); per-category tables in `seen_heldout/metrics.md` and `unseen/metrics.md`.", "",
          markdown_table(side.round(3)), ""]
    if note:
        md += [f"**{note}**", ""]
    (out / "results.md").write_text("\n".join(md))

    # Figure 3 style: two anomalous images per split
    set_style()
    images, masks, maps, titles = [], [], [], []
    for split_name, ds in (("seen", held_out), ("unseen", unseen)):
        picks = pick_examples(ds, 3)  # the largest anomalies, one category after the other
        for batch, o in predict_dataset(model, ds, picks, progress=False):
            images += list(batch["image"])
            masks += list(batch["mask"])
            maps += list(o.anomaly_map.cpu().numpy())
            titles += [f"{split_name}: {c}" for c in batch["class_name"]]
    fig = figure3_panel(images, masks, maps, titles)
    fig_paths = save_figure(fig, out / "figure3_panel")

    seconds, peak = time.perf_counter() - t_start, peak_rss_mb()
    (out / "run.json").write_text(json.dumps({"seconds": round(seconds, 1), "peak_rss_mb": round(peak, 1),
                                              "backbone": choice.label(), "weights": model.backbone.weights_label(),
                                              "train_images": len(train_set), "unseen_images": len(unseen),
                                              "held_out_images": len(held_out)}, indent=2))
    print()
    print(markdown_table(side.round(3)))
    print()
    if note:
        print(note)
    print(f"[demo] finished in {seconds:.0f}s (peak memory {peak:.0f} MiB). Outputs in {out}/:")
    for p in ["results.md", "results.csv", "run.json", "config.json", "train/last.pt", "train/train_log.csv",
              "seen_heldout/metrics.md", "unseen/metrics.md", "unseen/scores.csv"] + [x.name for x in fig_paths]:
        print(f"  {out / p}")
    return 0
