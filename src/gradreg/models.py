"""Vision Transformer presets for 32x32 images, built with timm.

Every preset in :data:`MODEL_PRESETS` is a plain dictionary of keyword
arguments for :class:`timm.models.vision_transformer.VisionTransformer`, plus
one key, ``zero_init_head``, that :func:`create_model` consumes itself. The
presets use the usual ViT-Ti/S/B/L widths, depths and head counts with a patch
size of 4, so a 32x32 image becomes an 8x8 grid of 64 patch tokens plus one
class token (65 tokens). ``vit_micro`` (width 64, depth 4, 2 heads, about
0.2 M parameters) is a small preset for CPU runs and tests.

For width :math:`D`, depth :math:`L`, MLP hidden width :math:`M`, patch size
:math:`p`, :math:`C` input channels, :math:`N` patches and :math:`K` classes,
a preset has

.. math::
    \\underbrace{C p^2 D + D}_{\\text{patch embed}}
    + \\underbrace{D}_{\\text{cls}}
    + \\underbrace{(N + 1) D}_{\\text{pos embed}}
    + L \\,(4D^2 + 2DM + 9D + M)
    + \\underbrace{2D}_{\\text{final norm}}
    + \\underbrace{DK + K}_{\\text{head}}

parameters (the per-block term is qkv and output projection, the two MLP layers,
and two LayerNorms).

timm is imported inside the functions that need it, so importing this module
needs only torch.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch.nn as nn

__all__ = ["MODEL_PRESETS", "count_parameters", "create_model", "list_presets"]


def _vit_preset(*, embed_dim: int, depth: int, num_heads: int) -> dict[str, Any]:
    return {
        "img_size": 32,
        "patch_size": 4,
        "in_chans": 3,
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": num_heads,
        "mlp_ratio": 4.0,
        "qkv_bias": True,
        # timm's Block is always pre-norm (LayerNorm before attention and MLP).
        # timm's ``pre_norm`` flag adds a further LayerNorm after the patch
        # embedding, as in CLIP, which these presets leave out.
        "pre_norm": False,
        "final_norm": True,
        "class_token": True,
        "global_pool": "token",
        "fc_norm": False,
        # Dropout after the position embedding, after the attention output
        # projection, after both MLP layers and before the head.
        "drop_rate": 0.1,
        "pos_drop_rate": 0.1,
        "proj_drop_rate": 0.1,
        # Dropout on the attention weights.
        "attn_drop_rate": 0.1,
        "drop_path_rate": 0.0,
        "zero_init_head": True,
    }


#: Keyword data for the built-in ViT presets (see the module docstring).
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "vit_micro": _vit_preset(embed_dim=64, depth=4, num_heads=2),  # MLP hidden width 256
    "vit_ti": _vit_preset(embed_dim=192, depth=12, num_heads=3),
    "vit_s": _vit_preset(embed_dim=384, depth=12, num_heads=6),
    "vit_b": _vit_preset(embed_dim=768, depth=12, num_heads=12),
    "vit_l": _vit_preset(embed_dim=1024, depth=24, num_heads=16),
}


def list_presets() -> list[str]:
    """Return the names of the built-in presets, sorted."""
    return sorted(MODEL_PRESETS)


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Return the number of scalar parameters in ``model``.

    Args:
        model: any module.
        trainable_only: count only parameters with ``requires_grad=True``.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _check_rate(name: str, value: float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {value!r}")


def _check_num_classes(num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(
            f"num_classes must be an int >= 0 (0 removes the classifier head), got {num_classes!r}"
        )


def _build_preset(
    name: str,
    *,
    num_classes: int,
    drop_rate: float | None,
    attn_drop_rate: float | None,
    drop_path_rate: float | None,
    overrides: dict[str, Any],
) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    kwargs = copy.deepcopy(MODEL_PRESETS[name])
    kwargs.update(overrides)
    zero_init_head = kwargs.pop("zero_init_head", False)

    accepted = set(inspect.signature(VisionTransformer.__init__).parameters) - {"self"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(
            f"invalid override(s) {unknown} for preset {name!r}: expected keyword arguments of "
            "timm.models.vision_transformer.VisionTransformer or 'zero_init_head'"
        )

    # For presets one ``drop_rate`` sets every activation dropout. timm's
    # VisionTransformer uses ``drop_rate`` for the head dropout only.
    if drop_rate is not None:
        kwargs["drop_rate"] = drop_rate
        kwargs["pos_drop_rate"] = drop_rate
        kwargs["proj_drop_rate"] = drop_rate
    if attn_drop_rate is not None:
        kwargs["attn_drop_rate"] = attn_drop_rate
    if drop_path_rate is not None:
        kwargs["drop_path_rate"] = drop_path_rate

    model = VisionTransformer(num_classes=num_classes, **kwargs)
    if zero_init_head and isinstance(model.head, nn.Linear):
        nn.init.zeros_(model.head.weight)
        nn.init.zeros_(model.head.bias)
    return model


def create_model(
    name: str,
    *,
    num_classes: int,
    drop_rate: float | None = None,
    attn_drop_rate: float | None = None,
    drop_path_rate: float | None = None,
    **overrides: Any,
) -> nn.Module:
    """Build a preset Vision Transformer or any timm model, without pretrained weights.

    For a preset name (see :func:`list_presets`) the model is
    ``VisionTransformer(num_classes=num_classes, **MODEL_PRESETS[name])``, with
    ``overrides`` merged into the preset first. ``None`` keeps the preset's rate.
    For presets:

    * ``drop_rate`` sets the dropout after the position embedding, after the
      attention output projection, after both MLP layers and before the head
      (timm's ``pos_drop_rate``, ``proj_drop_rate`` and ``drop_rate``);
    * ``attn_drop_rate`` sets the dropout on the attention weights;
    * ``drop_path_rate`` sets the stochastic depth rate, which timm raises
      linearly from 0 in the first block to this value in the last;
    * ``zero_init_head=True`` (the preset default) sets the classifier weight
      and bias to zero, so every initial logit is exactly 0.

    Any other name goes to ``timm.create_model(name, pretrained=False,
    num_classes=num_classes, **overrides)``, with ``img_size=32`` added when the
    model's constructor accepts it. The rates are passed there only
    when given and then keep timm's meaning. For timm's own models
    ``drop_rate`` is usually the classifier dropout alone.

    Args:
        name: a preset name or a timm model name.
        num_classes: size of the classifier output. 0 removes the head.
        drop_rate: dropout probability in [0, 1).
        attn_drop_rate: attention-weight dropout probability in [0, 1).
        drop_path_rate: stochastic depth probability in [0, 1).
        **overrides: further keyword arguments for the model constructor.

    Raises:
        ValueError: ``name`` is neither a preset nor a timm model, a rate is
            outside [0, 1), ``num_classes`` is negative, or a preset override
            is not a ``VisionTransformer`` argument.
    """
    if not isinstance(name, str):
        raise ValueError(f"name must be a str, got {name!r}")
    _check_num_classes(num_classes)
    _check_rate("drop_rate", drop_rate)
    _check_rate("attn_drop_rate", attn_drop_rate)
    _check_rate("drop_path_rate", drop_path_rate)

    if name in MODEL_PRESETS:
        return _build_preset(
            name,
            num_classes=num_classes,
            drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate,
            overrides=overrides,
        )

    import timm

    if not timm.is_model(name):
        raise ValueError(
            f"unknown model name {name!r}: expected one of the presets {list_presets()} "
            "or any model name that timm.list_models() returns"
        )
    kwargs = dict(overrides)
    if drop_rate is not None:
        kwargs["drop_rate"] = drop_rate
    if attn_drop_rate is not None:
        kwargs["attn_drop_rate"] = attn_drop_rate
    if drop_path_rate is not None:
        kwargs["drop_path_rate"] = drop_path_rate
    if "img_size" not in kwargs:
        # Models built for a fixed input size (ViT, DeiT, Swin, ...) take img_size and
        # then accept 32x32 CIFAR images; convolutional networks reject the keyword.
        try:
            return timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=32, **kwargs)
        except TypeError:
            pass
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
