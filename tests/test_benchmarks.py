"""The inference benchmark (benchmarks/bench_inference.py) at smoke size: its reference/kit equality checks hold."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_inference.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_inference", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_inference", module)
    spec.loader.exec_module(module)
    return module


def test_bench_inference_smoke_equalities(tmp_path):
    import torch

    bench = _load_bench()
    threads = torch.get_num_threads()
    try:  # one thread: steadier on a shared machine; restored for the other tests
        res = bench.main(["--smoke", "--threads", "1", "--out-dir", str(tmp_path)])  # AssertionError on a mismatch
    finally:
        torch.set_num_threads(threads)
    checks = res["checks"]
    expected = {"text: kit == reference", "text: kit (prefix not shared) == reference",
                "e2e R=1: kit maps == reference maps",
                "e2e R=2: kit maps == reference maps", "train: kit loss == reference loss (relative)",
                "metrics: exact == sklearn"}
    assert expected <= set(checks), sorted(checks)
    for name, (value, tol) in checks.items():
        assert value <= tol, (name, value, tol)
    parts = {r["part"] for r in res["rows"]}
    assert parts == {"a_text", "b_e2e", "b_memory", "c_train", "d_metrics"}
    assert {r["R"] for r in res["rows"] if r["part"] == "b_e2e"} == {1, 2}
    md = Path(res["md"]).read_text()
    assert "Machine:" in md and "torch =" in md and Path(res["csv"]).is_file()


def test_fused_focal_dice_equals_the_per_map_losses_and_their_autograd():
    """bpfl.losses.focal_dice_per_map (used by BayesPFL.loss since the issue-6 speed-up) against the loop it replaced.

    (It lives here with the benchmark that motivated it; it belongs with tests/test_losses.py.)
    """
    import itertools

    import torch

    from bpfl import losses as L

    torch.manual_seed(0)
    for gamma, balanced in itertools.product([2.0, 0.0, 1.0, 3.0], [False, True]):
        x = torch.randn(3, 5, 7, 6, dtype=torch.float64) * 4
        x[0, 0, 0, :3] = torch.tensor([-40.0, 40.0, 0.0])  # saturated: p_t below the clamp, p_t == 1
        target = (torch.rand(3, 7, 6) > 0.6).double()
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        wf, wd = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
        focal, dice = L.focal_dice_per_map(torch.sigmoid(a), target, gamma=gamma, balanced=balanced)
        ((focal * wf).sum() + (dice * wd).sum()).backward()
        pb = torch.sigmoid(b)
        ref_f = torch.stack([L.focal_loss(pb[:, k], target, gamma=gamma, balanced=balanced) for k in range(5)])
        ref_d = torch.stack([L.dice_loss(pb[:, k], target) for k in range(5)])
        ((ref_f * wf).sum() + (ref_d * wd).sum()).backward()
        torch.testing.assert_close(focal, ref_f, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dice, ref_d, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-14)
    # float32 maps (the model's case), no-grad input and one chunk per map
    p = torch.rand(2, 4, 9, 9)
    t = (torch.rand(2, 9, 9) > 0.7).float()
    old = L.FUSED_CHUNK_ELEMENTS
    try:
        L.FUSED_CHUNK_ELEMENTS = 1
        f, d = L.focal_dice_per_map(p, t, balanced=True)
    finally:
        L.FUSED_CHUNK_ELEMENTS = old
    torch.testing.assert_close(f, torch.stack([L.focal_loss(p[:, k], t, balanced=True) for k in range(4)]))
    torch.testing.assert_close(d, torch.stack([L.dice_loss(p[:, k], t) for k in range(4)]))


def test_readme_quotes_the_committed_vitl_table():
    """The README's performance section quotes the ratios of benchmarks/results (issue 6), not guesses."""
    import re

    root = Path(__file__).resolve().parents[1]
    table = (root / "benchmarks" / "results" / "inference_vitl14-336-518px-cpu.md").read_text()
    readme = (root / "README.md").read_text()
    perf = readme[readme.index("## Performance"):readme.index("## Notebooks")]
    measured = {}
    for line in table.splitlines():
        m = re.match(r"\| (text side|end-to-end R=10|training step) .*? \| ([0-9.]+)x", line)
        if m:
            measured[m.group(1)] = m.group(2)
    assert set(measured) == {"text side", "end-to-end R=10", "training step"}, measured
    for key, value in measured.items():
        assert f"{value}×" in perf, (key, value)
    if "NOT met" in table.split("## a.")[0]:
        assert "not met" in perf.lower(), "a target is not met in the committed table: the README must say so"
