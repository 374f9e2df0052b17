"""The paper's reported numbers, transcribed from the CVPR 2025 paper (data only: no code but one lookup).

Tables 1-4 (Bayes-PFL's rows and columns), in %. The notebooks and benchmark tables print them beside the kit's
numbers; ``tests/test_notebooks.py`` checks the transcription's internal consistency (Table 4's image-ensemble
row is Table 2's full model, ...).
"""
from __future__ import annotations

#: Table 1, Bayes-PFL column, industrial rows: image (AUROC, F1-max, AP), pixel (AUROC, PRO, AP), in %.
PAPER_TABLE1 = {
    "MVTec-AD": {"image": (92.3, 93.1, 96.7), "pixel": (91.8, 87.4, 48.3)},
    "VisA": {"image": (87.0, 84.1, 89.2), "pixel": (95.6, 88.9, 29.8)},
    "BTAD": {"image": (93.2, 91.9, 96.5), "pixel": (93.9, 76.6, 47.1)},
    "KSDD2": {"image": (97.3, 92.3, 97.9), "pixel": (99.6, 97.6, 73.7)},
    "RSDD": {"image": (94.1, 89.6, 92.3), "pixel": (99.6, 98.0, 39.1)},
    "DAGM": {"image": (97.7, 95.7, 97.0), "pixel": (99.3, 98.0, 43.1)},
    "DTD-Synthetic": {"image": (95.1, 95.1, 98.4), "pixel": (97.8, 94.3, 69.9)},
}
#: Table 2 (MVTec-AD): (image AUROC, image AP, pixel AUROC, pixel AP) in %; None where the paper has "—".
PAPER_TABLE2: dict[str, tuple] = {
    "w/o ISD": (89.1, 94.5, 88.3, 46.5),
    "w/o IAD": (90.3, 95.2, 89.5, 47.2),
    "w/o ISD, IAD": (88.6, 93.3, 87.1, 45.6),
    "w/o RCA": (91.8, 95.9, 89.7, 46.1),
    "w/o L_ort": (91.2, 96.0, 90.2, 47.3),
    "w/o x_cls": (89.3, 94.4, None, None),
    "w/o x_patch": (90.9, 95.8, None, None),
    "w/o s_text": (89.0, 95.1, None, None),
    "w/o s_img": (90.9, 95.3, None, None),
    "Bayes-PFL": (92.3, 96.7, 91.8, 48.3),
}
#: kit ablation name (bpfl.config.ABLATIONS) -> Table 2 row
TABLE2_ROWS: dict[str | None, str] = {
    "no-isd": "w/o ISD", "no-iad": "w/o IAD", "no-isd-iad": "w/o ISD, IAD", "no-rca": "w/o RCA",
    "no-ort": "w/o L_ort", "no-x-cls": "w/o x_cls", "no-x-patch": "w/o x_patch", "no-s-text": "w/o s_text",
    "no-s-img": "w/o s_img", None: "Bayes-PFL",
}
#: Table 3 (MVTec-AD, mean ± std): R -> ((img AUROC), (img AP), (px AUROC), (px AP), (time ms)), each (mean, std)
PAPER_TABLE3: dict[int, tuple] = {
    1: ((89.5, 1.1), (94.1, 1.2), (87.1, 1.3), (45.4, 0.6), (132.2, 1.6)),
    3: ((90.0, 1.0), (94.8, 0.9), (88.2, 1.2), (46.1, 0.6), (200.3, 1.4)),
    5: ((91.1, 0.8), (95.4, 0.9), (89.5, 1.0), (46.8, 0.5), (254.2, 1.4)),
    7: ((92.0, 0.7), (96.3, 0.8), (90.9, 0.8), (47.5, 0.5), (297.4, 1.7)),
    10: ((92.7, 0.4), (96.8, 0.5), (91.8, 0.6), (48.3, 0.4), (388.5, 1.5)),
    13: ((92.7, 0.4), (96.9, 0.5), (91.9, 0.5), (48.4, 0.4), (467.5, 1.5)),
    16: ((92.8, 0.3), (96.9, 0.4), (92.0, 0.4), (48.6, 0.3), (621.6, 1.6)),
    20: ((92.9, 0.2), (97.0, 0.2), (92.1, 0.2), (48.9, 0.1), (726.1, 1.7)),
}
#: Table 4 (MVTec-AD): ensemble mode -> (image AUROC, image AP, pixel AUROC, pixel AP, time ms)
PAPER_TABLE4: dict[str, tuple] = {"text": (92.0, 96.3, 91.1, 47.6, 436.6), "image": (92.3, 96.7, 91.8, 48.3, 443.4)}
#: Table 1, Bayes-PFL column, medical rows: image (AUROC, F1-max, AP) or pixel (AUROC, PRO, AP), in %.
PAPER_TABLE1_MEDICAL: dict[str, dict[str, tuple]] = {
    "HeadCT": {"image": (96.5, 92.9, 95.5)},
    "BrainMRI": {"image": (96.2, 92.8, 92.4)},
    "Br35H": {"image": (97.8, 93.6, 96.2)},
    "CVC-ColonDB": {"pixel": (82.1, 76.1, 31.9)},
    "CVC-ClinicDB": {"pixel": (89.6, 78.4, 53.2)},
    "Endo": {"pixel": (89.2, 74.8, 58.6)},
    "Kvasir": {"pixel": (85.4, 63.9, 54.2)},
}


def paper_table1(dataset: str) -> dict[str, tuple]:
    """The paper's Table 1 (Bayes-PFL) entry for a dataset name, or {} when the paper has none."""
    return dict(PAPER_TABLE1.get(dataset) or PAPER_TABLE1_MEDICAL.get(dataset) or {})


