"""Datasets for zero-shot anomaly detection: readers for every layout the paper uses, one torch
Dataset type, up-front validation, and the offline synthetic dataset.

Quick use::

    from bpfl.data import open_dataset, make_synthetic_dataset, check_dataset
    make_synthetic_dataset("data/synthetic", seed=0)
    ds = open_dataset("data/synthetic", split="test", image_size=518)
    item = ds[0]            # dict: image [3,S,S], mask [S,S], has_mask, label, class_name, path, ...
    print(check_dataset("data/synthetic").format())

See ``docs/datasets.md`` for where each of the paper's 15 datasets comes from and which reader
takes it. Note the paper's protocol **trains on the auxiliary dataset's test split**.
"""
from .check import DatasetReport, check_dataset
from .dataset import AnomalyDataset, collate, load_record, open_dataset, verify_record
from .images import (
                     CLIP_MEAN,
                     CLIP_STD,
                     IMAGE_EXTENSIONS,
                     denormalize,
                     load_image,
                     load_mask,
                     mask_to_binary,
                     pil_to_rgb,
                     read_rgb,
)
from .perlin import perlin, perlin_mask
from .readers import (
                     BTAD_CLASS_NAMES,
                     GOOD_DIR_NAMES,
                     LAYOUTS,
                     MASK_SUFFIXES,
                     detect_layout,
                     find_meta_json,
                     guess_class_word,
                     read_folder,
                     read_meta_json,
                     read_mvtec,
                     read_records,
                     read_segmentation_only,
                     read_visa,
                     write_meta_json,
)
from .records import DatasetError, DatasetWarning, Record, RecordList
from .synthetic import (
                     AUTHORS_CLASS_REMAP,
                     DEFECTS,
                     SYNTHETIC_CATEGORIES,
                     SYNTHETIC_GROUPS,
                     SYNTHETIC_PRESETS,
                     SYNTHETIC_TINY,
                     class_word,
                     ensure_synthetic,
                     is_synthetic_root,
                     make_synthetic_dataset,
                     synthetic_up_to_date,
)
from .textures import TEXTURES

__all__ = [
    "AUTHORS_CLASS_REMAP", "BTAD_CLASS_NAMES", "GOOD_DIR_NAMES", "MASK_SUFFIXES",
    "AnomalyDataset", "CLIP_MEAN", "CLIP_STD", "DEFECTS", "DatasetError", "DatasetReport",
    "DatasetWarning", "IMAGE_EXTENSIONS", "LAYOUTS", "Record", "RecordList", "SYNTHETIC_CATEGORIES",
    "SYNTHETIC_GROUPS", "SYNTHETIC_PRESETS", "SYNTHETIC_TINY", "TEXTURES", "check_dataset",
    "class_word", "collate", "ensure_synthetic", "is_synthetic_root", "denormalize", "detect_layout",
    "find_meta_json", "guess_class_word",
    "load_image", "load_mask", "load_record", "make_synthetic_dataset", "mask_to_binary",
    "open_dataset", "perlin", "perlin_mask", "pil_to_rgb", "read_folder", "read_meta_json",
    "read_mvtec", "read_records", "read_rgb", "read_segmentation_only", "read_visa", "synthetic_up_to_date",
    "verify_record",
    "write_meta_json",
]
