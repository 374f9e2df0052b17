"""The Bayes-PFL model: anomaly maps and scores (paper §3.5, Eq. 11-12) on top of §3.2-3.4.

``BayesPFL(config).forward(images, class_names)`` runs, for a batch of N images:

1. the frozen CLIP image encoder -> x_cls and L layers of raw patch tokens (:mod:`bpfl.backbone`);
2. one linear layer per layer -> F^I_l (L2-normalised) and the global image embedding x = x_cls + x_patch;
3. R Monte-Carlo samples from the image-specific (ISD, context) and image-agnostic (IAD, states) prompt flows
   (:mod:`bpfl.flow`, Eq. 6), fused into the prompt banks (:mod:`bpfl.prompts`, Eq. 8-9) and encoded in one
   batched text pass -> 2·B·R text embeddings per image;
4. the text branch score s_text (softmax of x against each normal/abnormal pair, averaged over B·R);
5. per layer, RCA (:mod:`bpfl.rca`, Eq. 10) then the anomaly map of each pair (Eq. 11), averaged over L·B·R
   (Eq. 12, image ensemble) -- accumulated in chunks so the [N, L·B·R, h, w] stack is never materialised
   unless asked for;
6. s = s_text + max(M).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import losses as L
from .backbone import ClipBackbone, ImageFeatures, load_backbone
from .config import BayesPFLConfig
from .flow import FlowSample, PromptFlow, flow_kl, standard_normal_log_prob
from .prompts import PromptBanks, class_tokens, encode_prompts
from .rca import ResidualCrossModalAttention

#: elements of one full-resolution chunk of maps while accumulating the mean map (16 MB in fp32: reused by the
#: allocator instead of fetched from the OS each time; measured faster and leaner than 64 MB, benchmarks/README.md)
MAP_CHUNK_ELEMENTS = 1 << 22



#: prompt designs other than Bayes-PFL's banks + flows, by ``config.prompt_design`` name: a builder
#: ``(config, backbone) -> nn.Module`` whose ``forward(model, feats, x, class_names, n_samples, generator)`` returns
#: the text features. Filled by :mod:`bpfl.prompt_designs` (imported by ``bpfl``) through
#: :func:`register_prompt_design`.
PROMPT_DESIGNS: dict[str, Callable[[BayesPFLConfig, ClipBackbone], nn.Module]] = {}


def register_prompt_design(name: str, builder: Callable[[BayesPFLConfig, ClipBackbone], nn.Module]) -> None:
    """Make ``config.prompt_design = name`` build its text prompts with ``builder(config, backbone)``."""
    PROMPT_DESIGNS[name] = builder

@dataclass
class BayesPFLOutput:
    """What :meth:`BayesPFL.forward` returns. Shapes for N images, R samples, B prompts, L layers, h x w maps.

    ``anomaly_map`` [N, h, w]: M of Eq. 12 (mean abnormal probability). ``image_score`` [N]: s (§3.5).
    ``text_score`` [N]: s_text. ``map_max`` [N]: s_img = max(M). ``image_logits`` [N, 2, R', B']: scaled
    similarities of x with each normal/abnormal embedding (R' = B' = 1 in text-ensemble mode).
    ``text_embeddings`` [N, 2, R', B', C] (unit norm, before RCA). ``kl``: flow terms of Eq. 7.
    Optional (on request): ``pair_maps`` [N, L, R'·B', h, w], ``layer_maps`` [N, L, h, w],
    ``sample_maps`` [N, R', h, w] (mean over L and B for each sample r).
    """

    anomaly_map: torch.Tensor
    image_score: torch.Tensor
    text_score: torch.Tensor
    map_max: torch.Tensor
    image_logits: torch.Tensor
    text_embeddings: torch.Tensor
    kl: dict[str, torch.Tensor] = field(default_factory=dict)
    pair_maps: torch.Tensor | None = None
    layer_maps: torch.Tensor | None = None
    sample_maps: torch.Tensor | None = None


def flow_kl_weighted_log_det(sample: FlowSample, log_det_weight: float) -> torch.Tensor:
    """Eq. 7's flow terms with the log-det term scaled by ``log_det_weight`` (w):

    E_{q0}[log q0(z0) − w · Σ_k log|det_k| − log p(z_K)], averaged over the R draws and then the items.
    w = 1 is :func:`bpfl.flow.flow_kl`; the released code's IAD terms have w = 1/N (``iad_log_det_weight``).
    """
    per_draw = (PromptFlow.log_q0(sample.z0, sample.mu, sample.log_var) - log_det_weight * sample.log_det
                - standard_normal_log_prob(sample.zk))
    return per_draw.mean(0).mean()


class AttentionPooling(nn.Module):
    """x_patch of the released code (``Global_Feature``): Linear -> softmax-weighted token sum -> Linear."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 512):
        super().__init__()
        self.fuse = nn.Linear(in_dim, hidden)
        self.score = nn.Linear(hidden, 1)
        self.out = nn.Linear(hidden, out_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # [N, HW, in] -> [N, out]
        h = self.fuse(tokens)
        a = torch.softmax(self.score(h), dim=1)
        return self.out((a * h).sum(1))


class BayesPFL(nn.Module):
    """Bayes-PFL on a frozen CLIP backbone. Trainable state: prompts, flows, RCA, projections, temperatures."""

    def __init__(self, config: BayesPFLConfig | None = None, backbone: ClipBackbone | None = None,
                 device: str | torch.device | None = None):
        super().__init__()
        cfg = self.config = config or BayesPFLConfig()
        if backbone is None:
            backbone = load_backbone(cfg.backbone, cfg.pretrained, cfg.image_size, cfg.layers, device,
                                     quick_gelu=cfg.quick_gelu, precision=cfg.precision)
        self.backbone = backbone
        C, D, V = backbone.embed_dim, backbone.text_width, backbone.vision_width
        n_layers = len(backbone.layers)
        bayes = cfg.prompt_design == "bayes-pfl"  # other designs bring their own prompts, no flows
        self.prompts = (PromptBanks(cfg.n_prompts, cfg.n_context, cfg.n_state, D, cfg.prompt_init_std,
                                    cfg.state_init_mean) if bayes else None)
        # §3.1: one linear layer per patch layer into the joint space (no bias, as released)
        self.patch_projections = nn.ModuleList([nn.Linear(V, C, bias=False) for _ in range(n_layers)])
        # §3.5: x_patch
        if cfg.x_patch_pool == "gap":
            self.patch_to_global = nn.Linear(n_layers * C, C)
        else:
            self.patch_to_global = AttentionPooling(n_layers * V, C, hidden=max(V // 2, 1))
        # §3.3: prompt flows
        hidden = cfg.flow_hidden or max(V // 2, 1)
        flow_kw = dict(hidden_dim=hidden, n_flows=cfg.flow_length, constrained=cfg.constrained_flow,
                       log_var_scale=cfg.log_var_scale)
        self.context_flow = None
        self.context_xi = None
        if not bayes:
            pass
        elif cfg.context_distribution == "isd":
            self.context_flow = PromptFlow(D, in_dim=C, amortized=cfg.isd_amortized, cond_dim=C, **flow_kw)
        elif cfg.context_distribution == "iad":
            self.context_flow = PromptFlow(D, in_dim=C, **flow_kw)
            self.context_xi = nn.Parameter(torch.randn(1, C))
        self.normal_flow = self.abnormal_flow = None
        self.normal_xi = self.abnormal_xi = None
        if not bayes:
            pass
        elif cfg.state_distribution == "iad":
            init = cfg.iad_flow_init  # its own switch: iad_share_flow changes the sharing and nothing else
            self.normal_flow = PromptFlow(D, in_dim=C, init=init, **flow_kw)
            shared_flow = self.normal_flow.flow if cfg.iad_share_flow else None
            self.abnormal_flow = PromptFlow(D, in_dim=C, init=init, encoder=self.normal_flow.encoder,
                                            flow=shared_flow, **flow_kw)
            self.normal_xi = nn.Parameter(torch.randn(1, C))
            self.abnormal_xi = nn.Parameter(torch.randn(1, C))
        elif cfg.state_distribution == "isd":
            self.normal_flow = PromptFlow(D, in_dim=C, **flow_kw)
            self.abnormal_flow = PromptFlow(D, in_dim=C, **flow_kw)
        # §3.4
        self.rca = (ResidualCrossModalAttention(C, cfg.rca_heads, cfg.rca_bias, cfg.rca_normalize_output)
                    if cfg.use_rca else None)
        # logit scales on the cosines of Eq. 11 and s_text: fixed at config.temperature (paper: 1, no scale;
        # released and teaching: CLIP's 1/0.07), learnable from that value in the released code
        log_t = torch.tensor(math.log(cfg.temperature))
        if cfg.learnable_temperature:
            self.log_temperature_pixel = nn.Parameter(log_t.clone())
            self.log_temperature_image = nn.Parameter(log_t.clone())
        else:
            self.register_buffer("log_temperature_pixel", log_t.clone(), persistent=False)
            self.register_buffer("log_temperature_image", log_t.clone(), persistent=False)
        self.class_mapping = nn.Linear(C, C) if cfg.class_mapping else None
        self.image_mapping = nn.Linear(C, C) if cfg.class_mapping else None
        self._state_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        # an alternative text-prompt design replaces banks + flows (Figure 4: APRIL-GAN+, AnomalyCLIP+, WinCLIP);
        # the designs register themselves (bpfl.prompt_designs): the model knows only this interface
        self.prompt_design = None
        if cfg.prompt_design != "bayes-pfl":
            if cfg.prompt_design not in PROMPT_DESIGNS:
                raise ValueError(f"prompt design {cfg.prompt_design!r} is not registered: import bpfl.prompt_designs "
                                 f"(registered: {sorted(PROMPT_DESIGNS) or 'none'})")
            self.prompt_design = PROMPT_DESIGNS[cfg.prompt_design](cfg, backbone)
        self.to(backbone.device)

    # ------------------------------------------------------------------ bookkeeping
    @property
    def device(self) -> torch.device:
        return self.backbone.device

    def train(self, mode: bool = True) -> "BayesPFL":
        super().train(mode)
        self.backbone.train(False)
        self._state_cache = None  # released-code IAD cache lives for one evaluation run
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The kit's own parameters only (no CLIP weights): what checkpoints store."""
        return {k: v.detach().clone() for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        own = {k for k in self.state_dict() if not k.startswith("backbone.")}
        missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
        if strict and (missing or unexpected):
            raise KeyError(f"checkpoint does not match this model/config: missing {missing[:10]}, "
                           f"unexpected {unexpected[:10]}")
        self.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)

    def reset_state_samples(self) -> None:
        """Forget the cached IAD samples (``iad_sample_once``: the released code draws them once per run)."""
        self._state_cache = None

    # ------------------------------------------------------------------ pieces
    def project_patches(self, feats: ImageFeatures) -> list[torch.Tensor]:
        """F^I_l = normalize(Linear_l(raw tokens_l)), [N, HW, C] per layer (§3.1)."""
        return [F.normalize(proj(t), dim=-1) for proj, t in zip(self.patch_projections, feats.patch_tokens)]

    def global_embedding(self, feats: ImageFeatures, patches: list[torch.Tensor]) -> torch.Tensor:
        """x = x_cls + x_patch (§3.5); x_patch = Linear(GAP(concat_l F^I_l)) (paper) or attention pooling."""
        cfg = self.config
        x = torch.zeros_like(feats.cls)
        if cfg.use_x_cls:
            x = x + feats.cls
        if cfg.use_x_patch:
            if cfg.x_patch_pool == "gap":
                x_patch = self.patch_to_global(torch.cat([p.mean(1) for p in patches], dim=-1))
            else:
                x_patch = self.patch_to_global(torch.cat(feats.patch_tokens, dim=-1))
            x = x + x_patch
        return x

    def sample_prompts(self, feats: ImageFeatures, x: torch.Tensor, n_samples: int,
                       generator: torch.Generator | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
        """Draw R samples phi^e, phi^n, phi^a ([R, N, D] each, None when the distribution is off) and the KLs."""
        cfg = self.config
        N = x.shape[0]
        phis: dict[str, torch.Tensor | None] = {"context": None, "normal": None, "abnormal": None}
        kls: dict[str, torch.Tensor] = {}
        xi_isd = x if cfg.isd_condition == "cls+patch" else feats.cls

        def draw(flow: PromptFlow, xi: torch.Tensor, name: str, context=None, log_det_weight: float = 1.0) -> None:
            s: FlowSample = flow(xi, n_samples, context=context, generator=generator)
            phis[name] = s.zk
            kls[name] = flow_kl(s) if log_det_weight == 1.0 else flow_kl_weighted_log_det(s, log_det_weight)

        if self.context_flow is not None:
            xi = xi_isd if cfg.context_distribution == "isd" else self.context_xi.expand(N, -1)
            draw(self.context_flow, xi, "context", context=feats.cls if cfg.isd_amortized else None)
        if self.normal_flow is not None:
            if cfg.state_distribution == "isd":
                draw(self.normal_flow, xi_isd, "normal")
                draw(self.abnormal_flow, xi_isd, "abnormal")
            elif cfg.iad_sample_once and not self.training:
                if self._state_cache is None or self._state_cache[0].shape[0] != n_samples:
                    with torch.no_grad():
                        sn = self.normal_flow(self.normal_xi, n_samples, generator=generator)
                        sa = self.abnormal_flow(self.abnormal_xi, n_samples, generator=generator)
                    self._state_cache = (sn.zk, sa.zk)
                phis["normal"] = self._state_cache[0].expand(-1, N, -1)
                phis["abnormal"] = self._state_cache[1].expand(-1, N, -1)
            else:
                w = 1.0 / N if cfg.iad_log_det_weight == "1/N" else 1.0  # released: IAD log-det / batch size
                if cfg.iad_one_sample_per_batch and self.training:  # released: z0 is 1 x C for the whole batch
                    draw(self.normal_flow, self.normal_xi, "normal", log_det_weight=w)
                    draw(self.abnormal_flow, self.abnormal_xi, "abnormal", log_det_weight=w)
                    phis["normal"] = phis["normal"].expand(-1, N, -1)
                    phis["abnormal"] = phis["abnormal"].expand(-1, N, -1)
                else:
                    draw(self.normal_flow, self.normal_xi.expand(N, -1), "normal", log_det_weight=w)
                    draw(self.abnormal_flow, self.abnormal_xi.expand(N, -1), "abnormal", log_det_weight=w)
        return phis, kls

    def prompt_embeddings(self, feats: ImageFeatures, x: torch.Tensor, class_names: Sequence[str], n_samples: int,
                          generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Text embeddings [N, 2, R, B, C] (unit norm) and the flow KL terms, from the configured prompt design."""
        if self.prompt_design is not None:
            return self.prompt_design(self, feats, x, class_names, n_samples, generator)
        phis, kls = self.sample_prompts(feats, x, n_samples, generator)
        return self.encode_prompts(class_names, phis), kls

    def encode_prompts(self, class_names: Sequence[str], phis: dict) -> torch.Tensor:
        """All 2·B·R prompts of all images in one text pass -> [N, 2, R, B, C] unit vectors (Eq. 8-9)."""
        learned = self.prompts.fuse(phis["context"], phis["normal"], phis["abnormal"])
        N = len(class_names)
        if learned.shape[0] != N:
            learned = learned.expand(N, *learned.shape[1:])
        return encode_prompts(self.backbone, learned, class_tokens(self.backbone, class_names),
                              shared_context=self.prompts.n_context)

    def text_branch(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Scaled similarities of x with every prompt: [N, 2, R, B]; s_text = mean of their softmax."""
        if self.class_mapping is not None:
            text = F.normalize(self.class_mapping(text), dim=-1)
            x = self.image_mapping(x)
        x = F.normalize(x, dim=-1)
        return self.log_temperature_image.exp() * torch.einsum("nc,nsrbc->nsrb", x, text)

    def pair_logit_differences(self, patches: list[torch.Tensor], text: torch.Tensor) -> torch.Tensor:
        """Eq. 10-11 at patch resolution: logit(abnormal) - logit(normal) for every layer and pair.

        ``text`` [N, 2, R, B, C] -> [N, L, R·B, H, W]. Softmax over the two channels after a linear upsampling
        equals sigmoid(Up(difference)), so the difference is all the maps need.
        """
        N, _, R, B, C = text.shape
        H, W = self.backbone.grid_size
        z = text.permute(0, 2, 3, 1, 4).reshape(N, R * B * 2, C)  # rows: (r, b, state)
        tau = self.log_temperature_pixel.exp()
        out = []
        for patch in patches:  # L is small (4); the pairs and images are batched
            zl = self.rca(z, patch) if self.rca is not None else z
            zl = F.normalize(zl, dim=-1)
            logits = tau * patch @ zl.transpose(1, 2)  # [N, HW, RB*2]
            logits = logits.reshape(N, H * W, R * B, 2)
            out.append((logits[..., 1] - logits[..., 0]).transpose(1, 2).reshape(N, R * B, H, W))
        return torch.stack(out, dim=1)

    def upsample(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=self.config.upsample_align_corners)

    # ------------------------------------------------------------------ forward
    def forward(self, images: torch.Tensor | None, class_names: Sequence[str], n_samples: int | None = None, *,
                features: ImageFeatures | None = None, generator: torch.Generator | None = None,
                map_size: int | tuple[int, int] | None = None, return_pair_maps: bool | None = None,
                return_layer_maps: bool = False, return_sample_maps: bool = False) -> BayesPFLOutput:
        """Run Bayes-PFL on a batch.

        ``images`` [N, 3, S, S] CLIP-normalised (or ``features`` precomputed by ``backbone.encode_image``);
        ``class_names`` one category name per image; ``n_samples`` R (default: config.train_samples in training
        mode, config.test_samples in eval mode). ``map_size`` defaults to the input size. ``return_pair_maps``
        (default: True in training mode) keeps every [L, R·B] map for the losses; otherwise the mean map is
        accumulated in chunks so memory does not grow with R.
        """
        cfg = self.config
        R = n_samples or (cfg.train_samples if self.training else cfg.test_samples)
        feats = features if features is not None else self.backbone.encode_image(images)
        feats = feats.to(self.device)
        N = feats.cls.shape[0]
        if len(class_names) != N:
            raise ValueError(f"got {len(class_names)} class names for {N} images")
        if map_size is None:
            map_size = self.backbone.image_size
        size = (map_size, map_size) if isinstance(map_size, int) else tuple(map_size)
        if return_pair_maps is None:
            return_pair_maps = self.training

        patches = self.project_patches(feats)
        x = self.global_embedding(feats, patches)
        text, kls = self.prompt_embeddings(feats, x, class_names, R, generator)  # [N, 2, R, B, C]
        if cfg.ensemble == "text":  # Table 4: average the embeddings first
            text = F.normalize(text.mean(dim=(2, 3), keepdim=True), dim=-1)

        image_logits = self.text_branch(x, text)
        text_score = torch.softmax(image_logits, dim=1)[:, 1].mean(dim=(1, 2))

        diff = self.pair_logit_differences(patches, text)  # [N, L, RB, H, W]
        n_layers, n_pairs = diff.shape[1], diff.shape[2]
        pair_maps = layer_maps = sample_maps = None
        if return_pair_maps:
            # in place: the upsampling's backward keeps no tensor, so this saves one full-size copy in training
            pair_maps = self.upsample(diff.flatten(1, 2), size).sigmoid_().unflatten(1, (n_layers, n_pairs))
            anomaly_map = pair_maps.mean(dim=(1, 2))
            if return_layer_maps:
                layer_maps = pair_maps.mean(2)
            if return_sample_maps:
                sample_maps = pair_maps.unflatten(2, (-1, text.shape[3])).mean(dim=(1, 3))
        else:
            anomaly_map, layer_maps, sample_maps = self._accumulate_maps(diff, size, text.shape[3],
                                                                         return_layer_maps, return_sample_maps)
        map_max = anomaly_map.flatten(1).max(dim=1).values
        image_score = torch.zeros_like(text_score)
        if cfg.use_s_text:
            image_score = image_score + text_score
        if cfg.use_s_img:
            image_score = image_score + map_max
        return BayesPFLOutput(anomaly_map=anomaly_map, image_score=image_score, text_score=text_score,
                              map_max=map_max, image_logits=image_logits, text_embeddings=text, kl=kls,
                              pair_maps=pair_maps, layer_maps=layer_maps, sample_maps=sample_maps)

    def _accumulate_maps(self, diff: torch.Tensor, size: tuple[int, int], n_prompts: int,
                         want_layers: bool, want_samples: bool):
        """Eq. 12 streamed: mean of sigmoid(Up(diff)) over L·R·B in chunks of full-resolution maps.

        The L·R·B maps form one axis (k = l·R·B + r·B + b), so a small R is a single chunk; a chunk holds at most
        ``MAP_CHUNK_ELEMENTS`` values and the sigmoid is applied in place, so memory does not grow with R.
        """
        N, n_layers, n_pairs = diff.shape[:3]
        h, w = size
        n_maps = n_layers * n_pairs
        flat = diff.flatten(1, 2)  # [N, L·R·B, H, W]
        chunk = max(1, MAP_CHUNK_ELEMENTS // max(1, N * h * w))
        total = diff.new_zeros(N, h, w)
        layer_maps = diff.new_zeros(N, n_layers, h, w) if want_layers else None
        sample_maps = diff.new_zeros(N, n_pairs // n_prompts, h, w) if want_samples else None
        for start in range(0, n_maps, chunk):
            stop = min(n_maps, start + chunk)
            probs = self.upsample(flat[:, start:stop], size).sigmoid_()  # [N, k, h, w]
            total += probs.sum(1)
            if layer_maps is not None or sample_maps is not None:
                k = torch.arange(start, stop, device=diff.device)
                if layer_maps is not None:
                    layer_maps.index_add_(1, k // n_pairs, probs, alpha=1.0 / n_pairs)
                if sample_maps is not None:
                    sample_maps.index_add_(1, (k % n_pairs) // n_prompts, probs, alpha=1.0 / (n_layers * n_prompts))
        return total / n_maps, layer_maps, sample_maps

    # ------------------------------------------------------------------ losses (§3.6)
    def loss(self, out: BayesPFLOutput, masks: torch.Tensor, labels: torch.Tensor,
             generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Eq. 14 (with Eq. 7 and 13) for one training batch: every term and the weighted total.

        ``masks`` [N, h, w] in {0,1} at the map size, ``labels`` [N] in {0,1}.
        """
        cfg = self.config
        if out.pair_maps is None:
            raise ValueError("loss() needs pair maps: call forward(..., return_pair_maps=True) (default in training)")
        masks = masks.to(out.pair_maps.device).float()
        labels = labels.to(out.pair_maps.device).long()
        N, n_layers, n_pairs = out.pair_maps.shape[:3]
        logits = out.image_logits.flatten(2)  # [N, 2, R*B]
        pairs = list(range(n_pairs))
        if cfg.loss_pairs == "one":  # released: one random prompt pair for the whole step
            pairs = [int(torch.randint(n_pairs, (1,), generator=generator).item())]
        # every layer and pair in one fused autograd node (chunked, closed-form backward): maps [N, L·P, h, w]
        maps = out.pair_maps if len(pairs) == n_pairs else out.pair_maps[:, :, pairs]
        focal, dice = L.focal_dice_per_map(maps.flatten(1, 2), masks, balanced=cfg.focal_balanced)
        focal, dice = focal.view(n_layers, len(pairs)), dice.view(n_layers, len(pairs))
        reduce = torch.sum if cfg.seg_layer_reduction == "sum" else torch.mean
        # CE of [N, 2, P] against the label of every pair = the mean of the per-pair CEs
        cls = L.classification_loss(logits[:, :, pairs], labels[:, None].expand(N, len(pairs)))
        t = out.text_embeddings  # [N, 2, R, B, C]
        ort = None
        if cfg.use_ort and t.shape[3] > 1:
            tn = t[:, 0].reshape(-1, t.shape[3], t.shape[4])
            ta = t[:, 1].reshape(-1, t.shape[3], t.shape[4])
            ort = L.orthogonal_loss(tn, ta, reduction=cfg.ort_reduction)
        return L.total_loss(cls=cls, focal=reduce(focal, dim=0).mean(), dice=reduce(dice, dim=0).mean(), ort=ort,
                            kl_context=out.kl.get("context"), kl_normal=out.kl.get("normal"),
                            kl_abnormal=out.kl.get("abnormal"), ort_weight=cfg.ort_weight,
                            kl_weight=cfg.kl_weight)
