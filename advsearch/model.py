"""Checkpoint loading: validate a HookedTransformer-format state dict, build the
TransformerLens bridge with the authors' weight processing, and expose the
processed weights that the fused evaluator and the mechanism module read."""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import AdvsearchError
from .spec import ModelSpec

DEFAULT_MODEL = Path(__file__).parent / "data" / "default_model.pt"
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


@dataclass
class LoadedModel:
    """A checkpoint ready for use: spec, provenance, the bridge (reference + hooks) and weights."""

    spec: ModelSpec
    path: Path
    sha256: str
    bridge: object  # transformer_lens TransformerBridge, processed, eval mode
    weights: Weights


def resolve_model_path(model: str | Path | None) -> Path:
    """`--model` > `$ADVSEARCH_MODEL` > the embedded default checkpoint."""
    if model:
        return Path(model)
    if os.environ.get("ADVSEARCH_MODEL"):
        return Path(os.environ["ADVSEARCH_MODEL"])
    return DEFAULT_MODEL


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


def load_model(model: str | Path | None = None) -> LoadedModel:
    """Load and validate a checkpoint (see `resolve_model_path`)."""
    path = resolve_model_path(model)
    state = read_state_dict(path)
    spec = ModelSpec.for_checkpoint(path)
    validate_state_dict(state, spec, source=str(path))
    bridge = build_bridge(state, spec)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return LoadedModel(spec=spec, path=path, sha256=sha, bridge=bridge, weights=weights_from_bridge(bridge))
