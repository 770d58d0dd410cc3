"""Checkpoint loading: validate a HookedTransformer-format state dict, build the
TransformerLens bridge with the authors' weight processing, and expose the
processed weights that the fused evaluator and the mechanism module read.

Importing TransformerLens and processing the weights takes seconds, while the
fused evaluator needs only the processed tensors (a few kB). So `load_model`
keeps those tensors in a cache (`advsearch.model.weights_cache`: an `.npz` file keyed
by the checkpoint's sha256, its spec, the versions of advsearch, torch and
TransformerLens and the code), and builds the bridge only when something asks
for `LoadedModel.bridge`. A cache file that is corrupt, records another key or
holds a wrong-shaped or non-finite array is rebuilt, and a cache folder that
cannot be written is skipped. The format needs no torch to read, which lets
`advsearch eval` answer from a warm cache without importing torch.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from advsearch.errors import AdvsearchError
from advsearch.files import sha256_file
from advsearch.model.determinism import eval_threads
from advsearch.model.spec import ModelSpec
from advsearch.model.weights_cache import (
    cache_enabled,
    cache_key,
    read_cache_arrays,
    resolve_model_path,  # fmt: skip
    write_cache_arrays,
)

log = logging.getLogger(__name__)

OPTIONAL_BUFFERS = (".attn.mask", ".attn.IGNORE")


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of an attention-only HookedTransformer with this spec."""
    d, h, dh, v, n = spec.d_model, spec.n_heads, spec.d_head, spec.d_vocab, spec.seq_len
    shapes: dict[str, tuple[int, ...]] = {"embed.W_E": (v, d), "pos_embed.W_pos": (n, d)}
    for layer in range(spec.n_layers):
        p = f"blocks.{layer}."
        shapes |= {p + "ln1.w": (d,), p + "ln1.b": (d,)}
        for m in "QKV":
            shapes |= {p + f"attn.W_{m}": (h, d, dh), p + f"attn.b_{m}": (h, dh)}
        shapes |= {p + "attn.W_O": (h, dh, d), p + "attn.b_O": (d,)}
    shapes |= {"ln_final.w": (d,), "ln_final.b": (d,), "unembed.W_U": (d, v), "unembed.b_U": (v,)}
    return shapes


def validate_state_dict(state: dict, spec: ModelSpec, source: str = "checkpoint") -> None:
    """Raise a one-line AdvsearchError naming the first missing/unexpected/mis-shaped key."""
    if spec.normalization != "LN":
        raise AdvsearchError(f"{source}: normalization {spec.normalization!r} is not supported (only 'LN')")
    expected = expected_shapes(spec)
    for key, shape in expected.items():
        if key not in state:
            raise AdvsearchError(f"{source}: missing key {key} (expected shape {list(shape)})")
        found = tuple(state[key].shape)
        if found != shape:
            raise AdvsearchError(f"{source}: key {key} has shape {list(found)}, expected {list(shape)}")
    for key in state:
        if key not in expected and not key.endswith(OPTIONAL_BUFFERS):
            raise AdvsearchError(f"{source}: unexpected key {key} (shape {list(state[key].shape)})")


@dataclass(frozen=True)
class Weights:
    """Processed (LN-folded, centred, value-bias-folded) weights, HookedTransformer layout.

    Per-layer tensors are stacked over layers: W_Q [layer, head, d_model, d_head],
    W_O [layer, head, d_head, d_model], b_O [layer, d_model].
    """

    W_E: torch.Tensor
    W_pos: torch.Tensor
    W_Q: torch.Tensor
    b_Q: torch.Tensor
    W_K: torch.Tensor
    b_K: torch.Tensor
    W_V: torch.Tensor
    b_V: torch.Tensor
    W_O: torch.Tensor
    b_O: torch.Tensor
    W_U: torch.Tensor
    b_U: torch.Tensor
    eps: float = 1e-5

    def arrays(self) -> dict[str, np.ndarray]:
        """The tensors as numpy arrays by field name (what the weights cache and the numpy forward hold)."""
        return {n: getattr(self, n).detach().cpu().numpy() for n in WEIGHT_NAMES}


WEIGHT_NAMES = tuple(f.name for f in fields(Weights) if f.name != "eps")


class LoadedModel:
    """A checkpoint ready for use: spec, provenance, processed weights and the bridge.

    `bridge` (a processed TransformerLens TransformerBridge in eval mode: the reference
    forward and the hooks) is built on first access, from `state` (the validated raw state
    dict) or else by re-reading `path`; commands that only run the fused evaluator on
    `weights` therefore never import TransformerLens.
    """

    def __init__(self, spec: ModelSpec, path: Path, sha256: str, weights: Weights, bridge=None,
                 state: dict | None = None) -> None:  # fmt: skip
        self.spec, self.path, self.sha256, self.weights = spec, path, sha256, weights
        self._bridge, self._state = bridge, state

    @property
    def bridge(self):
        if self._bridge is None:
            state = self._state if self._state is not None else read_state_dict(self.path)
            with torch.inference_mode(False):  # first use may come inside inference mode; the bridge must not
                self._bridge = build_bridge(state, self.spec)
        return self._bridge

    @property
    def bridge_built(self) -> bool:
        """Whether the bridge exists yet (reading `bridge` builds it)."""
        return self._bridge is not None

    def __repr__(self) -> str:
        return f"LoadedModel(path={str(self.path)!r}, sha256={self.sha256[:12]!r}, spec={self.spec!r})"


def read_state_dict(path: Path) -> dict:
    if not path.exists():
        raise AdvsearchError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for corrupt files
        raise AdvsearchError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AdvsearchError(f"{path} is not a state dict of tensors")
    return state


@eval_threads()  # the processed weights (cached, shared by every command) must not depend on the thread count
def build_bridge(state: dict, spec: ModelSpec):
    """A TransformerBridge holding `state`, with HookedTransformer's load-time processing."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformer_lens.config import TransformerBridgeConfig
        from transformer_lens.model_bridge import TransformerBridge
        from transformer_lens.model_bridge.sources import native  # noqa: F401  (registers boot_native)
        from transformer_lens.utilities.tl_checkpoint_conversion import convert_tl_checkpoint

        cfg = TransformerBridgeConfig(
            d_model=spec.d_model,
            n_layers=spec.n_layers,
            n_heads=spec.n_heads,
            d_head=spec.d_head,
            n_ctx=spec.seq_len,
            d_vocab=spec.d_vocab,
            d_vocab_out=spec.d_vocab,
            attn_only=True,
            normalization_type=spec.normalization,
            positional_embedding_type="standard",
            architecture="TransformerLensNative",
        )
        bridge = TransformerBridge.boot_native(cfg)
        bridge.load_state_dict(convert_tl_checkpoint(state, cfg), strict=True)
        bridge.enable_compatibility_mode(
            disable_warnings=True,
            fold_ln=True,
            center_writing_weights=True,
            center_unembed=True,
            fold_value_biases=True,
        )
    bridge.eval()
    return bridge


def weights_from_bridge(bridge) -> Weights:
    def stack(name: str) -> torch.Tensor:
        return torch.stack([getattr(block.attn, name).detach().clone() for block in bridge.blocks])

    return Weights(
        W_E=bridge.W_E.detach().clone(),
        W_pos=bridge.W_pos.detach().clone(),
        **{n: stack(n) for n in ("W_Q", "b_Q", "W_K", "b_K", "W_V", "b_V", "W_O", "b_O")},
        W_U=bridge.W_U.detach().clone(),
        b_U=bridge.b_U.detach().clone(),
        eps=float(bridge.cfg.eps),
    )


def read_cached_weights(key: dict, spec: ModelSpec) -> Weights | None:
    """The cached weights for `key` as tensors, or None when there are none usable (see
    `advsearch.model.weights_cache.read_cache_arrays` for what is not trusted; the caller rebuilds it)."""
    cached = read_cache_arrays(key, spec)
    if cached is None:
        return None
    arrays, eps = cached
    return Weights(**{n: torch.from_numpy(arrays[n]) for n in WEIGHT_NAMES}, eps=eps)


def write_cached_weights(key: dict, weights: Weights) -> None:
    """Store `weights` under `key` (atomically; skipped quietly if the cache folder is unwritable)."""
    write_cache_arrays(key, weights.arrays(), weights.eps)


def load_model(model: str | Path | None = None) -> LoadedModel:
    """Load and validate a checkpoint (see `resolve_model_path`).

    The state dict is read and validated every time (a bad checkpoint is a one-line error);
    the processed weights come from the cache when it holds them for this exact checkpoint,
    spec and set of versions, and are otherwise computed through the bridge and cached.
    `$ADVSEARCH_NO_CACHE=1` skips the cache both ways.
    """
    path = resolve_model_path(model)
    state = read_state_dict(path)
    spec = ModelSpec.for_checkpoint(path)
    validate_state_dict(state, spec, source=str(path))
    sha = sha256_file(path)
    use_cache = cache_enabled()
    key = cache_key(sha, spec)
    weights = read_cached_weights(key, spec) if use_cache else None
    if weights is not None:
        return LoadedModel(spec=spec, path=path, sha256=sha, weights=weights, state=state)
    bridge = build_bridge(state, spec)
    weights = weights_from_bridge(bridge)
    if use_cache:
        write_cached_weights(key, weights)
    return LoadedModel(spec=spec, path=path, sha256=sha, weights=weights, bridge=bridge, state=state)
