"""Checkpoint loading: validate a HookedTransformer-format state dict, apply the
authors' weight processing, expose the processed weights that the fused
evaluator and the mechanism module read, and build the TransformerLens bridge
(the reference forward and the hooks) when something asks for it.

`process_weights` is the processing the bridge applies (fold_ln,
center_writing_weights, center_unembed, fold_value_biases), computed in the
memory layouts the bridge computes it in, so its tensors are the bridge's bit
for bit (tests/test_model.py holds it to them) without importing TransformerLens,
which alone takes seconds. `load_model` also keeps the processed tensors in a
cache (`advsearch.model.weights_cache`: an `.npz` file keyed by the checkpoint's
sha256, its spec, the versions of advsearch, torch and TransformerLens and the
code): its format needs no torch to read, which lets `advsearch eval` answer from
a warm cache without importing torch. A cache file that is corrupt, records
another key or holds a wrong-shaped or non-finite array is rebuilt, and a cache
folder that cannot be written is skipped.
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
    `weights` therefore never import TransformerLens. `from_cache` says whether `weights`
    were read from the weights cache.
    """

    def __init__(self, spec: ModelSpec, path: Path, sha256: str, weights: Weights, bridge=None,
                 state: dict | None = None, from_cache: bool = False) -> None:  # fmt: skip
        self.spec, self.path, self.sha256, self.weights = spec, path, sha256, weights
        self._bridge, self._state, self.from_cache = bridge, state, from_cache

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


@eval_threads()
def process_weights(state: dict, spec: ModelSpec) -> Weights:
    """The processed weights of a validated raw state dict: what `weights_from_bridge(build_bridge(state,
    spec))` gives, bit for bit, without TransformerLens.

    HookedTransformer's load-time processing, in its order: LayerNorm folded into the next layer
    (ln1 into W_Q/K/V and their biases, ln_final into W_U and b_U; the weights then centred over
    d_model), the writing weights (W_E, W_pos, W_O, b_O) centred, the unembedding centred over the
    vocabulary, and b_V folded into b_O. The bridge computes each step on tensors laid out as its
    linear layers store them (q/k/v as [heads*d_head, d_model], o as [d_model, heads*d_head], the
    unembedding as [vocab, d_model]), and the order of a reduction's sum follows the layout; so do
    these.
    """

    def stored_as(w: torch.Tensor, *order: int) -> torch.Tensor:  # the same values, dims laid out in `order`
        return w.permute(*order).contiguous().permute(*[order.index(i) for i in range(w.dim())])

    per_layer: dict[str, list] = {n: [] for n in ("W_Q", "b_Q", "W_K", "b_K", "W_V", "b_V", "W_O", "b_O")}
    for layer in range(spec.n_layers):
        p = f"blocks.{layer}."
        ln_w, ln_b = state[p + "ln1.w"], state[p + "ln1.b"]
        biases = {}
        for m in "QKV":
            w = stored_as(state[p + f"attn.W_{m}"], 0, 2, 1)
            biases[m] = state[p + f"attn.b_{m}"] + (w * ln_b[None, :, None]).sum(-2)
            w = w * ln_w[None, :, None]
            per_layer[f"W_{m}"].append(w - w.mean(1, keepdim=True))
        W_O = stored_as(state[p + "attn.W_O"], 2, 0, 1)
        W_O = W_O - W_O.mean(-1, keepdim=True)
        b_O = state[p + "attn.b_O"] - state[p + "attn.b_O"].mean()
        b_O = b_O + (biases["V"][:, :, None] * W_O).sum([0, 1])  # b_V folded into b_O
        per_layer["b_Q"].append(biases["Q"])
        per_layer["b_K"].append(biases["K"])
        per_layer["b_V"].append(torch.zeros_like(biases["V"]))
        per_layer["W_O"].append(W_O)
        per_layer["b_O"].append(b_O - b_O.mean())
    W_U = stored_as(state["unembed.W_U"], 1, 0)
    b_U = state["unembed.b_U"] + (W_U * state["ln_final.b"][:, None]).sum(-2)
    W_U = W_U * state["ln_final.w"][:, None]
    W_U = W_U - W_U.mean(0, keepdim=True)
    W_E, W_pos = state["embed.W_E"], state["pos_embed.W_pos"]
    return Weights(
        W_E=W_E - W_E.mean(-1, keepdim=True),
        W_pos=W_pos - W_pos.mean(-1, keepdim=True),
        **{n: torch.stack(ts).contiguous() for n, ts in per_layer.items()},
        W_U=(W_U - W_U.mean(-1, keepdim=True)).contiguous(),
        b_U=b_U - b_U.mean(),
    )


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
    spec and set of versions, and are otherwise computed (`process_weights`) and cached.
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
    from_cache = weights is not None
    if not from_cache:
        weights = process_weights(state, spec)
        if use_cache:
            write_cached_weights(key, weights)
    return LoadedModel(spec=spec, path=path, sha256=sha, weights=weights, state=state, from_cache=from_cache)
