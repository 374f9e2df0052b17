"""bpfl: Bayesian Prompt Flow Learning (Bayes-PFL, CVPR 2025) for zero-shot anomaly detection.

A teaching and reproduction kit. Modules mirror the paper's sections:

* :mod:`bpfl.backbone` -- frozen CLIP through open_clip (§3.1, §4.1)
* :mod:`bpfl.prompts`  -- two-class prompt banks and prompt fusion (§3.2, Eq. 1-2, 8-9)
* :mod:`bpfl.flow`     -- planar prompt flow, ISD and IAD (§3.3, Eq. 6-7)
* :mod:`bpfl.rca`      -- residual cross-modal attention (§3.4, Eq. 10)
* :mod:`bpfl.model`    -- anomaly maps and scores, the full model (§3.5, Eq. 11-12)
* :mod:`bpfl.losses`   -- focal, dice, CE, orthogonal and flow losses (§3.6, Eq. 7, 13, 14)
* :mod:`bpfl.metrics`, :mod:`bpfl.data`, :mod:`bpfl.train`, :mod:`bpfl.evaluate`, :mod:`bpfl.cli`
"""
from . import prompt_designs  # noqa: F401  (registers the Figure-4 prompt designs with the model)
from .config import SWITCHES, BayesPFLConfig
from .reference import load_reference_checkpoint

__version__ = "0.1.0"
__all__ = ["BayesPFLConfig", "SWITCHES", "__version__", "load_reference_checkpoint"]
