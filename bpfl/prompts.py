"""Two-class prompt banks (paper §3.2, Eq. 1-2) and prompt fusion with flow samples (§3.3, Eq. 8-9).

A prompt of bank b for state s in {normal, abnormal} is the token sequence

    [SOT][E_b,1 + phi^e_r] ... [E_b,P + phi^e_r][S^s_b,1 + phi^s_r] ... [S^s_b,Q + phi^s_r][class words][EOT]

The context vectors E are shared by both banks; S^n and S^a are the learnable state vectors. The class words
come from tokenising ``"X " + class name``: the placeholder X (position 1) is replaced by the P + Q learned
vectors, exactly where the released code splices them. All 2·B·R prompts of all N images of a batch are
encoded in **one** batched text-transformer pass, truncated after the last EOT; the normal and abnormal prompt of
a pair share ``[SOT][E + phi^e_r]``, which the causal text tower then computes once for both (see
:meth:`bpfl.backbone.ClipBackbone.encode_shared_prefix`; equal to the plain pass up to float rounding).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbone import ClipBackbone

#: Category folder name -> class words used in the prompts (the released code's remap, VPB.py:8-18).
CLASS_NAME_REMAP = {
    "macaroni1": "macaroni", "macaroni2": "macaroni",
    "pcb1": "printed circuit board", "pcb2": "printed circuit board",
    "pcb3": "printed circuit board", "pcb4": "printed circuit board",
    "pipe_fryum": "pipe fryum", "chewinggum": "chewing gum", "metal_nut": "metal nut",
}


def prompt_class_name(category: str) -> str:
    """The words a category contributes to its prompts: the remap above, underscores to spaces, lowercase."""
    name = CLASS_NAME_REMAP.get(category, CLASS_NAME_REMAP.get(category.lower(), category))
    return name.replace("_", " ").strip().lower()


class PromptBanks(nn.Module):
    """Learnable normal/abnormal prompt banks, Eq. 1-2.

    ``context`` E: [B, P, D] shared by both banks; ``state_normal`` S^n and ``state_abnormal`` S^a: [B, Q, D].
    D is the text width. Initialised trunc-normal with std 0.02; the states at mean +m / -m
    (``state_init_mean``; the released code uses m = 0.5, the paper does not say, the kit's default is 0).
    """

    def __init__(self, n_prompts: int, n_context: int, n_state: int, width: int,
                 init_std: float = 0.02, state_init_mean: float = 0.0):
        super().__init__()
        self.context = nn.Parameter(torch.empty(n_prompts, n_context, width))
        self.state_normal = nn.Parameter(torch.empty(n_prompts, n_state, width))
        self.state_abnormal = nn.Parameter(torch.empty(n_prompts, n_state, width))
        nn.init.trunc_normal_(self.context, std=init_std)
        nn.init.trunc_normal_(self.state_normal, mean=state_init_mean, std=init_std)
        nn.init.trunc_normal_(self.state_abnormal, mean=-state_init_mean, std=init_std)

    @property
    def n_prompts(self) -> int:
        return self.context.shape[0]

    @property
    def n_context(self) -> int:
        return self.context.shape[1]

    @property
    def n_state(self) -> int:
        return self.state_normal.shape[1]

    def fuse(self, phi_context: torch.Tensor | None, phi_normal: torch.Tensor | None,
             phi_abnormal: torch.Tensor | None) -> torch.Tensor:
        """Eq. 8-9: add flow samples to every context / state token of every prompt.

        ``phi_*``: [R, N, D] (or None for a missing distribution: no shift). Returns the learned part of all
        prompts, [N, 2, R, B, P + Q, D] with index 0 = normal bank, 1 = abnormal bank.
        """
        B, P, D = self.context.shape
        ref = next(p for p in (phi_context, phi_normal, phi_abnormal) if p is not None) \
            if any(p is not None for p in (phi_context, phi_normal, phi_abnormal)) else None
        R, N = (ref.shape[0], ref.shape[1]) if ref is not None else (1, 1)

        def shift(phi):  # [R, N, D] -> [N, R, 1, 1, D]
            if phi is None:
                return torch.zeros(1, 1, 1, 1, D, dtype=self.context.dtype, device=self.context.device)
            return phi.permute(1, 0, 2)[:, :, None, None, :]

        ctx = self.context[None, None] + shift(phi_context)  # [N, R, B, P, D]
        s_n = self.state_normal[None, None] + shift(phi_normal)  # [N, R, B, Q, D]
        s_a = self.state_abnormal[None, None] + shift(phi_abnormal)
        ctx = ctx.expand(N, R, B, P, D)
        normal = torch.cat([ctx, s_n.expand(N, R, B, -1, D)], dim=3)
        abnormal = torch.cat([ctx, s_a.expand(N, R, B, -1, D)], dim=3)
        return torch.stack([normal, abnormal], dim=1)


@dataclass
class ClassTokens:
    """Token embeddings of ``"X " + class name`` per image, with the X removed.

    ``sot``: [N, 1, D]; ``rest``: [N, L - 2, D] (class words, EOT, padding); ``eot``: [N] EOT index in the
    original 77-token sequence.
    """

    sot: torch.Tensor
    rest: torch.Tensor
    eot: torch.Tensor


def class_tokens(backbone: ClipBackbone, class_names: Sequence[str]) -> ClassTokens:
    """Tokenise each image's class words once (unique names only) and embed them."""
    words = [prompt_class_name(c) for c in class_names]
    unique = sorted(set(words))
    ids = backbone.tokenize(["X " + w for w in unique])
    with torch.no_grad():
        emb = backbone.embed_tokens(ids)
    eot = backbone.eot_positions(ids)
    index = torch.tensor([unique.index(w) for w in words], device=emb.device)
    return ClassTokens(sot=emb[index, :1], rest=emb[index, 2:], eot=eot[index])


#: at inference the prompts of at most this many Monte-Carlo samples go through the text tower at once, so that
#: the peak memory of R = 20 is that of R = 8 (each prompt is encoded independently: the result is the same)
TEXT_CHUNK_SAMPLES = 8


def encode_prompts(backbone: ClipBackbone, learned: torch.Tensor, tokens: ClassTokens,
                   truncate: bool = True, shared_context: int = 0) -> torch.Tensor:
    """Encode every prompt of a batch in one text pass.

    ``learned``: [N, 2, R, B, P+Q, D] from :meth:`PromptBanks.fuse`; ``tokens`` from :func:`class_tokens`.
    ``shared_context``: how many leading learned tokens are the same in the normal and the abnormal prompt of
    each (image, sample, bank) -- P for the Bayes-PFL banks, whose context E + phi^e_r is shared (Eq. 8). With
    ``truncate``, a causal text tower and open_clip's standard blocks, ``[SOT][those tokens]`` is then encoded
    once per pair and the two prompts continue from its cached keys/values
    (:meth:`~bpfl.backbone.ClipBackbone.encode_shared_prefix`); the result is the same up to float rounding.
    Returns L2-normalised text embeddings [N, 2, R, B, C].
    """
    N, S, R, B, M, D = learned.shape
    if R > TEXT_CHUNK_SAMPLES and not torch.is_grad_enabled():  # inference: bounded memory whatever R
        return torch.cat([encode_prompts(backbone, learned[:, :, r:r + TEXT_CHUNK_SAMPLES], tokens, truncate,
                                         shared_context) for r in range(0, R, TEXT_CHUNK_SAMPLES)], dim=2)
    n = N * S * R * B
    length = backbone.context_length
    expand = lambda t, k: t[:, None].expand(N, k, *t.shape[1:]).reshape(N * k, *t.shape[1:])  # noqa: E731
    rest = tokens.rest
    if truncate:  # only up to the last EOT: the causal text transformer never looks further
        rest = rest[:, :int(tokens.eot.max()) - 1]
    eot = (tokens.eot + M - 1)[:, None].expand(N, S * R * B).reshape(n)
    if int(eot.max()) >= length:
        raise ValueError(f"class name too long: with {M} learned tokens the prompt exceeds {length} tokens")
    dtype = learned.dtype
    if truncate and backbone.supports_shared_prefix:
        k = max(0, min(int(shared_context), M)) if S == 2 else 0
        # prefix [SOT][first k learned tokens] once per (image, sample, bank); index n*R*B + r*B + b
        prefix = torch.cat([expand(tokens.sot, R * B).to(dtype),
                            learned[:, 0, :, :, :k].reshape(N * R * B, k, D)], dim=1)
        suffix = torch.cat([learned[..., k:, :].reshape(n, M - k, D), expand(rest, S * R * B).to(dtype)], dim=1)
        parent = torch.arange(N * R * B, device=learned.device).reshape(N, 1, R * B).expand(N, S, R * B).reshape(n)
        feats = backbone.encode_shared_prefix(prefix, suffix, parent, eot - (1 + k))
    else:
        seq = torch.cat([expand(tokens.sot, S * R * B).to(dtype), learned.reshape(n, M, D),
                         expand(rest, S * R * B).to(dtype)], dim=1)[:, :length]
        feats = backbone.encode_token_embeddings(seq, eot, truncate=truncate)
    return F.normalize(feats, dim=-1).reshape(N, S, R, B, -1)
