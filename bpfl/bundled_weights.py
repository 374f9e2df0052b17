"""The toy CLIP that ships inside the package: one safetensors file, hash-checked, rebuildable (issue 18).

A fresh clone has no pretrained CLIP and no internet, so the kit carries the weights of its own toy CLIP
(:mod:`bpfl.toyclip`, seed 0, the default recipe) in ``bpfl/weights/``:

* ``bpfl-toy-seed0.safetensors`` -- the weights (safetensors: plain tensors, never a pickle);
* ``bpfl-toy-seed0.json`` -- the manifest: the file's sha256 (checked at every load), the recipe, seed, held-out
  families and words, torch version and machine of the build, and the transfer numbers measured with exactly
  this file (written by ``benchmarks/toy_clip_transfer.py --bundled --update-manifest``).

**How it fits in 10 MB** (the sizes are measured by :func:`size_options` at every build and kept in the manifest):
the toy CLIP has 4.6 M parameters, 3.2 M of them in the token-embedding table (49,408 BPE tokens x 64), of which
pretraining touches only the few hundred rows its captions use. The table starts from
:func:`initial_token_table` -- N(0, 0.02^2) drawn by numpy's PCG64 from the seed, the same on every machine --
and Adam never moves a row whose gradient was always zero (no weight decay on the table), so the untouched rows
are regenerated from the seed instead of stored. Everything else is stored in float32. Unpacking gives back the
pretrained weights **exactly** (maximum difference 0, checked when the file is written and recorded in the
manifest as ``max_abs_diff_vs_pretrained``; ``weights_sha256`` is the hash of the unpacked weights, checked by the
tests). Storing everything in float16 instead would be 9.2 MB with a rounding error of ~1e-3 relative.

Rebuild (about 15-35 min on 2 CPU cores): ``bpfl pretrain-toy-clip --bundle``.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

#: the ``pretrained`` value that names the bundled weights (``load_backbone("bpfl-toy", "bpfl-bundled")``)
BUNDLED_TAG = "bpfl-bundled"
BUNDLED_ARCH = "bpfl-toy"
BUNDLE_DIR = Path(__file__).resolve().parent / "weights"
BUNDLED_FILE = BUNDLE_DIR / "bpfl-toy-seed0.safetensors"
FORMAT = "bpfl-toyclip-bundle-v1"
TOKEN_TABLE = "token_embedding.weight"
_ROWS, _VALUES = "token_embedding.touched_rows", "token_embedding.touched_values"
#: std of open_clip's token-embedding initialisation (and of the toy CLIP's: what an unseen word looks like)
TOKEN_INIT_STD = 0.02
#: the size limit of issue 18 for a file inside the package
MAX_BYTES = 10 * 1000 * 1000


class BundledWeightsError(RuntimeError):
    """The bundled toy CLIP is missing, corrupted or replaced."""


def initial_token_table(seed: int, vocab_size: int, width: int) -> torch.Tensor:
    """The token-embedding table the toy CLIP starts from: N(0, 0.02^2) drawn by numpy's PCG64 from ``seed``.

    numpy's ``Generator`` gives the same stream on every platform (unlike torch's CPU ``normal_``, whose AVX2
    path uses approximate log/sin), so the rows that pretraining never touches are regenerated from the seed
    instead of being stored."""
    rng = np.random.default_rng([int(seed), 0x70CE7AB1E])
    table = rng.standard_normal((int(vocab_size), int(width)), dtype=np.float32) * np.float32(TOKEN_INIT_STD)
    return torch.from_numpy(table)


def manifest_path(path: str | Path = BUNDLED_FILE) -> Path:
    return Path(path).with_suffix(".json")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors (sorted by name: name, dtype, shape, raw bytes): equal hashes = equal weights."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        t = state_dict[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- packing
def pack_state_dict(state_dict: dict[str, torch.Tensor], seed: int) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) to store: every tensor but the token table as it is, plus the table's touched rows."""
    table = state_dict[TOKEN_TABLE].detach().cpu().float()
    init = initial_token_table(seed, *table.shape)
    touched = (table != init).any(dim=1).nonzero().flatten()
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items() if k != TOKEN_TABLE}
    tensors[_ROWS] = touched.to(torch.int64)
    tensors[_VALUES] = table[touched].contiguous()
    # one metadata key holding sorted JSON: safetensors writes a multi-key metadata map in random order, and the
    # file's bytes (and sha256) must be the same at every rebuild of the same weights
    meta = {"bpfl": json.dumps({"format": FORMAT, "token_seed": int(seed), "vocab_size": int(table.shape[0]),
                                "width": int(table.shape[1])}, sort_keys=True)}
    return tensors, meta


def unpack_state_dict(tensors: dict[str, torch.Tensor], metadata: dict) -> dict[str, torch.Tensor]:
    """The full state dict back from :func:`pack_state_dict`'s output (the untouched rows regenerated)."""
    try:
        info = json.loads((metadata or {})["bpfl"])
    except (KeyError, ValueError):
        info = {}
    if info.get("format") != FORMAT:
        raise BundledWeightsError(f"not a bundled toy CLIP (format {info.get('format')!r}, expected {FORMAT!r})")
    table = initial_token_table(int(info["token_seed"]), int(info["vocab_size"]), int(info["width"]))
    table[tensors[_ROWS]] = tensors[_VALUES].float()
    sd = {k: v for k, v in tensors.items() if k not in (_ROWS, _VALUES)}
    sd[TOKEN_TABLE] = table
    return sd


def size_options(state_dict: dict[str, torch.Tensor], seed: int) -> dict:
    """Bytes of the ways to store the weights (issue 18: measured, not assumed), and fp16's rounding error."""
    from safetensors.torch import save as st_save

    full32 = {k: v.detach().cpu().float().contiguous() for k, v in state_dict.items()}
    full16 = {k: v.half() for k, v in full32.items()}
    packed, meta = pack_state_dict(state_dict, seed)
    err = max(float((v.half().float() - v).abs().max()) for v in full32.values())
    rel = float((full32[TOKEN_TABLE].half().float() - full32[TOKEN_TABLE]).abs().max()
                / full32[TOKEN_TABLE].abs().max())
    return {"fp32_full_bytes": len(st_save(full32)), "fp16_full_bytes": len(st_save(full16)),
            "fp16_max_abs_error": err, "fp16_token_table_max_rel_error": rel,
            "packed_fp32_bytes": len(st_save(packed, metadata=meta)),
            "touched_token_rows": int(packed[_ROWS].numel()), "token_rows": int(full32[TOKEN_TABLE].shape[0])}


def write_bundle(state_dict: dict[str, torch.Tensor], seed: int, out: str | Path = BUNDLED_FILE,
                 provenance: dict | None = None) -> dict:
    """Write the packed weights to ``out`` and the manifest beside it; return the manifest.

    The file is read back and unpacked before the manifest is written: any difference from ``state_dict`` is an
    error (the bundled weights *are* the pretrained ones)."""
    from safetensors.torch import load_file, save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().float().contiguous() for k, v in state_dict.items()}
    tensors, meta = pack_state_dict(sd, seed)
    tmp = out.with_suffix(".safetensors.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    back = unpack_state_dict(load_file(str(tmp)), _read_metadata(tmp))
    diff = max(float((back[k] - sd[k]).abs().max()) for k in sd)
    if set(back) != set(sd) or diff != 0.0:
        tmp.unlink()
        raise BundledWeightsError(f"packing changed the weights (max difference {diff}); not written")
    tmp.replace(out)
    size = out.stat().st_size
    if size > MAX_BYTES:
        raise BundledWeightsError(f"{out} is {size / 1e6:.1f} MB, over the {MAX_BYTES / 1e6:.0f} MB limit")
    manifest = {"format": FORMAT, "file": out.name, "sha256": sha256_file(out), "bytes": size,
                "weights_sha256": weights_sha256(sd), "max_abs_diff_vs_pretrained": diff,
                "tolerance": "exact: unpacking regenerates the untouched token rows bit for bit (numpy PCG64), "
                             "every other tensor is stored in float32 as trained",
                "size_options": size_options(sd, seed), **(provenance or {})}
    old = read_manifest(out) if manifest_path(out).is_file() else {}
    if old.get("sha256") == manifest["sha256"] and "transfer" in old:
        manifest["transfer"] = old["transfer"]  # same file: its measured numbers still hold
    _write_json(manifest_path(out), manifest)
    return manifest


def write_manifest(manifest: dict, path: str | Path = BUNDLED_FILE) -> None:
    """Rewrite the manifest beside ``path`` (e.g. to add measured transfer numbers); the weights are untouched."""
    _write_json(manifest_path(path), manifest)


def _read_metadata(path: Path) -> dict:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)


# ----------------------------------------------------------------------------------------------- reading
def read_manifest(path: str | Path = BUNDLED_FILE) -> dict:
    """The manifest beside the bundled file (``{}`` plus a clear error when it is missing or unreadable)."""
    m = manifest_path(path)
    try:
        return json.loads(m.read_text())
    except FileNotFoundError:
        raise BundledWeightsError(f"the bundled toy CLIP's manifest {m} is missing: restore it "
                                  f"(`git checkout -- {m.name}` in {m.parent}) or rebuild both with "
                                  "`bpfl pretrain-toy-clip --bundle`") from None
    except ValueError as e:
        raise BundledWeightsError(f"the bundled toy CLIP's manifest {m} is not valid JSON ({e}): restore it or "
                                  "rebuild with `bpfl pretrain-toy-clip --bundle`") from None


def verify_bundle(path: str | Path = BUNDLED_FILE) -> dict:
    """Check the file against its manifest's sha256; return the manifest. Raises :class:`BundledWeightsError`."""
    path = Path(path)
    if not path.is_file():
        raise BundledWeightsError(f"the bundled toy CLIP {path} is missing: restore it (`git checkout -- "
                                  f"{path.name}` in {path.parent}) or rebuild it with "
                                  "`bpfl pretrain-toy-clip --bundle`")
    manifest = read_manifest(path)
    have = sha256_file(path)
    if have != manifest.get("sha256"):
        raise BundledWeightsError(
            f"the bundled toy CLIP {path} does not match its manifest (sha256 {have[:12]}..., manifest "
            f"{str(manifest.get('sha256'))[:12]}...): the file is corrupted or was replaced. Restore it "
            f"(`git checkout -- {path.name}` in {path.parent}) or rebuild it with `bpfl pretrain-toy-clip --bundle`")
    return manifest


def read_bundle(path: str | Path = BUNDLED_FILE) -> dict[str, torch.Tensor]:
    """The bundled toy CLIP's full state dict (open_clip keys), after checking its sha256."""
    from safetensors.torch import load

    verify_bundle(path)
    data = Path(path).read_bytes()
    try:
        tensors = load(data)
        meta = _metadata_of_bytes(data)
    except Exception as e:  # a file that matches its hash but cannot be read: a broken build
        raise BundledWeightsError(f"the bundled toy CLIP {path} cannot be read ({e}); rebuild it with "
                                  "`bpfl pretrain-toy-clip --bundle`") from None
    return unpack_state_dict(tensors, meta)


def _metadata_of_bytes(data: bytes) -> dict:
    """safetensors header metadata from the file's bytes (8-byte little-endian header length, then JSON)."""
    n = int.from_bytes(data[:8], "little")
    return dict(json.loads(data[8:8 + n].decode()).get("__metadata__") or {})


def bundle_available(path: str | Path = BUNDLED_FILE) -> bool:
    return Path(path).is_file() and manifest_path(path).is_file()


def short_hash(path: str | Path = BUNDLED_FILE) -> str:
    """The first 12 hex digits of the bundled file's sha256 (from the manifest), for provenance lines."""
    return str(read_manifest(path).get("sha256", ""))[:12]


def describe(path: str | Path = BUNDLED_FILE) -> str:
    """One line for banners and provenance: what the bundled weights are and their hash prefix."""
    return f"the kit's bundled toy CLIP (sha256 {short_hash(path)}; pretrained offline on procedural surfaces)"


__all__ = ["BUNDLED_ARCH", "BUNDLED_FILE", "BUNDLED_TAG", "BUNDLE_DIR", "BundledWeightsError", "MAX_BYTES",
           "bundle_available", "describe", "initial_token_table", "manifest_path", "pack_state_dict", "read_bundle",
           "read_manifest", "sha256_file", "short_hash", "size_options", "unpack_state_dict", "verify_bundle",
           "weights_sha256", "write_bundle", "write_manifest"]
