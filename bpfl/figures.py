"""Figure 3 with the baselines (§4.2): the models of each prompt design and their maps on the same images.

:func:`figure3_models` loads (or, for the training-free WinCLIP-style design, builds) one model per design;
:func:`figure3_method_maps` runs them on the same images; :func:`bpfl.viz.figure3_methods` draws the figure (one
row per method, one colour scale). ``bpfl figures --designs ...`` and notebook 04 use these.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .config import BayesPFLConfig
from .evaluate import predict_dataset, smooth_maps
from .model import BayesPFL
from .prompt_designs import init_projections_from_clip
from .train import load_model, read_checkpoint


def figure3_method_maps(models, dataset, indices: Sequence[int], *, n_samples: int | None = None, seed: int = 0,
                        batch_size: int = 8, smooth: bool = True):
    """The inputs of :func:`figure3_methods` for ``models`` ({method: BayesPFL}) on ``dataset[indices]``.

    Every model sees the same images (its Monte-Carlo samples from ``seed``, R = ``n_samples`` or its config's);
    ``smooth`` applies each model's ``config.map_sigma`` as the evaluation does. Returns
    ``(images, masks, titles, maps_by_method)``.
    """
    images, masks, titles = [], [], []
    maps_by_method: dict[str, list[np.ndarray]] = {}
    for k, (name, model) in enumerate(models.items()):
        maps: list[np.ndarray] = []
        for batch, out in predict_dataset(model, dataset, indices, n_samples=n_samples, batch_size=batch_size,
                                          seed=seed, progress=False, desc=name):
            m = out.anomaly_map.float().cpu().numpy()
            maps += list(smooth_maps(m, model.config.map_sigma) if smooth else m)
            if k == 0:
                images += list(batch["image"])
                masks += list(batch["mask"])
                titles += list(batch["class_name"])
        maps_by_method[name] = maps
    return images, masks, titles, maps_by_method


def figure3_models(checkpoints, *, backbone=None, device=None, reference_config=None) -> dict:
    """{design: checkpoint path or None} -> {design: BayesPFL} for :func:`figure3_method_maps`.

    Trained designs (``bayes-pfl``, ``aprilgan+``, ``anomalyclip+``) need their checkpoint. ``winclip`` has
    nothing to train: without a checkpoint it is built training-free on the same backbone settings as the
    first checkpoint (or ``reference_config``): CLIP's own patch head as the per-layer projections
    (:func:`bpfl.prompt_designs.init_projections_from_clip`) and no RCA (an untrained RCA would only add noise).
    One frozen CLIP serves every model whose backbone settings agree.
    """
    models, ref, shared = {}, reference_config, backbone
    for name, path in checkpoints.items():
        if path is None:
            continue
        cfg = BayesPFLConfig.from_dict(read_checkpoint(path)["config"])
        same = shared is not None and (shared.name, shared.image_size, tuple(shared.layers)) == (
            cfg.backbone, cfg.image_size, tuple(cfg.layers))
        model = load_model(path, device=device, backbone=shared if same else None)
        if model.config.prompt_design != name:
            raise ValueError(f"{path} holds a {model.config.prompt_design!r} model, not {name!r}")
        shared = shared or model.backbone
        ref = ref or model.config
        models[name] = model
    for name, path in checkpoints.items():
        if path is not None:
            continue
        if name != "winclip":
            raise ValueError(f"{name} is trained: give its checkpoint (bpfl figures --design-checkpoint {name}=PATH)")
        if ref is None:
            raise ValueError("a training-free winclip needs the backbone settings: give another design's "
                             "checkpoint or reference_config")
        cfg = ref.replace(prompt_design="winclip", use_rca=False)
        model = BayesPFL(cfg, backbone=shared, device=device)
        shared = shared or model.backbone
        init_projections_from_clip(model)
        models[name] = model.eval()
    return {name: models[name] for name in checkpoints}
