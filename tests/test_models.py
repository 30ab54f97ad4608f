import pytest
import torch
import torch.nn as nn

from gradreg.models import MODEL_PRESETS, count_parameters, create_model, list_presets

NUM_CLASSES = 10

# (embed_dim, depth, num_heads, MLP hidden width) of the standard ViT shapes.
EXPECTED_SHAPES = {
    "vit_ti": (192, 12, 3, 768),
    "vit_s": (384, 12, 6, 1536),
    "vit_b": (768, 12, 12, 3072),
    "vit_l": (1024, 24, 16, 4096),
}


def vit_parameter_count(*, width, depth, mlp_hidden, num_classes, patch=4, channels=3, image=32):
    """Count ViT parameters by hand from the architecture."""
    num_patches = (image // patch) ** 2
    patch_embed = channels * patch * patch * width + width
    cls_token = width
    pos_embed = (num_patches + 1) * width
    qkv = width * 3 * width + 3 * width
    attn_proj = width * width + width
    fc1 = width * mlp_hidden + mlp_hidden
    fc2 = mlp_hidden * width + width
    block_norms = 2 * (2 * width)
    block = qkv + attn_proj + fc1 + fc2 + block_norms
    final_norm = 2 * width
    head = width * num_classes + num_classes
    return patch_embed + cls_token + pos_embed + depth * block + final_norm + head


@pytest.fixture(scope="module")
def vit_b():
    torch.manual_seed(0)
    return create_model("vit_b", num_classes=NUM_CLASSES)


@pytest.fixture(scope="module")
def vit_ti():
    torch.manual_seed(0)
    return create_model("vit_ti", num_classes=NUM_CLASSES)


def test_list_presets():
    assert list_presets() == ["vit_b", "vit_l", "vit_micro", "vit_s", "vit_ti"]


@pytest.mark.parametrize("name", sorted(EXPECTED_SHAPES))
def test_preset_data_shapes(name):
    width, depth, heads, mlp_hidden = EXPECTED_SHAPES[name]
    preset = MODEL_PRESETS[name]
    assert preset["embed_dim"] == width
    assert preset["depth"] == depth
    assert preset["num_heads"] == heads
    assert preset["embed_dim"] * preset["mlp_ratio"] == mlp_hidden
    assert preset["patch_size"] == 4
    assert preset["img_size"] == 32
    assert preset["global_pool"] == "token"
    assert preset["zero_init_head"] is True


@pytest.mark.parametrize("name", ["vit_ti", "vit_s"])
def test_parameter_count_small(name):
    width, depth, _, mlp_hidden = EXPECTED_SHAPES[name]
    model = create_model(name, num_classes=NUM_CLASSES)
    expected = vit_parameter_count(
        width=width, depth=depth, mlp_hidden=mlp_hidden, num_classes=NUM_CLASSES
    )
    assert count_parameters(model) == expected


def test_parameter_count_vit_b(vit_b):
    width, depth, _, mlp_hidden = EXPECTED_SHAPES["vit_b"]
    expected = vit_parameter_count(
        width=width, depth=depth, mlp_hidden=mlp_hidden, num_classes=NUM_CLASSES
    )
    assert count_parameters(vit_b) == expected
    assert 85_000_000 < expected < 86_000_000


def test_parameter_count_vit_micro():
    model = create_model("vit_micro", num_classes=NUM_CLASSES)
    expected = vit_parameter_count(width=64, depth=4, mlp_hidden=256, num_classes=NUM_CLASSES)
    assert count_parameters(model) == expected


def test_count_parameters_trainable_only():
    model = nn.Linear(3, 2)
    model.bias.requires_grad_(False)
    assert count_parameters(model) == 8
    assert count_parameters(model, trainable_only=True) == 6


def test_head_zero_initialised(vit_ti):
    assert torch.count_nonzero(vit_ti.head.weight) == 0
    assert torch.count_nonzero(vit_ti.head.bias) == 0


@pytest.mark.parametrize("train", [False, True])
def test_initial_logits_exactly_zero(vit_ti, train):
    vit_ti.train(train)
    with torch.no_grad():
        logits = vit_ti(torch.randn(4, 3, 32, 32))
    assert logits.shape == (4, NUM_CLASSES)
    assert torch.equal(logits, torch.zeros_like(logits))


def test_zero_init_head_can_be_disabled():
    torch.manual_seed(0)
    model = create_model("vit_micro", num_classes=NUM_CLASSES, zero_init_head=False)
    assert torch.count_nonzero(model.head.weight) > 0


def test_output_shape_vit_b(vit_b):
    vit_b.eval()
    with torch.no_grad():
        logits = vit_b(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, NUM_CLASSES)


def test_token_count_65(vit_ti):
    vit_ti.eval()
    assert vit_ti.patch_embed.num_patches == 64
    assert vit_ti.pos_embed.shape == (1, 65, 192)
    with torch.no_grad():
        tokens = vit_ti.forward_features(torch.randn(2, 3, 32, 32))
    assert tokens.shape == (2, 65, 192)


def test_dropout_modules_p01(vit_ti):
    dropouts = [m for m in vit_ti.modules() if isinstance(m, nn.Dropout)]
    # pos_drop + per block (attn_drop, proj_drop, mlp.drop1, mlp.drop2) + head_drop
    assert len(dropouts) == 1 + 4 * 12 + 1
    assert all(m.p == 0.1 for m in dropouts)
    attn_dropouts = [m for name, m in vit_ti.named_modules() if name.endswith("attn.attn_drop")]
    assert len(attn_dropouts) == 12


def test_preset_block_is_pre_norm(vit_ti):
    # norm_pre (timm's CLIP-style norm after the embedding) is absent, the
    # blocks apply LayerNorm before attention and MLP, and there is a final norm.
    assert isinstance(vit_ti.norm_pre, nn.Identity)
    assert isinstance(vit_ti.blocks[0].norm1, nn.LayerNorm)
    assert isinstance(vit_ti.blocks[0].norm2, nn.LayerNorm)
    assert isinstance(vit_ti.norm, nn.LayerNorm)
    assert isinstance(vit_ti.fc_norm, nn.Identity)


def test_drop_rate_overrides():
    model = create_model(
        "vit_micro", num_classes=NUM_CLASSES, drop_rate=0.0, attn_drop_rate=0.2, drop_path_rate=0.1
    )
    named = dict(model.named_modules())
    assert named["pos_drop"].p == 0.0
    assert named["head_drop"].p == 0.0
    assert named["blocks.0.attn.proj_drop"].p == 0.0
    assert named["blocks.0.mlp.drop1"].p == 0.0
    assert named["blocks.0.mlp.drop2"].p == 0.0
    assert named["blocks.0.attn.attn_drop"].p == 0.2
    # timm raises stochastic depth linearly from 0 to drop_path_rate.
    assert named["blocks.3.drop_path1"].drop_prob == pytest.approx(0.1)


def test_none_rates_keep_preset():
    model = create_model("vit_micro", num_classes=NUM_CLASSES, drop_rate=None)
    assert model.pos_drop.p == 0.1
    assert model.blocks[0].attn.attn_drop.p == 0.1


def test_preset_overrides_do_not_mutate_presets():
    before = dict(MODEL_PRESETS["vit_micro"])
    model = create_model("vit_micro", num_classes=3, depth=2, embed_dim=32)
    assert len(model.blocks) == 2
    assert model.embed_dim == 32
    assert MODEL_PRESETS["vit_micro"] == before


def test_timm_model_name_offline():
    model = create_model("resnet18", num_classes=NUM_CLASSES)
    model.eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, NUM_CLASSES)


def test_timm_model_name_drop_rate():
    model = create_model("resnet18", num_classes=NUM_CLASSES, drop_rate=0.3)
    assert model.drop_rate == 0.3


def test_unknown_name_error():
    with pytest.raises(ValueError) as info:
        create_model("vit_nonexistent_xyz", num_classes=NUM_CLASSES)
    message = str(info.value)
    assert "vit_nonexistent_xyz" in message
    for preset in list_presets():
        assert preset in message
    assert "timm" in message


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"num_classes": -1}, "num_classes"),
        ({"num_classes": 10, "drop_rate": 1.0}, "drop_rate"),
        ({"num_classes": 10, "attn_drop_rate": -0.1}, "attn_drop_rate"),
        ({"num_classes": 10, "drop_path_rate": 1.5}, "drop_path_rate"),
    ],
)
def test_invalid_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        create_model("vit_micro", **kwargs)


def test_invalid_preset_override():
    with pytest.raises(ValueError, match="not_an_argument"):
        create_model("vit_micro", num_classes=NUM_CLASSES, not_an_argument=1)
