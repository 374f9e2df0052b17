"""Helpers of the teaching notebooks (``notebooks/NN_*.py`` / ``.ipynb``), in three layers of their own:

* :mod:`bpfl.notebook.session` -- mode, banner, folders, datasets, the shared train-or-load cache (``setup``);
* :mod:`bpfl.notebook.widgets` -- live loss curves, the K slider (notebook 02) and the R slider (notebook 04);
* :mod:`bpfl.notebook.flow2d` -- 2-D planar flows and their densities (notebook 02);
* :mod:`bpfl.notebook.tables` -- formatting and the tables the notebooks print beside the paper's;
* :mod:`bpfl.notebook.tools` -- student copies without solutions, static HTML rendering (``bpfl notebooks``).

A notebook's setup cell::

    MODE = None                       # None: $BPFL_MODE, else "fast"; "paper" for the paper's setting
    from bpfl import notebook as nb
    S = nb.setup("02_prompt_flow_density", mode=MODE)
"""
from ..backbone_choice import SMALL_BACKBONES
from ..paper_numbers import (
                             PAPER_TABLE1,
                             PAPER_TABLE1_MEDICAL,
                             PAPER_TABLE2,
                             PAPER_TABLE3,
                             PAPER_TABLE4,
                             TABLE2_ROWS,
                             paper_table1,
)
from ..viz import pick_examples
from .flow2d import demo_flow_2d, flow_density_2d, flow_samples_2d, grid_2d, histogram_density, truncate_flow
from .session import (
                             MECHANICS_NOTE,
                             MODES,
                             REPO_ROOT,
                             SCALES,
                             ModeScale,
                             NotebookSetup,
                             Trained,
                             detect_mode,
                             fast_backbone,
                             fingerprint,
                             mode_config,
                             results_root,
                             setup,
)
from .tables import format_paper, format_pct, time_per_image
from .widgets import LOSS_TERMS, LiveLossPlot, k_slider_demo, plot_loss_terms, r_slider_demo

__all__ = [
    "LOSS_TERMS", "MECHANICS_NOTE", "MODES", "PAPER_TABLE1", "PAPER_TABLE1_MEDICAL", "PAPER_TABLE2", "PAPER_TABLE3",
    "PAPER_TABLE4", "REPO_ROOT", "SCALES", "SMALL_BACKBONES", "TABLE2_ROWS", "LiveLossPlot", "ModeScale",
    "NotebookSetup", "Trained", "demo_flow_2d", "detect_mode", "fast_backbone", "fingerprint", "flow_density_2d",
    "flow_samples_2d", "format_paper", "format_pct", "grid_2d", "histogram_density", "k_slider_demo", "mode_config",
    "paper_table1", "pick_examples", "plot_loss_terms", "r_slider_demo", "results_root", "setup", "time_per_image",
    "truncate_flow",
]
