"""The frozen CLIP backbone (paper §3.1, §4.1), built on open_clip.

What Bayes-PFL needs from CLIP, and nothing else:

* :meth:`ClipBackbone.encode_image` -> ``x_cls`` (``ln_post(CLS) @ proj``, [N, C]) and the *raw* residual-stream
  patch tokens of the chosen blocks (paper: 6, 12, 18, 24 of ViT-L/14), each [N, HW, C_vision], CLS dropped,
  no ``ln_post`` and no ``proj`` -- exactly what the released code feeds downstream.
* :meth:`ClipBackbone.encode_token_embeddings` -> projected EOT features from token *embeddings*, so learned
  prompt vectors can be spliced in after SOT (Eq. 1-2, 8-9). :meth:`encode_text` goes through the same path.
  The text transformer is causal, so positions after the last EOT cannot influence it: the transformer runs on
  the shortest prefix that contains every EOT (about 16 of 77 positions for Bayes-PFL's prompts) and the
  result is exactly equal to the full 77-token pass.

Loading (:func:`load_backbone`) accepts an open_clip pretrained tag (``"openai"``), a local checkpoint file
(open_clip/state-dict ``.pt``/``.bin``/``.safetensors``, or OpenAI's TorchScript ``.pt``), ``local-dir:PATH``
(an ``open_clip_config.json`` + weights folder) or ``None``/``"random"`` for random weights. The image size is
forced (``force_image_size``) and the positional embedding of a checkpoint saved at another size is resized
bicubically with the CLS entry kept. When weights are not cached and the hub is unreachable it raises
:class:`WeightsNotAvailableError` within a second, saying what to do.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F
from open_clip.model import resize_pos_embed, resize_text_pos_embed

from .bundled_weights import BUNDLED_ARCH, BUNDLED_TAG, read_bundle, short_hash

log = logging.getLogger(__name__)

#: the kit's own open_clip architectures (bpfl-tiny, bpfl-toy), registered with open_clip on import
MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
if "bpfl-tiny" not in open_clip.list_models():
    open_clip.add_model_config(MODEL_CONFIG_DIR)

#: The tiny architecture used with random weights by tests, CI and offline runs.
TINY_BACKBONE = "bpfl-tiny"
RANDOM_TAGS = {None, "", "none", "random"}


class WeightsNotAvailableError(RuntimeError):
    """Pretrained weights are neither cached nor downloadable from here. The message says what to do."""


# --------------------------------------------------------------------------------------------- devices
def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else the first of cuda -> mps -> cpu that is available."""
    if device is not None and str(device) != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast_context(device: torch.device, precision: str = "fp32"):
    """Mixed precision on accelerators (``bf16``/``fp16``); a no-op for ``fp32`` and on the CPU."""
    if precision == "fp32" or device.type == "cpu":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype)


# --------------------------------------------------------------------------------------------- features
@dataclass
class ImageFeatures:
    """Output of :meth:`ClipBackbone.encode_image`.

    ``cls``: [N, C] projected global feature x_cls (``ln_post(CLS) @ proj``), not normalised.
    ``patch_tokens``: one [N, HW, C_vision] tensor per selected layer (raw residual stream, CLS dropped).
    ``grid``: (H, W) of the patch grid.
    """

    cls: torch.Tensor
    patch_tokens: list[torch.Tensor]
    grid: tuple[int, int]

    def to(self, *args, **kwargs) -> "ImageFeatures":
        return ImageFeatures(self.cls.to(*args, **kwargs), [t.to(*args, **kwargs) for t in self.patch_tokens],
                             self.grid)

    def __getitem__(self, idx) -> "ImageFeatures":
        return ImageFeatures(self.cls[idx], [t[idx] for t in self.patch_tokens], self.grid)

    @staticmethod
    def cat(items: Sequence["ImageFeatures"]) -> "ImageFeatures":
        return ImageFeatures(torch.cat([f.cls for f in items]),
                             [torch.cat(ts) for ts in zip(*[f.patch_tokens for f in items])], items[0].grid)


class ClipBackbone(nn.Module):
    """A frozen open_clip CLIP model exposing the features Bayes-PFL uses.

    Build it with :func:`load_backbone`. All CLIP parameters have ``requires_grad=False``; the module stays in
    eval mode (``train()`` is a no-op on it). Gradients still flow *through* the text path into prompt
    vectors spliced into the token embeddings.
    """

    #: how the image encoder's attention runs (``load_backbone(attention=...)``): ``"sdpa"`` fused
    #: ``scaled_dot_product_attention`` (flash attention on CPU and GPU), ``"mha-fastpath"`` torch's native
    #: ``nn.MultiheadAttention`` inference fast path (separate bmm + softmax: 1.2-1.4x slower on the ViT-L encoder,
    #: benchmarks/README.md)
    ATTENTION_MODES = ("sdpa", "mha-fastpath")

    def __init__(self, clip: nn.Module, tokenizer, *, name: str, pretrained: str | None,
                 layers: Sequence[int], image_size: int, precision: str = "fp32", attention: str = "sdpa"):
        super().__init__()
        self.clip = clip
        self.tokenizer = tokenizer
        self.name = name
        self.pretrained = pretrained
        self.precision = precision
        if attention not in self.ATTENTION_MODES:
            raise ValueError(f"attention={attention!r}: use one of {self.ATTENTION_MODES}")
        self.attention = attention
        n_blocks = len(clip.visual.transformer.resblocks)
        layers = tuple(int(l) for l in layers)
        bad = [l for l in layers if not 1 <= l <= n_blocks]
        if bad:
            raise ValueError(f"layers {bad} out of range for {name} with {n_blocks} vision blocks (1-based)")
        self.layers = layers
        self.image_size = int(image_size)
        for p in self.clip.parameters():
            p.requires_grad_(False)
        self.clip.eval()
        tok = tokenizer(["x"])
        self.sot_token_id = int(tok[0, 0])
        self.eot_token_id = int(tok[0].max())  # CLIP's EOT is the largest id (49407)

    # ------------------------------------------------------------------ description
    @property
    def embed_dim(self) -> int:
        return int(self.clip.text_projection.shape[1])

    @property
    def vision_width(self) -> int:
        return int(self.clip.visual.conv1.out_channels)

    @property
    def text_width(self) -> int:
        return int(self.clip.token_embedding.embedding_dim)

    @property
    def patch_size(self) -> int:
        return int(self.clip.visual.conv1.kernel_size[0])

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(int(g) for g in self.clip.visual.grid_size)

    @property
    def context_length(self) -> int:
        return int(self.clip.positional_embedding.shape[0])

    @property
    def device(self) -> torch.device:
        return self.clip.positional_embedding.device

    @property
    def is_random(self) -> bool:
        return self.pretrained in RANDOM_TAGS

    @property
    def is_toy(self) -> bool:
        """The kit's toy CLIP (bundled or built locally): it knows synthetic surfaces only."""
        return self.name == BUNDLED_ARCH and not self.is_random

    def weights_label(self) -> str:
        """What the weights are, in a few words (the bundled toy CLIP with its sha256 prefix)."""
        if self.is_random:
            return "random weights"
        if self.pretrained == BUNDLED_TAG:
            return f"bundled toy CLIP, sha256 {short_hash()}"
        if self.is_toy:
            return f"toy CLIP from {self.pretrained}"
        return f"pretrained={self.pretrained}"

    def describe(self) -> str:
        return (f"{self.name} ({self.weights_label()}) at {self.image_size}px, layers {list(self.layers)}, "
                f"device {self.device}")

    def train(self, mode: bool = True) -> "ClipBackbone":  # CLIP is frozen: always eval
        super().train(False)
        return self

    # ------------------------------------------------------------------ image side
    @staticmethod
    def native_bf16(device: str | torch.device) -> bool:
        """Whether ``device`` computes bfloat16 natively: a CUDA GPU with bf16 support, or a CPU with AVX512-BF16
        or AMX (oneDNN then runs bf16 matmuls at about twice the fp32 rate; elsewhere bf16 is emulated and slower
        than fp32)."""
        device = torch.device(device)
        if device.type == "cuda":
            return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        if device.type == "cpu":
            checks = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
            if any(c is not None for c in checks):
                return any(bool(c()) for c in checks if c is not None)
            try:  # older torch: the kernel's CPU flags
                flags = Path("/proc/cpuinfo").read_text().split()
            except OSError:
                return False
            return "avx512_bf16" in flags or "amx_bf16" in flags
        return device.type == "mps"

    @property
    def image_compute_dtype(self) -> torch.dtype:
        """The dtype the image encoder computes in: ``precision`` under autocast on a GPU (and MPS); on a CPU, bf16
        only where it is native (:meth:`native_bf16`), else fp32 (fp16 is never used on a CPU)."""
        if self.precision == "fp32":
            return torch.float32
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]
        if self.device.type == "cpu" and not (dtype == torch.bfloat16 and self.native_bf16(self.device)):
            return torch.float32
        return dtype

    @staticmethod
    @contextlib.contextmanager
    def _mha_fastpath(enabled: bool):
        """``torch.backends.mha.set_fastpath_enabled`` for the duration of a block (restored afterwards)."""
        before = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(enabled)
        try:
            yield
        finally:
            torch.backends.mha.set_fastpath_enabled(before)

    def image_encoder_context(self) -> contextlib.ExitStack:
        """The settings the image encoder runs under (each measured, ``benchmarks/bench_inference.py`` part e):

        * ``attention="sdpa"``: torch's ``nn.MultiheadAttention`` inference fast path is switched off, so open_clip's
          blocks go through ``F.multi_head_attention_forward`` and its fused ``scaled_dot_product_attention``
          (flash attention) instead of a separate bmm + softmax + bmm; equal to 4e-6 on ViT-L;
        * autocast to :attr:`image_compute_dtype` when it is not fp32 (bf16 on a CPU with native bf16, the
          ``precision`` on a GPU).

        ``torch.no_grad`` rather than ``torch.inference_mode``: no faster here (measured), and inference tensors
        could not be saved for the backward pass of the projections that training applies to these features.
        """
        stack = contextlib.ExitStack()
        stack.enter_context(self._mha_fastpath(self.attention == "mha-fastpath"))
        dtype = self.image_compute_dtype
        if dtype != torch.float32:
            stack.enter_context(torch.autocast(device_type=self.device.type, dtype=dtype))
        return stack

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> ImageFeatures:
        """images [N, 3, S, S] (CLIP-normalised) -> :class:`ImageFeatures` (x_cls and per-layer patch tokens).

        Runs under :meth:`image_encoder_context` (fused attention; bf16 where asked for and native); the features
        are returned in fp32 whatever the compute dtype. (On a CPU only the image encoder follows ``precision``;
        the text path stays fp32 there, :func:`autocast_context`.)
        """
        visual = self.clip.visual
        images = images.to(self.device, non_blocking=True)
        with self.image_encoder_context():
            out = visual.forward_intermediates(images, indices=[l - 1 for l in self.layers],
                                               output_fmt="NLC", intermediates_only=False)
        return ImageFeatures(cls=out["image_features"].float(),
                             patch_tokens=[t.float() for t in out["image_intermediates"]],
                             grid=self.grid_size)

    # ------------------------------------------------------------------ text side
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts)).to(self.device)

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token ids [..., L] -> token embeddings [..., L, D_text] (no positional embedding)."""
        return self.clip.token_embedding(token_ids.to(self.device))

    def eot_positions(self, token_ids: torch.Tensor) -> torch.Tensor:
        return (token_ids == self.eot_token_id).int().argmax(dim=-1)

    def encode_token_embeddings(self, embeddings: torch.Tensor, eot_positions: torch.Tensor,
                                truncate: bool = True) -> torch.Tensor:
        """Text transformer on token embeddings -> projected EOT features [n, C] (not normalised).

        ``embeddings`` [n, L, D] (L <= context length), ``eot_positions`` [n]. With ``truncate`` the transformer
        runs only on the first ``max(eot_positions) + 1`` positions: the attention mask is causal, so the EOT
        outputs are exactly those of the full-length pass.
        """
        clip = self.clip
        n, length, _ = embeddings.shape
        eot_positions = eot_positions.to(embeddings.device).long()
        if truncate:
            length = int(eot_positions.max()) + 1
            embeddings = embeddings[:, :length]
        cast = clip.transformer.get_cast_dtype()
        with autocast_context(self.device, self.precision):
            x = embeddings.to(cast) + clip.positional_embedding[:length].to(cast)
            mask = clip.attn_mask[:length, :length] if clip.attn_mask is not None else None
            x = clip.transformer(x, attn_mask=mask)
            x = clip.ln_final(x)
            x = x[torch.arange(n, device=x.device), eot_positions]
            proj = clip.text_projection
            x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return x.float()

    @property
    def supports_shared_prefix(self) -> bool:
        """Whether :meth:`encode_shared_prefix` can run this text tower exactly: a causal mask and open_clip's
        standard pre-norm blocks (``ResidualAttentionBlock`` with a packed ``nn.MultiheadAttention``)."""
        clip = self.clip
        if getattr(clip, "attn_mask", None) is None or not hasattr(clip, "transformer"):
            return False
        parts = ("ln_1", "ls_1", "ln_2", "mlp", "ls_2")
        for blk in clip.transformer.resblocks:
            attn = getattr(blk, "attn", None)
            if (not isinstance(attn, nn.MultiheadAttention) or attn.in_proj_weight is None
                    or hasattr(blk, "ln_1_kv") or not all(hasattr(blk, a) for a in parts)):
                return False
        return True

    def encode_shared_prefix(self, prefix: torch.Tensor, suffix: torch.Tensor, parent: torch.Tensor,
                             eot_in_suffix: torch.Tensor) -> torch.Tensor:
        """Text transformer on sequences ``cat(prefix[parent[i]], suffix[i])`` -> projected EOT features [n, C].

        ``prefix`` [m, Lp, D] and ``suffix`` [n, Ls, D] are token embeddings (no positional embedding);
        ``parent`` [n] long, which prefix each sequence starts with; ``eot_in_suffix`` [n], the EOT position
        counted from the start of the suffix. Because the text mask is causal, a prefix's hidden states do not
        depend on what follows it: they are computed once per prefix (not once per sequence), and the suffix
        tokens attend to the cached prefix keys/values of every block. In the last block only the EOT query is
        computed (nothing else is read). The result equals :meth:`encode_token_embeddings` on the concatenated
        sequences up to float rounding (tested). Used for the normal/abnormal prompt pairs, which share
        ``[SOT][context]`` (Eq. 8: both banks add the same context sample).
        """
        clip = self.clip
        m, lp, _ = prefix.shape
        n, ls, _ = suffix.shape
        dev = prefix.device
        parent = parent.to(dev).long()
        eot = eot_in_suffix.to(dev).long()
        rows = torch.arange(n, device=dev)
        cast = clip.transformer.get_cast_dtype()
        blocks = list(clip.transformer.resblocks)
        # suffix queries see every prefix position and the causal part of the suffix
        mask = torch.ones(ls, lp + ls, dtype=torch.bool, device=dev)
        mask[:, lp:] = torch.ones(ls, ls, dtype=torch.bool, device=dev).tril()

        def heads(t: torch.Tensor, h: int) -> torch.Tensor:  # [b, L, D] -> [b, h, L, D/h]
            return t.unflatten(-1, (h, -1)).transpose(1, 2)

        def merge(t: torch.Tensor) -> torch.Tensor:  # [b, h, L, d] -> [b, L, h*d]
            return t.transpose(1, 2).flatten(2)

        with autocast_context(self.device, self.precision):
            pos = clip.positional_embedding.to(cast)
            xp = prefix.to(cast) + pos[:lp]
            xs = suffix.to(cast) + pos[lp:lp + ls]
            for i, blk in enumerate(blocks):
                a = blk.attn
                h = a.num_heads
                qp, kp, vp = (heads(t, h) for t in
                              F.linear(blk.ln_1(xp), a.in_proj_weight, a.in_proj_bias).chunk(3, dim=-1))
                qs, ks, vs = (heads(t, h) for t in
                              F.linear(blk.ln_1(xs), a.in_proj_weight, a.in_proj_bias).chunk(3, dim=-1))
                keys = torch.cat([kp[parent], ks], dim=2)
                values = torch.cat([vp[parent], vs], dim=2)
                if i < len(blocks) - 1:
                    ap = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True)
                    xp = xp + blk.ls_1(a.out_proj(merge(ap)))
                    xp = xp + blk.ls_2(blk.mlp(blk.ln_2(xp)))
                    at = F.scaled_dot_product_attention(qs, keys, values, attn_mask=mask)
                    xs = xs + blk.ls_1(a.out_proj(merge(at)))
                    xs = xs + blk.ls_2(blk.mlp(blk.ln_2(xs)))
                else:  # last block: only the EOT row is read
                    q = qs[rows, :, eot][:, :, None]  # [n, h, 1, d]
                    at = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[eot][:, None, None])
                    x = xs[rows, eot][:, None] + blk.ls_1(a.out_proj(merge(at)))
                    xs = (x + blk.ls_2(blk.mlp(blk.ln_2(x))))[:, 0]
            x = clip.ln_final(xs if len(blocks) else xs[rows, eot])
            proj = clip.text_projection
            x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return x.float()

    def encode_text(self, texts: Sequence[str], truncate: bool = True) -> torch.Tensor:
        """Strings -> projected text features [n, C]; equals open_clip's ``model.encode_text(tokenizer(texts))``."""
        ids = self.tokenize(texts)
        return self.encode_token_embeddings(self.embed_tokens(ids), self.eot_positions(ids), truncate=truncate)


# --------------------------------------------------------------------------------------------- loading
def _hf_cache_dir(cache_dir: str | None) -> str:
    if cache_dir:
        return str(cache_dir)
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
        return str(HF_HUB_CACHE)
    except Exception:  # pragma: no cover - old huggingface_hub
        return str(Path.home() / ".cache" / "huggingface" / "hub")


def offline_requested() -> bool:
    """True when HF_HUB_OFFLINE / BPFL_OFFLINE / TRANSFORMERS_OFFLINE ask for no network."""
    return any(os.environ.get(v, "").strip().lower() in {"1", "true", "yes", "on"}
               for v in ("HF_HUB_OFFLINE", "BPFL_OFFLINE", "TRANSFORMERS_OFFLINE"))


def host_reachable(host: str, port: int = 443, timeout: float = 0.5) -> bool:
    """Can a TCP connection to ``host`` be opened within ``timeout`` seconds?"""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def cached_weights_file(cfg: dict, cache_dir: str | None = None) -> str | None:
    """The local file open_clip would load for a pretrained tag, if it is already cached."""
    hub = cfg.get("hf_hub", "")
    if hub:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            repo_id, filename = os.path.split(hub.rstrip("/")) if not hub.endswith("/") else (hub.rstrip("/"), "")
            names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
            if filename.endswith(".bin"):
                names.insert(0, filename[:-4] + ".safetensors")
            for name in names:
                hit = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
                if isinstance(hit, str) and os.path.isfile(hit):
                    return hit
    url = cfg.get("url", "")
    if url:
        root = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "clip"
        candidate = root / os.path.basename(url)
        if candidate.is_file():
            return str(candidate)
    return None


def _missing_weights_message(name: str, tag: str, cfg: dict, cache_dir: str | None, why: str) -> str:
    hub = cfg.get("hf_hub", "").rstrip("/")
    url = cfg.get("url", "")
    lines = [
        f"Pretrained weights for CLIP '{name}' (pretrained='{tag}') are not available: {why}.",
        f"  They are looked up in the Hugging Face cache {_hf_cache_dir(cache_dir)}"
        + (f" (repo {hub})" if hub else "") + (f" and in {Path.home() / '.cache' / 'clip'}" if url else "") + ".",
        "What to do:",
        "  1. On a machine with internet, download them once:",
        f"       python -c \"import open_clip; open_clip.create_model('{name}', pretrained='{tag}')\"",
    ]
    if hub:
        lines.append(f"     (or: huggingface-cli download {hub}) and copy the folder "
                     f"models--{hub.replace('/', '--')} into {_hf_cache_dir(cache_dir)} here;")
    if url:
        lines.append(f"  2. or download the file {url}")
        lines.append(f"     and pass it explicitly: --pretrained /path/to/{os.path.basename(url)}  "
                     f"(load_backbone(..., pretrained='/path/to/{os.path.basename(url)}'));")
    else:
        lines.append("  2. or pass a local checkpoint file: --pretrained /path/to/weights.pt;")
    lines.append(f"  3. or run offline with random weights: --backbone {TINY_BACKBONE} --pretrained random "
                 "(mechanics only: no zero-shot transfer).")
    return "\n".join(lines)


def _read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a CLIP checkpoint file: safetensors, a (possibly wrapped) state dict, or OpenAI's TorchScript archive."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        sd = load_file(str(path), device="cpu")
    else:
        is_torchscript = False
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                is_torchscript = any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())
        if is_torchscript:
            sd = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
            sd = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    sd = {k: v for k, v in sd.items() if k not in {"input_resolution", "context_length", "vocab_size"}}
    if sd and next(iter(sd)).startswith("module."):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _looks_like_openai(sd: dict) -> bool:
    # OpenAI checkpoints keep everything in fp16 and name the text projection at top level.
    w = sd.get("visual.conv1.weight")
    return w is not None and w.dtype == torch.float16 and "text_projection" in sd


def load_state_dict_into(clip: nn.Module, path: str | Path | dict) -> None:
    """Load a checkpoint file (or a state dict) into an open_clip model, resizing the positional embeddings to the
    model's grid.

    Every key must match (``strict=True``); a mismatch raises with the offending keys listed.
    """
    sd = dict(path) if isinstance(path, dict) else _read_state_dict(path)
    path = "(state dict)" if isinstance(path, dict) else path
    # TorchScript archives also store non-persistent buffers (e.g. the causal attn_mask): not weights.
    non_persistent = {n for n, _ in clip.named_buffers()} - set(clip.state_dict())
    sd = {k: v for k, v in sd.items() if k not in non_persistent}
    resize_pos_embed(sd, clip)  # bicubic, CLS kept (open_clip)
    resize_text_pos_embed(sd, clip)
    if "logit_scale" in sd and sd["logit_scale"].ndim != clip.logit_scale.ndim:
        sd["logit_scale"] = sd["logit_scale"].reshape(clip.logit_scale.shape)
    missing, unexpected = clip.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {path} does not fit this architecture: missing keys {missing[:8]}"
                           f"{'...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
                           f"{'...' if len(unexpected) > 8 else ''}. Is --backbone the right architecture?")


def load_backbone(name: str = "ViT-L-14-336", pretrained: str | None = "openai", image_size: int = 518,
                  layers: Iterable[int] = (6, 12, 18, 24), device: str | torch.device | None = None,
                  quick_gelu: bool | None = None, precision: str = "fp32",
                  cache_dir: str | None = None, attention: str = "sdpa") -> ClipBackbone:
    """Build a frozen :class:`ClipBackbone` through open_clip.

    ``precision``: ``"fp32"``, or ``"bf16"``/``"fp16"`` autocast: everywhere on a GPU; on a CPU bf16 applies to the
    image encoder where the CPU has native bf16 (AVX512-BF16, AMX), otherwise fp32 runs (with a warning).
    ``attention``: the image encoder's attention kernel (:attr:`ClipBackbone.ATTENTION_MODES`; default fused SDPA).

    ``name``: an open_clip architecture (``ViT-L-14-336``, ``ViT-B-16``, ``bpfl-tiny``...) or ``local-dir:PATH``.
    ``pretrained``: an open_clip tag (``openai``), a checkpoint file, ``"bpfl-bundled"`` (the toy CLIP inside the
    package, ``name="bpfl-toy"``; :mod:`bpfl.bundled_weights`), or ``None``/``"random"``.
    ``image_size``: forced input size; at 518 px ViT-L/14 gives a 37x37 grid (positional embedding resized).
    ``quick_gelu``: None = what the weights need (QuickGELU for OpenAI weights); False reproduces the released
    code's exact-GELU towers.
    """
    dev = pick_device(device)
    pretrained = None if pretrained in RANDOM_TAGS else str(pretrained)
    layers = tuple(layers)
    file_path = None
    state_dict = None
    tag_cfg: dict = {}
    if pretrained == BUNDLED_TAG:
        if name != BUNDLED_ARCH:
            raise ValueError(f"pretrained='{BUNDLED_TAG}' is the bundled toy CLIP: use it with --backbone "
                             f"{BUNDLED_ARCH}, not {name}")
        state_dict = read_bundle()
        quick_gelu = bool(quick_gelu)
    elif name.startswith("local-dir:"):
        folder = Path(name[len("local-dir:"):])
        if not (folder / "open_clip_config.json").is_file():
            raise FileNotFoundError(f"'{name}': expected {folder / 'open_clip_config.json'} and a weights file "
                                    "(open_clip_model.safetensors or open_clip_pytorch_model.bin) in that folder")
        pretrained = str(folder)
    elif pretrained is not None:
        if os.path.isfile(pretrained):
            file_path = pretrained
        else:
            tag_cfg = open_clip.get_pretrained_cfg(name, pretrained) or {}
            if not tag_cfg:
                looks_like_path = any(s in pretrained for s in ("/", "\\", ".pt", ".bin", ".safetensors"))
                if looks_like_path:
                    raise FileNotFoundError(f"--pretrained {pretrained}: no such file. Give the path of a CLIP "
                                            "checkpoint (.pt, .bin, .safetensors) or an open_clip tag.")
                tags = open_clip.list_pretrained_tags_by_model(name)
                raise ValueError(f"'{pretrained}' is neither a file nor a known pretrained tag for {name}; "
                                 f"known tags: {tags or 'none'}")
            cached = cached_weights_file(tag_cfg, cache_dir)
            if cached is None:
                if offline_requested():
                    raise WeightsNotAvailableError(_missing_weights_message(
                        name, pretrained, tag_cfg, cache_dir, "they are not cached and HF_HUB_OFFLINE is set"))
                host = "huggingface.co" if tag_cfg.get("hf_hub") else "openaipublic.azureedge.net"
                if not host_reachable(host):
                    raise WeightsNotAvailableError(_missing_weights_message(
                        name, pretrained, tag_cfg, cache_dir, f"they are not cached and {host} is unreachable"))
            else:
                file_path = cached
            if quick_gelu is None:
                quick_gelu = bool(tag_cfg.get("quick_gelu", False))

    if file_path is not None and quick_gelu is None:
        quick_gelu = _looks_like_openai(_read_state_dict(file_path))
    kwargs = dict(force_image_size=image_size, force_quick_gelu=bool(quick_gelu))
    if name.startswith("local-dir:"):
        clip = open_clip.create_model(name, **kwargs, cache_dir=cache_dir)  # the folder's config decides GELU
    elif file_path is not None or state_dict is not None:
        with _without_random_init_warning():  # the weights are loaded from the file right below
            clip = open_clip.create_model(name, pretrained=None, **kwargs)
        load_state_dict_into(clip, state_dict if state_dict is not None else file_path)
    elif pretrained is not None:  # a tag that is downloadable right now
        clip = open_clip.create_model(name, pretrained=pretrained, cache_dir=cache_dir, **kwargs)
    else:  # random weights, as asked: say so once (ClipBackbone.is_random), not through open_clip's root logger
        with _without_random_init_warning():
            clip = open_clip.create_model(name, pretrained=None, **kwargs)
    clip = clip.to(dev).float()
    tokenizer = open_clip.get_tokenizer(name)
    backbone = ClipBackbone(clip, tokenizer, name=name, pretrained=pretrained, layers=layers,
                            image_size=image_size, precision=precision, attention=attention)
    if precision != "fp32" and backbone.image_compute_dtype == torch.float32:
        log.warning("precision=%s: this %s has no native %s, so the image encoder runs in fp32 (emulated bf16 "
                    "would be slower)", precision, dev.type.upper(), precision)
    return backbone


@contextlib.contextmanager
def _without_random_init_warning():
    """Hide open_clip's "No pretrained weights loaded ... initialized randomly" (logged on the root logger) while
    building an architecture whose weights come from a file next: the message would be false."""
    def keep(record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()
    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def build_clip(name: str, image_size: int | None = None, quick_gelu: bool = False) -> nn.Module:
    """A random-weight open_clip model (no download), e.g. to write test checkpoints."""
    kw = {} if image_size is None else {"force_image_size": image_size}
    return open_clip.create_model(name, pretrained=None, force_quick_gelu=quick_gelu, **kw)


def default_layers(name: str) -> tuple[int, ...]:
    """Four evenly spaced blocks, as the paper's 6/12/18/24 of 24 (bpfl-tiny: 1/2/3/4)."""
    cfg = open_clip.get_model_config(name) if not name.startswith("local-dir:") else None
    n = cfg["vision_cfg"]["layers"] if cfg else 24
    return tuple(round(n * (i + 1) / 4) for i in range(4))
