"""The toy CLIP: a small open_clip model the kit pretrains itself on captioned procedural surfaces (issue 9).

Zero-shot anomaly detection needs a CLIP pretrained on broad image-text data; offline, the kit can make a
small stand-in: :func:`pretrain_toy_clip` trains ``bpfl-toy`` (ViT 6x128 / patch 8, text 4x64) with a
contrastive loss on an endless stream of generated surfaces and captions (:mod:`bpfl.toyclip.generator`),
holding out the families of the synthetic dataset's ``unseen`` categories. A teaching device, not a
substitute for OpenAI's CLIP. See ``docs/toy_clip.md``.

    from bpfl.toyclip import ensure_toy_clip, toy_bayespfl_overrides
    cfg = BayesPFLConfig.teaching(**toy_bayespfl_overrides("bpfl-bundled"))  # the toy CLIP shipped in the package
    path = ensure_toy_clip(build=True)         # or build one yourself: 15-35 min on 2 CPU cores
"""
from .generator import (
                        COLOURS,
                        DEFAULT_HELD_OUT,
                        DEFECT_KINDS,
                        FAMILIES,
                        HELD_OUT_WORDS,
                        Caption,
                        ToyCaptionStream,
                        ToySample,
                        allowed_families,
                        caption_consistent,
                        consistency_matrix,
                        held_out_words,
                        make_caption,
                        samples_to_batch,
                        toy_sample,
                        toy_stream,
)
from .pretrain import (
                        DEFAULT_BATCH,
                        DEFAULT_DENSE_WEIGHT,
                        DEFAULT_STEPS,
                        TOY_ARCH,
                        TOY_BAYESPFL_LR,
                        TOY_IMAGE_SIZE,
                        TOY_PRETRAIN_SIZE,
                        PretrainResult,
                        PretrainSettings,
                        add_arguments,
                        bundle_toy_clip,
                        cache_dir,
                        default_toy_clip_path,
                        ensure_toy_clip,
                        load_toy_backbone,
                        main,
                        peak_rss_mb,
                        pretrain_toy_clip,
                        recipe_differences,
                        run,
                        toy_bayespfl_overrides,
                        toy_layers,
)
from .zeroshot import zero_shot_maps

__all__ = [
    "COLOURS", "DEFAULT_BATCH", "DEFAULT_DENSE_WEIGHT", "DEFAULT_HELD_OUT", "DEFAULT_STEPS", "DEFECT_KINDS",
    "FAMILIES", "HELD_OUT_WORDS", "TOY_ARCH", "TOY_BAYESPFL_LR", "TOY_IMAGE_SIZE", "TOY_PRETRAIN_SIZE", "Caption",
    "PretrainResult", "PretrainSettings", "ToyCaptionStream", "ToySample", "add_arguments", "allowed_families",
    "bundle_toy_clip",
    "cache_dir", "caption_consistent", "consistency_matrix", "default_toy_clip_path", "ensure_toy_clip",
    "held_out_words", "load_toy_backbone", "main", "make_caption", "peak_rss_mb", "pretrain_toy_clip",
    "recipe_differences", "run", "samples_to_batch", "toy_bayespfl_overrides", "toy_layers", "toy_sample",
    "toy_stream", "zero_shot_maps",
]
