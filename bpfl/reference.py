"""Load the authors' released checkpoints (``train_visa.pth``, ``train_mvtec.pth``) into the kit.

The released files hold ``{'MyModel': state_dict}`` of the authors' ``Context_Prompting`` module (see
``shared/docs/reference-implementation.md`` §10 for every key and shape). :func:`load_reference_checkpoint` maps
that state dict onto :class:`bpfl.model.BayesPFL` built with :meth:`BayesPFLConfig.released_code` (ViT-L-14-336
at 518 px, exact GELU, amortised ISD, separate IAD flows, attention x_patch, 4-head RCA ...) and reports what
did and did not match. :func:`export_reference_state_dict` goes the other way.

Key map (released -> kit), with the transforms applied:

* ``prompt_context``, ``prompt_state_{normal,abnormal}`` -> ``prompts.context``, ``prompts.state_{normal,abnormal}``
* ``temperature_{pixel,image}`` -> ``log_temperature_{pixel,image}`` (reshaped to a scalar; the released value
  is a log: initialised to log(1/0.07) and used through exp())
* ``PFL_context.encoder.weight_mean.module.{0,2,4}.*`` -> ``context_flow.encoder.mean_net.{0,2,4}.*``
* ``PFL_context.encoder.weight_log_variance.module.{0,2,4}.*`` -> ``context_flow.encoder.log_var_net.{0,2,4}.*``,
  the last Linear (index 4) **scaled by 0.5** (see below)
* ``PFL_context.amor_{u,w,b}.*`` (Linear) -> ``context_flow.flow.amor_{u,w,b}.*``
* ``PFL_normal.encoder.*`` (the shared state encoder) -> ``normal_flow.encoder.*`` (= ``abnormal_flow.encoder.*``,
  the same module), log-variance head scaled likewise
* ``PFL_{normal,abnormal}.amor_u`` [1,K,C,1] / ``.amor_w`` [1,K,1,C] / ``.amor_b`` [1,K,1,1] ->
  ``{normal,abnormal}_flow.flow.u`` [K,C] / ``.w`` [K,C] / ``.b`` [K]
* ``PFL_{normal,abnormal}.state`` [1,C] -> ``{normal,abnormal}_xi`` [1,C]
* ``fuse.fuse_modules`` / ``fuse.compress`` / ``fuse.post_process`` -> ``patch_to_global.fuse`` / ``.score`` /
  ``.out`` (:class:`bpfl.model.AttentionPooling`)
* ``RCA.q_proj_pre`` (Conv1d [C,C,1] + bias) -> ``rca.query`` (Linear [C,C] + bias; kernel dim squeezed)
* ``RCA.linear_proj.{l}.weight`` -> ``patch_projections.{l}.weight``
* ``class_mapping.*``, ``image_mapping.*`` -> the same names

Not loaded, with the reason in the report: ``context_encoder.*`` and ``state_encoder.*`` (the same modules as
``PFL_context.encoder`` / ``PFL_normal.encoder``, stored twice; ``PFL_abnormal.encoder.*`` is a third copy of the
state encoder) -- duplicates are checked to be equal; every ``*decoder*`` and ``PFL_*.p_mu`` tensor (the
reconstruction head that the released code computes but never adds to the loss).

**log-variance head.** The released encoder returns var = exp(0.5·h) for the head output h, i.e. log σ² = 0.5·h,
while the kit's :class:`bpfl.flow.GaussianEncoder` (as built by ``BayesPFL``) reads its head as log σ² directly.
Instead of a different module, the loader multiplies the last Linear of the log-variance MLP (weight and bias)
by 0.5: log σ² = 0.5·(W h' + b) = (0.5 W) h' + 0.5 b, exactly. A kit checkpoint of the loaded model is therefore
self-contained; :func:`export_reference_state_dict` multiplies by 2 again. (If a model's encoders are ever built
with ``log_var_scale=0.5``, the loader sees it and copies the head unscaled.)

**Assumptions** (the files themselves cannot be downloaded here): ``fuse.*``, ``class_mapping``,
``image_mapping`` and the encoders' Linears have biases (PyTorch's default), and the temperatures are stored as
logs (the released code initialises them to log(1/0.07) and multiplies logits by their exp()). Released
checkpoints without a suffix (``train_visa.pth``) are stage-2 models, which is what the kit's image branch
computes (image_mapping(x_cls + x_patch)); stage-1 snapshots (``epoch_post_*_1.pth``) used normalize(x_cls)
without ``image_mapping`` in the image branch, which the kit does not model.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .config import BayesPFLConfig
from .model import BayesPFL

log = logging.getLogger(__name__)

__all__ = ["ReferenceLoadReport", "reference_layout", "map_reference_state_dict", "load_reference_checkpoint",
           "export_reference_state_dict", "read_reference_state_dict"]

_ENC_HEADS = {"weight_mean": "mean_net", "weight_log_variance": "log_var_net"}
_FUSE = {"fuse_modules": "fuse", "compress": "score", "post_process": "out"}
#: the released log-variance head outputs h with log sigma^2 = 0.5 h
RELEASED_LOG_VAR_SCALE = 0.5


# ------------------------------------------------------------------------------------------ report
@dataclass
class ReferenceLoadReport:
    """What :func:`map_reference_state_dict` did with each key.

    ``matched``: released key -> kit key(s) it filled. ``duplicates``: released key -> the released key whose
    copy it is (``verified`` says whether the values were compared equal). ``unused``: released key -> why it is
    not needed (decoders, p_mu). ``unknown``: released keys the map does not know. ``missing_in_kit``: kit
    parameters/buffers that nothing filled. ``shape_errors``: key -> message. ``transforms``: kit key -> what was
    done to the tensor on the way.
    """

    matched: dict[str, list[str]] = field(default_factory=dict)
    duplicates: dict[str, str] = field(default_factory=dict)
    duplicate_mismatches: dict[str, str] = field(default_factory=dict)
    unused: dict[str, str] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)
    missing_in_kit: list[str] = field(default_factory=list)
    shape_errors: dict[str, str] = field(default_factory=dict)
    transforms: dict[str, str] = field(default_factory=dict)
    verified_duplicates: bool = True

    @property
    def ok(self) -> bool:
        return not (self.unknown or self.missing_in_kit or self.shape_errors or self.duplicate_mismatches)

    @property
    def unmatched_in_checkpoint(self) -> dict[str, str]:
        """Every released key that was not loaded, with the reason."""
        out = {k: f"duplicate of {v}" + (" (values verified equal)" if self.verified_duplicates else "")
               for k, v in self.duplicates.items()}
        out.update(self.unused)
        out.update({k: "unknown to the key map" for k in self.unknown})
        out.update({k: f"duplicate of {self.duplicates.get(k, '?')} but DIFFERENT values: {v}"
                    for k, v in self.duplicate_mismatches.items()})
        return out

    def summary(self) -> dict[str, int]:
        return {"matched": len(self.matched), "kit_tensors_filled": sum(len(v) for v in self.matched.values()),
                "duplicates": len(self.duplicates), "unused": len(self.unused), "unknown": len(self.unknown),
                "missing_in_kit": len(self.missing_in_kit), "shape_errors": len(self.shape_errors)}

    def format(self, max_lines: int = 12) -> str:
        s = self.summary()
        lines = [f"reference checkpoint: {s['matched']} released tensors loaded into {s['kit_tensors_filled']} kit "
                 f"tensors; {s['duplicates']} duplicate copies, {s['unused']} unused (decoder / p_mu), "
                 f"{s['unknown']} unknown; kit tensors left unfilled: {s['missing_in_kit']}; "
                 f"shape errors: {s['shape_errors']}"]
        groups = {}
        for k, why in self.unused.items():
            groups.setdefault(why, []).append(k)
        for why, ks in groups.items():
            lines.append(f"  unused ({why}): {len(ks)} keys, e.g. {ks[0]}")
        for title, items in (("unknown", self.unknown), ("missing in kit", self.missing_in_kit),
                             ("shape errors", [f"{k}: {v}" for k, v in self.shape_errors.items()]),
                             ("duplicate mismatches", [f"{k}: {v}" for k, v in self.duplicate_mismatches.items()])):
            for item in list(items)[:max_lines]:
                lines.append(f"  {title}: {item}")
        by_note: dict[str, list[str]] = {}
        for k, note in self.transforms.items():
            by_note.setdefault(note, []).append(k)
        for note, ks in by_note.items():
            lines.append(f"  transform ({note}): {', '.join(ks[:4])}{' ...' if len(ks) > 4 else ''}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------ layout (§10)
def reference_layout(embed_dim: int = 768, vision_width: int = 1024, n_layers: int = 4, n_prompts: int = 3,
                     n_context: int = 5, n_state: int = 5, n_flows: int = 10, hidden: int | None = None,
                     fuse_hidden: int | None = None) -> dict[str, tuple[int, ...]]:
    """Every key of the released ``Context_Prompting`` state dict with its shape (reference §10).

    Defaults are the released ViT-L/14@336 model: C = 768, V = 1024, L = 4, B = 3, P = Q = 5, K = 10,
    hidden = fuse_hidden = V // 2 = 512.
    """
    C, V, K = embed_dim, vision_width, n_flows
    H = vision_width // 2 if hidden is None else hidden
    HF = vision_width // 2 if fuse_hidden is None else fuse_hidden
    out: dict[str, tuple[int, ...]] = {
        "prompt_context": (n_prompts, n_context, C),
        "prompt_state_normal": (n_prompts, n_state, C),
        "prompt_state_abnormal": (n_prompts, n_state, C),
        "temperature_pixel": (), "temperature_image": (),
    }

    def mlp(prefix: str, heads=("weight_mean", "weight_log_variance")):
        for head in heads:
            for i, (o, n) in zip((0, 2, 4), ((H, C), (H, H), (C, H))):
                out[f"{prefix}.{head}.module.{i}.weight"] = (o, n)
                out[f"{prefix}.{head}.module.{i}.bias"] = (o,)

    for which in ("context", "state"):
        mlp(f"{which}_encoder")
        mlp(f"{which}_decoder", heads=("weight_mean",))
    for pfl, _which in (("PFL_context", "context"), ("PFL_normal", "state"), ("PFL_abnormal", "state")):
        mlp(f"{pfl}.encoder")
        mlp(f"{pfl}.decoder", heads=("weight_mean",))
        out[f"{pfl}.p_mu.0.weight"] = (C, C)
        out[f"{pfl}.p_mu.0.bias"] = (C,)
    for name, rows in (("amor_u", K * C), ("amor_w", K * C), ("amor_b", K)):
        out[f"PFL_context.{name}.weight"] = (rows, C)
        out[f"PFL_context.{name}.bias"] = (rows,)
    for pfl in ("PFL_normal", "PFL_abnormal"):
        out[f"{pfl}.amor_u"] = (1, K, C, 1)
        out[f"{pfl}.amor_w"] = (1, K, 1, C)
        out[f"{pfl}.amor_b"] = (1, K, 1, 1)
        out[f"{pfl}.state"] = (1, C)
    for name, shape in (("fuse_modules", (HF, n_layers * V)), ("compress", (1, HF)), ("post_process", (C, HF))):
        out[f"fuse.{name}.weight"] = shape
        out[f"fuse.{name}.bias"] = (shape[0],)
    out["RCA.q_proj_pre.weight"] = (C, C, 1)
    out["RCA.q_proj_pre.bias"] = (C,)
    for l in range(n_layers):
        out[f"RCA.linear_proj.{l}.weight"] = (C, V)
    for name in ("class_mapping", "image_mapping"):
        out[f"{name}.weight"] = (C, C)
        out[f"{name}.bias"] = (C,)
    return out


# ------------------------------------------------------------------------------------------ the key map
def _rule(key: str) -> tuple[str, Any] | None:
    """Classify one released key: ("map", [(kit_key, transform_name)]), ("dup", canonical), ("unused", reason)."""
    if re.fullmatch(r"PFL_\w+\.decoder\..*", key):
        return "unused", "stored copy of context_decoder / state_decoder (unused, see there)"
    if "decoder" in key:
        return "unused", "decoder of the discarded reconstruction term (never in the loss)"
    if re.fullmatch(r"PFL_\w+\.p_mu\..*", key):
        return "unused", "p_mu head of the discarded reconstruction term (never in the loss)"
    simple = {"prompt_context": "prompts.context", "prompt_state_normal": "prompts.state_normal",
              "prompt_state_abnormal": "prompts.state_abnormal",
              "temperature_pixel": "log_temperature_pixel", "temperature_image": "log_temperature_image",
              "PFL_normal.state": "normal_xi", "PFL_abnormal.state": "abnormal_xi"}
    if key in simple:
        return "map", [(simple[key], "scalar" if key.startswith("temperature") else None)]
    m = re.fullmatch(r"(context|state)_encoder\.(.+)", key)
    if m:
        return "dup", ("PFL_context.encoder." if m.group(1) == "context" else "PFL_normal.encoder.") + m.group(2)
    m = re.fullmatch(r"PFL_abnormal\.encoder\.(.+)", key)
    if m:
        return "dup", "PFL_normal.encoder." + m.group(1)
    m = re.fullmatch(r"PFL_(context|normal)\.encoder\.(weight_mean|weight_log_variance)\.module\.(\d+)\.(weight|bias)",
                     key)
    if m:
        which, head, idx, kind = m.groups()
        sub = f"encoder.{_ENC_HEADS[head]}.{idx}.{kind}"
        kits = [f"context_flow.{sub}"] if which == "context" else [f"normal_flow.{sub}", f"abnormal_flow.{sub}"]
        transform = "half" if head == "weight_log_variance" and idx == "4" else None
        return "map", [(k, transform) for k in kits]
    m = re.fullmatch(r"PFL_context\.(amor_[uwb])\.(weight|bias)", key)
    if m:
        return "map", [(f"context_flow.flow.{m.group(1)}.{m.group(2)}", None)]
    m = re.fullmatch(r"PFL_(normal|abnormal)\.amor_([uwb])", key)
    if m:
        return "map", [(f"{m.group(1)}_flow.flow.{m.group(2)}", "flatten_k")]
    m = re.fullmatch(r"fuse\.(fuse_modules|compress|post_process)\.(weight|bias)", key)
    if m:
        return "map", [(f"patch_to_global.{_FUSE[m.group(1)]}.{m.group(2)}", None)]
    if key == "RCA.q_proj_pre.weight":
        return "map", [("rca.query.weight", "squeeze_conv")]
    if key == "RCA.q_proj_pre.bias":
        return "map", [("rca.query.bias", None)]
    m = re.fullmatch(r"RCA\.linear_proj\.(\d+)\.weight", key)
    if m:
        return "map", [(f"patch_projections.{m.group(1)}.weight", None)]
    m = re.fullmatch(r"(class_mapping|image_mapping)\.(weight|bias)", key)
    if m:
        return "map", [(key, None)]
    return None


_TRANSFORMS: dict[str | None, tuple[Callable[[torch.Tensor, torch.Size], torch.Tensor], str]] = {
    None: (lambda t, shape: t, ""),
    "scalar": (lambda t, shape: t.reshape(shape), "reshaped to the kit's scalar (value is log tau)"),
    "half": (lambda t, shape: t * RELEASED_LOG_VAR_SCALE,
             "x0.5: released log sigma^2 = 0.5 h, the kit reads the head as log sigma^2"),
    "flatten_k": (lambda t, shape: t.reshape(shape), "released [1,K,C,1]/[1,K,1,C]/[1,K,1,1] -> kit [K,C]/[K]"),
    "squeeze_conv": (lambda t, shape: t.reshape(shape), "Conv1d kernel [C,C,1] -> Linear [C,C]"),
}


def read_reference_state_dict(path_or_state_dict) -> dict[str, torch.Tensor]:
    """The released state dict from a file or an object (``{'MyModel': sd}``, a bare sd, or ``module.``-prefixed)."""
    obj = path_or_state_dict
    if isinstance(obj, (str, Path)):
        path = Path(obj)
        if not path.is_file():
            raise FileNotFoundError(f"released checkpoint {path} not found (the authors' files are train_visa.pth "
                                    "and train_mvtec.pth, linked from their README)")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{path} could not be read as a PyTorch state dict ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"expected a dict, got {type(obj).__name__}")
    if "MyModel" in obj and isinstance(obj["MyModel"], dict):
        obj = obj["MyModel"]
    elif "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    if "format" in obj and obj.get("format") == "bpfl-checkpoint-v1":
        raise ValueError("this is a kit checkpoint; load it with bpfl.train.load_model")
    return obj


def map_reference_state_dict(state_dict: dict[str, torch.Tensor], model, *,
                             verify_duplicates: bool = True) -> tuple[dict[str, torch.Tensor], ReferenceLoadReport]:
    """Translate a released state dict into the kit's keys for ``model`` (nothing is loaded yet).

    Returns ``(kit_state, report)``: ``kit_state`` holds one tensor per kit key of ``model``'s own (non-CLIP)
    state; the report lists matched, duplicate, unused and unknown released keys, kit keys nothing filled and
    shape mismatches. Works on meta tensors (then duplicates cannot be compared and are reported unverified).
    """
    sd = read_reference_state_dict(state_dict)
    kit_shapes = {k: v.shape for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    report = ReferenceLoadReport()
    out: dict[str, torch.Tensor] = {}
    dup_pairs = []
    for key, tensor in sd.items():
        rule = _rule(key)
        if rule is None:
            report.unknown.append(key)
            continue
        kind, what = rule
        if kind == "unused":
            report.unused[key] = what
        elif kind == "dup":
            report.duplicates[key] = what
            dup_pairs.append((key, what))
        else:
            filled = []
            for kit_key, tname in what:
                if kit_key not in kit_shapes:
                    report.shape_errors[key] = (f"maps to {kit_key}, which this model does not have (is it built "
                                                "with BayesPFLConfig.released_code()?)")
                    continue
                fn, note = _TRANSFORMS[tname]
                shape = kit_shapes[kit_key]
                if tensor.numel() != math.prod(shape):
                    report.shape_errors[key] = f"{tuple(tensor.shape)} does not fit {kit_key} {tuple(shape)}"
                    continue
                value = fn(tensor.detach(), shape)
                if tname == "half":
                    factor = _log_var_factor(model, kit_key)
                    if factor == 1.0:  # the kit's encoder already reads the head as 0.5 h
                        value, note = tensor.detach(), ""
                    elif factor != RELEASED_LOG_VAR_SCALE:
                        value, note = tensor.detach() * factor, f"x{factor:g} (released 0.5 h / kit log_var_scale)"
                if tuple(value.shape) != tuple(shape):
                    report.shape_errors[key] = (f"{tuple(tensor.shape)} -> {tuple(value.shape)} does not fit "
                                                f"{kit_key} {tuple(shape)}")
                    continue
                out[kit_key] = value
                filled.append(kit_key)
                if note:
                    report.transforms[kit_key] = note
            if filled:
                report.matched[key] = filled
    meta = any(t.is_meta for t in sd.values())
    report.verified_duplicates = verify_duplicates and not meta
    for key, canon in dup_pairs:
        if canon not in sd:
            # the canonical copy is absent: fall back to this copy
            report.duplicates.pop(key)
            sub = {canon: sd[key]}
            kit_state, sub_report = map_reference_state_dict(sub, model, verify_duplicates=False)
            out.update(kit_state)
            report.matched[key] = sub_report.matched.get(canon, [])
            report.transforms.update(sub_report.transforms)
            report.shape_errors.update(sub_report.shape_errors)
            continue
        if report.verified_duplicates:
            a, b = sd[key], sd[canon]
            if a.shape != b.shape or not torch.equal(a, b):
                diff = "shape" if a.shape != b.shape else f"max |diff| {float((a.float() - b.float()).abs().max()):.3g}"
                report.duplicate_mismatches[key] = diff
    report.missing_in_kit = sorted(set(kit_shapes) - set(out))
    return out, report


def _log_var_factor(model, kit_key: str) -> float:
    """Factor on the released log-variance head so that the kit's encoder gives log sigma^2 = 0.5 h.

    The kit's :class:`bpfl.flow.GaussianEncoder` computes log sigma^2 = ``log_var_scale`` x head; BayesPFL builds it
    with the default 1.0 (factor 0.5). Should a model be built with ``log_var_scale=0.5``, no scaling is needed.
    """
    module = model
    for part in kit_key.split(".")[:2]:  # e.g. "context_flow", "encoder"
        module = getattr(module, part, None)
    scale = float(getattr(module, "log_var_scale", 1.0))
    return RELEASED_LOG_VAR_SCALE / scale


def _released_config(sd: dict[str, torch.Tensor], backbone, config: BayesPFLConfig | None) -> BayesPFLConfig:
    """``released_code()`` for this backbone, with B, P, Q, K and the MLP width read off the checkpoint."""
    if config is None:
        config = BayesPFLConfig.released_code()
        if backbone is not None:
            config = config.replace(backbone=backbone.name, pretrained=backbone.pretrained,
                                    image_size=backbone.image_size, layers=tuple(backbone.layers))
    changes: dict[str, Any] = {}
    if "prompt_context" in sd:
        changes["n_prompts"], changes["n_context"] = (int(n) for n in sd["prompt_context"].shape[:2])
    if "prompt_state_normal" in sd:
        changes["n_state"] = int(sd["prompt_state_normal"].shape[1])
    if "PFL_normal.amor_u" in sd:
        changes["flow_length"] = int(sd["PFL_normal.amor_u"].shape[1])
    elif "PFL_context.amor_b.weight" in sd:
        changes["flow_length"] = int(sd["PFL_context.amor_b.weight"].shape[0])
    enc = "PFL_context.encoder.weight_mean.module.0.weight"
    if enc in sd:
        hidden = int(sd[enc].shape[0])
        width = backbone.vision_width if backbone is not None else None
        if width is None or hidden != max(width // 2, 1):
            changes["flow_hidden"] = hidden
    changes = {k: v for k, v in changes.items() if getattr(config, k) != v}
    return config.replace(**changes) if changes else config


def load_reference_checkpoint(path_or_state_dict, backbone=None, device=None, *, config: BayesPFLConfig | None = None,
                              strict: bool = True, return_report: bool = False):
    """Build a :class:`BayesPFL` with the released-code preset and load the authors' checkpoint into it.

    Args:
        path_or_state_dict: ``train_visa.pth`` / ``train_mvtec.pth`` (``{'MyModel': state_dict}``) or the dict.
        backbone: a :class:`bpfl.backbone.ClipBackbone`; default: ViT-L-14-336 with OpenAI weights at 518 px and
            exact GELU, as ``BayesPFLConfig.released_code()`` says (the weights must be available locally).
        device: where to build the backbone when ``backbone`` is None.
        config: override the configuration (default: ``released_code()`` matched to the backbone, with B, P, Q,
            K and the flow MLP width read off the checkpoint).
        strict: raise ``ValueError`` (with the report) when a kit tensor stays unfilled, a key is unknown, a
            shape does not fit or two stored copies of a shared module differ.
        return_report: also return the :class:`ReferenceLoadReport`.

    Returns the model in eval mode (``model.reference_report`` holds the report; it is also logged), or
    ``(model, report)``.
    """

    sd = read_reference_state_dict(path_or_state_dict)
    cfg = _released_config(sd, backbone, config)
    if backbone is not None:
        C, V = backbone.embed_dim, backbone.vision_width
        w = sd.get("RCA.linear_proj.0.weight")
        if w is not None and tuple(w.shape) != (C, V):
            raise ValueError(f"the checkpoint's patch projections are {tuple(w.shape)} (C x V) but the backbone "
                             f"{backbone.name} has C={C}, V={V}; the released checkpoints need ViT-L-14-336")
        n_proj = len([k for k in sd if re.fullmatch(r"RCA\.linear_proj\.\d+\.weight", k)])
        if n_proj and n_proj != len(backbone.layers):
            raise ValueError(f"the checkpoint has {n_proj} patch layers, the backbone uses {len(backbone.layers)}")
    model = BayesPFL(cfg, backbone=backbone, device=device)
    kit_state, report = map_reference_state_dict(sd, model)
    if strict and not report.ok:
        raise ValueError("the released checkpoint does not fit the kit's released-code model:\n" + report.format())
    dev = model.device
    model.load_trainable_state_dict({k: v.to(dev) for k, v in kit_state.items()}, strict=False)
    model.reference_report = report
    log.info(report.format())
    model.eval()
    return (model, report) if return_report else model


def export_reference_state_dict(model, *, include_unused: bool = True) -> dict[str, torch.Tensor]:
    """The inverse map: a kit model (released-code preset) as a released ``Context_Prompting`` state dict.

    Duplicated modules are written under every key the released code stores them; with ``include_unused`` the
    decoder and ``p_mu`` tensors the released module also holds are written as zeros (they never influence its
    outputs). Wrap the result as ``{'MyModel': sd}`` for the authors' scripts.
    """
    kit = {k: v.detach() for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    bb = model.backbone
    cfg = model.config
    hidden = cfg.flow_hidden or max(bb.vision_width // 2, 1)
    fuse_hidden = model.patch_to_global.fuse.out_features if hasattr(model.patch_to_global, "fuse") else None
    layout = reference_layout(bb.embed_dim, bb.vision_width, len(bb.layers), cfg.n_prompts, cfg.n_context,
                              cfg.n_state, cfg.flow_length, hidden, fuse_hidden)
    out: dict[str, torch.Tensor] = {}
    for key, shape in layout.items():
        rule = _rule(key)
        kind, what = rule
        if kind == "unused":
            if include_unused:
                out[key] = torch.zeros(shape)
            continue
        source = what if kind == "dup" else key
        kit_key, tname = _rule(source)[1][0]
        if kit_key not in kit:
            raise ValueError(f"the model has no {kit_key} (needed for {key}); export needs the released-code preset")
        value = kit[kit_key]
        if tname == "half":
            value = value / _log_var_factor(model, kit_key)
        out[key] = value.reshape(shape).clone()
    return out
