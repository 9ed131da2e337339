"""Token-level mixing for vision transformers: the small ViT (shapes, its class-token attention), TransMix
(labels from that attention, against a transcription of the authors' transmix_label) and TokenMix (the block
mask against a transcription of the authors' generate_mask on the same uniforms, the drawn ratio, labels by
area and by a teacher's activation maps, against the authors' label rule), the errors, and training steps."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import maxup
from maxup import functional as MF
from maxup import methods as M
from maxup.augment import CutMix
from maxup.augment.tokenmix import DEFAULT_PATCH, TokenMix, load_teacher
from maxup.augment.transmix import TransMix, class_attention
from maxup.functional.tokenmix import (
    activation_maps,
    content_maps,
    token_block_masks,
    token_grid,
    token_pixels,
    tokenmix,
    tokenmix_weight,
)
from maxup.functional.transmix import pasted_tokens, transmix_targets, transmix_weight
from maxup.models import ResNet, SmallCNN, ViT, create_model
from maxup.registry import REGISTRY

pytestmark = pytest.mark.usefixtures("one_thread")


def small_vit(classes=10, image=8, patch=2, **kw):
    torch.manual_seed(0)
    return ViT(in_channels=1, num_classes=classes, image_size=image, patch_size=patch, dim=16, depth=2, heads=2, **kw)


def batch(n=8, shape=(1, 8, 8), classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)


# ------------------------------------------------------------------ the ViT


@pytest.mark.parametrize("shape,patch", [((1, 28, 28), 4), ((1, 28, 28), 7), ((1, 8, 8), 2), ((3, 12, 20), 4)])
def test_vit_shapes_grid_and_attention_rows_sum_to_one(shape, patch):
    model = create_model("vit", input_shape=shape, num_classes=7, patch_size=patch)
    rows, cols = shape[1] // patch, shape[2] // patch
    assert model.grid_size == (rows, cols)
    x = torch.rand(3, *shape)
    logits, attention = model(x, return_attention=True)
    assert logits.shape == (3, 7) and model(x).shape == (3, 7)
    assert attention.shape == (3, 4, 1 + rows * cols)                       # (B, heads, class token + patches)
    assert torch.allclose(attention.sum(-1), torch.ones(3, 4), atol=1e-6)
    assert (attention >= 0).all()
    assert torch.allclose(logits, model(x), atol=1e-5)                     # the written-out attention = SDPA


def test_vit_attention_is_the_softmax_of_the_class_query_by_hand():
    model = small_vit().eval()
    x, _ = batch(4)
    seen = {}
    last = model.blocks[-1]
    handle = last.norm1.register_forward_hook(lambda m, i, o: seen.setdefault("h", o))
    _, attention = model(x, return_attention=True)
    handle.remove()
    h = seen["h"]
    q, k, _ = last.attn.qkv(h).chunk(3, dim=-1)
    heads, d = 2, 8
    by_hand = torch.empty(4, heads, h.shape[1])
    for b in range(4):
        for head in range(heads):
            qh, kh = q[b, 0, head * d:(head + 1) * d], k[b, :, head * d:(head + 1) * d]
            by_hand[b, head] = torch.softmax(kh @ qh / math.sqrt(d), dim=0)
    assert (attention - by_hand).abs().max() < 1e-6


def test_vit_stages_are_the_embedding_and_every_block_and_manifold_mixup_runs_there():
    model = small_vit()
    assert model.stages == ["embed", "blocks.0", "blocks.1"]
    step = M.build_step("maxup(m=2)+manifold_mixup", model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                        num_classes=10)
    x, y = batch(6)
    assert torch.isfinite(step(model, x, y, torch.Generator().manual_seed(0)).loss)


def test_vit_activation_maps_are_the_classifier_on_each_patch_token():
    model = small_vit().eval()
    x, _ = batch(3)
    maps = model.activation_maps(x)
    assert maps.shape == (3, 10, 4, 4)
    tokens = model.features(x)[:, 1:]
    by_hand = torch.stack([model.classifier(tokens[:, i]) for i in range(16)], -1).view(3, 10, 4, 4)
    assert torch.allclose(maps, by_hand, atol=1e-6)


@pytest.mark.parametrize("kwargs,name", [({"image_size": 28, "patch_size": 5}, "patch_size"),
                                         ({"dim": 30, "heads": 4}, "heads"), ({"depth": 0}, "depth"),
                                         ({"dropout": 1.0}, "dropout"), ({"patch_size": (2, 2, 2)}, "patch_size"),
                                         ({"mlp_ratio": 0}, "mlp_ratio")])
def test_vit_bad_options_raise_value_errors_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ViT(**kwargs)


def test_vit_refuses_images_of_another_size():
    with pytest.raises(ValueError, match="image_size"):
        ViT(image_size=28)(torch.rand(2, 1, 32, 32))


def test_vit_from_the_model_registry_takes_its_image_size_from_input_shape():
    model = create_model("vit", input_shape=(1, 8, 8), num_classes=10, patch_size=2, dim=32)
    assert model.embed.image_size == (8, 8) and model.grid_size == (4, 4)
    with pytest.raises(ValueError, match="image_size"):
        create_model("vit", input_shape=(1, 8, 8), image_size=8)           # filled in, not an option


# ------------------------------------------------------------------ TransMix: the authors' rule, transcribed
#
# github.com/Beckschen/TransMix (commit 0e4d31e, Apache-2.0): transmix.py, Mixup_transmix.transmix_label,
# and the class-attention line of timm/models/vision_transformer.py (forward_features, return_attn):
# ``attn = torch.mean(attn[:, :, 0, 1:], dim=1)``. Only ``.cuda()`` is dropped; the box is an argument.


def ref_transmix_label(target, y1, y2, box, attn, input_shape):
    lam0 = (box[1] - box[0]) * (box[3] - box[2]) / (input_shape[2] * input_shape[3])
    mask = torch.zeros((input_shape[2], input_shape[3]))
    mask[box[0]:box[1], box[2]:box[3]] = 1
    mask = nn.Upsample(size=int(math.sqrt(attn.shape[1])))(mask.unsqueeze(0).unsqueeze(0)).int()
    mask = mask.view(1, -1).repeat(len(attn), 1)
    w1, w2 = torch.sum((1 - mask) * attn, dim=1), torch.sum(mask * attn, dim=1)
    lam1 = w2 / (w1 + w2)
    lam = (lam0 + lam1) / 2
    return y1 * (1. - lam).unsqueeze(1) + y2 * lam.unsqueeze(1)


@pytest.mark.parametrize("box", [(2, 9, 3, 11), (0, 16, 0, 16), (5, 6, 5, 6), (7, 7, 0, 4), (1, 16, 4, 12)])
def test_transmix_labels_equal_the_authors_on_the_same_attention_and_box(box):
    g = torch.Generator().manual_seed(sum(box))
    b, heads, side, patch = 6, 3, 4, 4
    attn = torch.softmax(torch.randn(b, heads, 1 + side * side, generator=g) * 3, -1)   # (B, heads, 1 + N)
    y = torch.randint(0, 5, (b,), generator=g)
    t = F.one_hot(y, 5).float()
    ref = ref_transmix_label(None, t, t.flip(0), box, attn[:, :, 1:].mean(1), (b, 1, side * patch, side * patch))
    yl, yh, xl, xh = box
    boxes = torch.tensor([[yl, xl, yh, xl + (xh - xl)]])                               # ours: y0, x0, y1, x1
    pasted = pasted_tokens(boxes, (side * patch, side * patch), (side, side))
    area = MF.box_area(boxes) / (side * patch) ** 2
    ours = transmix_targets(t, torch.arange(b).flip(0), transmix_weight(attn, pasted, area.expand(b)))
    assert (ours - ref).abs().max() < 1e-6                                             # measured: 6e-8


def test_transmix_weight_is_the_attention_share_on_the_pasted_tokens_by_hand():
    g = torch.Generator().manual_seed(3)
    attention = torch.softmax(torch.randn(5, 2, 1 + 12, generator=g), -1)              # a 3x4 patch grid
    pasted = torch.rand(5, 3, 4, generator=g) < 0.4
    area = torch.rand(5, generator=g)
    for w in (0.0, 0.5, 1.0, 0.3):
        got = transmix_weight(attention, pasted, area, w)
        for i in range(5):
            a = [float(attention[i, :, 1 + j].mean()) for j in range(12)]
            on = sum(a[j] for j in range(12) if pasted[i].reshape(-1)[j])
            assert abs(float(got[i]) - (w * float(area[i]) + (1 - w) * on / sum(a))) < 1e-6


def test_a_token_is_pasted_when_the_box_holds_its_top_left_pixel():
    boxes = torch.tensor([[3, 4, 9, 8], [0, 0, 0, 0]])                  # rows 3..8, cols 4..7 of a 12x12 image
    got = pasted_tokens(boxes, (12, 12), (3, 3))                          # 4x4 patches: top-left pixels 0, 4, 8
    expected = torch.zeros(2, 3, 3, dtype=torch.bool)
    expected[0, 1:, 1] = True                                             # pixels (4, 4) and (8, 4)
    assert torch.equal(got, expected)


def test_transmix_labels_follow_the_models_attention_on_its_mixed_batch():
    model = small_vit()
    x, y = batch(6)
    aug = TransMix(model=model, num_classes=10, per_sample=True)
    x_mix, t_mix = aug(x, y, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)                                  # the same draws, by hand
    lam, perm = aug._draw(x, g)
    boxes = MF.sample_boxes(1.0 - lam, 8, 8, generator=g)
    expected_x, _, kept = MF.cutmix(x, F.one_hot(y, 10).float(), boxes, perm)
    assert torch.equal(x_mix, expected_x)
    _, attention = model(expected_x, return_attention=True)
    for i in range(6):
        y0, x0, y1, x1 = boxes[i].tolist()
        share = sum(float(attention[i, :, 1 + r * 4 + c].mean()) for r in range(4) for c in range(4)
                    if y0 <= 2 * r < y1 and x0 <= 2 * c < x1) / float(attention[i, :, 1:].mean(0).sum())
        weight = 0.5 * (1 - float(kept[i])) + 0.5 * share
        expected = (1 - weight) * F.one_hot(y[i], 10).float() + weight * F.one_hot(y[perm[i]], 10).float()
        assert (t_mix[i] - expected).abs().max() < 1e-6


def test_area_weight_one_is_cutmix_on_the_same_draws():
    model = small_vit()
    x, y = batch(8)
    a = TransMix(model=model, area_weight=1.0, num_classes=10, per_sample=True)
    b = CutMix(num_classes=10, per_sample=True)
    xa, ta = a(x, y, torch.Generator().manual_seed(1))
    xb, tb = b(x, y, torch.Generator().manual_seed(1))
    assert torch.equal(xa, xb) and (ta - tb).abs().max() < 1e-6


def test_the_label_forward_reads_the_attention_of_the_training_forward_and_changes_nothing():
    model = small_vit()
    model.train()
    x, _ = batch(4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    read = class_attention(model, x)
    assert not read.requires_grad and model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    _, trained = model(x, return_attention=True)                          # the forward that trains
    assert torch.equal(read, trained)                                     # no dropout: the same attention


def test_transmix_p_zero_leaves_the_batch_alone():
    model = small_vit()
    x, y = batch(5)
    x_mix, t = TransMix(model=model, num_classes=10, p=0.0)(x, y, torch.Generator().manual_seed(0))
    assert torch.equal(x_mix, x) and torch.equal(t, F.one_hot(y, 10).float())


def test_transmix_needs_a_model_that_gives_its_attention():
    with pytest.raises(ValueError, match="model="):
        TransMix(num_classes=10)
    with pytest.raises(ValueError, match="return_attention"):
        TransMix(model=SmallCNN(channels=(4,)), num_classes=10)
    with pytest.raises(ValueError, match="vit"):
        M.build_step("transmix", model=SmallCNN(channels=(4,)), optimizer=torch.optim.SGD([nn.Parameter(
            torch.zeros(1))], lr=0.1), num_classes=10)
    with pytest.raises(ValueError, match="area_weight"):
        TransMix(model=small_vit(), area_weight=1.5)


# ------------------------------------------------------------------ TokenMix: the authors' mask generator
#
# github.com/Sense-X/TokenMix (commit 0e17d5d, Apache-2.0): tokenmix.py, generate_mask. Changes: the
# grid is an argument (14 x 14 there), np.int (gone from numpy) is int, and the randomness is injected:
# each proposal takes its four uniforms from ``draws``, random.uniform(a, b) as a + (b - a) u and
# random.randint(a, b) as a + int(u (b - a + 1)).


def ref_generate_mask(lam, mask_token_num_start, draws, height=14, width=14, min_num_patches=1):
    min_aspect = 0.3
    log_aspect_ratio = (math.log(min_aspect), math.log(1 / min_aspect))
    mask = np.zeros(shape=(height, width), dtype=int)
    mask_ratio = 1 - lam
    num_masking_patches = min(width * height, int(mask_ratio * width * height) + mask_token_num_start)
    max_num_patches = width * height
    mask_count = 0

    while mask_count < num_masking_patches:
        max_mask_patches = num_masking_patches - mask_count
        max_mask_patches = min(max_mask_patches, max_num_patches)
        delta = 0
        for _attempt in range(10):
            u = next(draws)
            target_area = min_num_patches + (max_mask_patches - min_num_patches) * u[0]
            aspect_ratio = math.exp(log_aspect_ratio[0] + (log_aspect_ratio[1] - log_aspect_ratio[0]) * u[1])
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < width and h < height:
                top = 0 + int(u[2] * (height - h + 1))
                left = 0 + int(u[3] * (width - w + 1))

                num_masked = mask[top: top + h, left: left + w].sum()
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1

                if delta > 0:
                    break
        if delta == 0:
            break
        else:
            mask_count += delta
    lam = 1 - mask_count / max_num_patches
    return mask, lam, num_masking_patches


@pytest.mark.parametrize("grid,lam,start", [((14, 14), 0.5, 14), ((14, 14), 0.8, 0), ((7, 7), 0.5, 0),
                                            ((4, 4), 0.3, 0), ((6, 9), 0.6, 2), ((2, 2), 0.5, 0)])
def test_block_masks_equal_the_authors_generator_on_the_same_uniforms(grid, lam, start):
    k = 40
    uniforms = torch.rand(600, k, 4, generator=torch.Generator().manual_seed(int(lam * 10) + grid[1]),
                          dtype=torch.float64)
    refs = [ref_generate_mask(lam, start, iter(uniforms[:, i].tolist()), *grid) for i in range(k)]
    counts = [r[2] for r in refs]
    ours = token_block_masks(counts, grid, uniforms=uniforms)
    for i, (mask, ref_lam, _) in enumerate(refs):
        assert torch.equal(ours[i], torch.from_numpy(mask).bool()), i
        assert 1 - float(ours[i].sum()) / (grid[0] * grid[1]) == pytest.approx(ref_lam, abs=1e-12)


def connected_regions(mask: torch.Tensor) -> int:
    rows, cols = mask.shape
    seen, regions = set(), 0
    for r in range(rows):
        for c in range(cols):
            if mask[r, c] and (r, c) not in seen:
                regions += 1
                todo = [(r, c)]
                while todo:
                    a, b = todo.pop()
                    if (a, b) in seen or not (0 <= a < rows and 0 <= b < cols) or not mask[a, b]:
                        continue
                    seen.add((a, b))
                    todo += [(a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)]
    return regions


def test_masks_hold_their_count_in_several_separated_blocks():
    counts = torch.full((300,), 24)                                       # half of a 7x7 grid
    masks = token_block_masks(counts, (7, 7), generator=torch.Generator().manual_seed(0))
    held = masks.sum((1, 2))
    assert (held <= 24).all() and (held == 24).float().mean() >= 0.99     # measured: every one of the 300
    regions = torch.tensor([connected_regions(m) for m in masks], dtype=torch.float)
    assert regions.mean() > 1.5 and (regions >= 2).float().mean() > 0.4   # measured: 1.9 regions, 62% with >= 2


def test_the_augmentation_masks_the_drawn_ratio_of_tokens():
    x, y = batch(64, (1, 28, 28))
    aug = TokenMix(ratio=(0.3, 0.7), patch_size=4, num_classes=10, per_sample=True)
    x_mix, _ = aug(x, y, torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)                                  # the same draws, in the same order
    u = torch.rand((2, 64), generator=g, dtype=torch.float64)
    counts = ((0.3 + 0.4 * u[0]) * 49).long()
    masks = token_block_masks(counts, (7, 7), generator=g)
    perm = torch.randperm(64, generator=g)
    assert (masks.sum((1, 2)) == counts).all()
    assert ((counts >= int(0.3 * 49)) & (counts <= int(0.7 * 49))).all()
    pixels = token_pixels(masks, (4, 4))[:, None]
    assert torch.equal(x_mix, torch.where(pixels, x[perm], x))


def test_tokenmix_mixes_by_the_mask_and_labels_by_token_share_without_a_teacher():
    x, y = batch(4, (1, 8, 8))
    t = F.one_hot(y, 10).float()
    mask = torch.zeros(4, 2, 2, dtype=torch.bool)
    mask[0, 0, 0] = mask[1, 1, :] = mask[2] = True
    perm = torch.tensor([2, 3, 0, 1])
    x_mix, t_mix, lam = tokenmix(x, t, mask, perm, (4, 4))
    assert torch.equal(lam, torch.tensor([0.75, 0.5, 0.0, 1.0]))
    assert torch.equal(x_mix[0, :, :4, :4], x[2, :, :4, :4]) and torch.equal(x_mix[0, :, 4:], x[0, :, 4:])
    assert torch.equal(x_mix[2], x[0]) and torch.equal(x_mix[3], x[3])
    assert torch.allclose(t_mix, lam[:, None] * t + (1 - lam[:, None]) * t[perm])


# ------------------------------------------------------------------ TokenMix: labels from a teacher
#
# The authors' label rule, from Mixup.__call__ of the same file, after the label maps are cropped to the
# token grid (``label_map`` there: the teacher's map of each image's own class), with label smoothing 0
# and the partner ``flip(0)``; its loss is BCE, so the two weights need not sum to one.


def ref_tokenmix_target(own_maps, hard_label, mask, num_classes):
    y1_nonmask = own_maps / (own_maps.sum((1, 2), keepdim=True) + 1e-8)
    y2_nonmask = y1_nonmask.flip(0)
    y1 = (y1_nonmask * (1 - mask)).sum((1, 2))
    y2 = (y2_nonmask * mask).sum((1, 2))
    one = F.one_hot(hard_label, num_classes).float()
    return one * y1[:, None] + one.flip(0) * y2[:, None]


def test_teacher_labels_are_the_authors_normalised_to_sum_one():
    g = torch.Generator().manual_seed(4)
    b, k = 6, 5
    maps = torch.rand(b, k, 7, 7, generator=g)                          # non-negative, as the authors' maps
    y = torch.randint(0, k, (b,), generator=g)
    t = F.one_hot(y, k).float()
    mask = token_block_masks([24], (7, 7), generator=g)
    ref = ref_tokenmix_target(maps[torch.arange(b), y], y, mask[0].float(), k)
    _, ours, lam = tokenmix(torch.rand(b, 1, 28, 28), t, mask, torch.arange(b).flip(0), (4, 4),
                            content_maps(maps, t, (7, 7)))
    assert (ours - ref / ref.sum(1, keepdim=True)).abs().max() < 1e-6  # measured: 0


def test_teacher_weight_is_the_kept_content_against_the_pasted_content_by_hand():
    s = torch.softmax(torch.randn(3, 9, generator=torch.Generator().manual_seed(0)), -1).view(3, 3, 3)
    mask = torch.zeros(3, 3, 3, dtype=torch.bool)
    mask[:, 0] = True
    perm = torch.tensor([1, 2, 0])
    got = tokenmix_weight(mask, perm, s)
    for i in range(3):
        kept, taken = float(s[i, 1:].sum()), float(s[int(perm[i]), 0].sum())
        assert abs(float(got[i]) - kept / (kept + taken)) < 1e-6
    empty = torch.zeros(3, 3, 3)                                          # no content anywhere: by area
    assert torch.allclose(tokenmix_weight(mask, perm, empty), torch.full((3,), 2 / 3))


@pytest.mark.parametrize("make", [lambda: SmallCNN(in_channels=1, num_classes=10, channels=(4, 8)),
                                  lambda: ResNet(in_channels=1, num_classes=10, depth=8, width=4)])
def test_cnn_activation_maps_average_to_the_logits(make):
    torch.manual_seed(0)
    teacher = make().eval()
    x, _ = batch(3, (1, 12, 12))
    maps = activation_maps(teacher, x)
    assert maps.dim() == 4 and maps.shape[:2] == (3, 10)
    assert torch.allclose(maps.mean((2, 3)), teacher(x), atol=1e-5)


def test_content_maps_are_non_negative_sum_to_one_and_resize_to_the_grid():
    maps = torch.randn(4, 10, 2, 2)
    t = F.one_hot(torch.tensor([0, 1, 2, 3]), 10).float()
    for grid in ((4, 4), (1, 1), (2, 2)):
        s = content_maps(maps, t, grid)
        assert s.shape == (4, *grid) and (s >= 0).all()
        assert torch.allclose(s.sum((1, 2)), torch.ones(4), atol=1e-6)
    zero = content_maps(-maps.abs() - 1, t, (2, 2))                       # no positive evidence: uniform
    assert torch.allclose(zero, torch.full((4, 2, 2), 0.25))


def test_a_teacher_from_a_run_directory_labels_the_mix(tmp_path):
    data = maxup.data.load_dataset("digits", train_size=32).train
    torch.manual_seed(0)
    teacher = SmallCNN(in_channels=1, num_classes=10, channels=(4, 8))
    maxup.fit(teacher, "erm", train=data, epochs=1, batch_size=32, lr=0.05, seed=0, num_classes=10,
              out_dir=tmp_path / "teacher", progress=False, device="cpu",
              config={"model": "cnn", "model_opt": {"channels": [4, 8]}})
    loaded = load_teacher(tmp_path / "teacher" / "model.pt")
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), teacher.state_dict().values()))
    x, y = data.x[:8], data.y[:8]
    with_teacher = TokenMix(patch_size=2, teacher=str(tmp_path / "teacher"), num_classes=10, per_sample=True)
    by_area = TokenMix(patch_size=2, num_classes=10, per_sample=True)
    xa, ta = with_teacher(x, y, torch.Generator().manual_seed(0))
    xb, tb = by_area(x, y, torch.Generator().manual_seed(0))
    assert torch.equal(xa, xb)                                            # the same mask and partners
    assert not torch.allclose(ta, tb)                                     # other labels
    assert torch.allclose(ta.sum(1), torch.ones(8))
    with pytest.raises(ValueError, match="classes"):
        TokenMix(teacher=str(tmp_path / "teacher"), num_classes=5)


def test_a_vit_teacher_and_a_vit_student():
    teacher, student = small_vit().eval(), small_vit()
    aug = TokenMix(teacher=teacher, model=student, num_classes=10, per_sample=True)
    assert aug.patch_size == (2, 2)                                       # the student's patches
    x, y = batch(6)
    x_mix, t = aug(x, y, torch.Generator().manual_seed(0))
    assert x_mix.shape == x.shape and torch.allclose(t.sum(1), torch.ones(6))


@pytest.mark.parametrize("kwargs,name", [({"ratio": 1.5}, "ratio"), ({"ratio": (0.7, 0.3)}, "ratio"),
                                         ({"ratio": 0.0}, "ratio"), ({"patch_size": 0}, "patch_size"),
                                         ({"min_aspect": 0.0}, "min_aspect"), ({"teacher": 3}, "teacher"),
                                         ({"teacher": "/nonexistent/run"}, "teacher")])
def test_tokenmix_bad_options_raise_value_errors_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        TokenMix(num_classes=10, **kwargs)


def test_tokenmix_refuses_a_grid_that_does_not_divide_the_image_and_a_teacher_of_other_classes():
    with pytest.raises(ValueError, match="patch_size 3x3 does not divide the 8x8"):
        TokenMix(patch_size=3, num_classes=10)(*batch(4))
    with pytest.raises(ValueError, match="classes"):
        TokenMix(teacher=small_vit(classes=5), num_classes=10)
    unknown = TokenMix(teacher=small_vit(classes=5))                     # classes unknown until the targets come
    with pytest.raises(ValueError, match="classes"):
        unknown(batch(4)[0], F.one_hot(batch(4)[1], 10).float(), torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="activation"):
        TokenMix(teacher=nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))(batch(4)[0], F.one_hot(batch(4)[1], 10)
                                                                            .float())
    with pytest.raises(ValueError, match="tokens"):
        token_grid((28, 28), (5, 5))


def test_tokenmix_p_zero_and_default_patch():
    x, y = batch(4)
    aug = TokenMix(num_classes=10, p=0.0, per_sample=True)
    assert aug.patch_size == (DEFAULT_PATCH, DEFAULT_PATCH)
    x_mix, t = aug(x, y, torch.Generator().manual_seed(0))
    assert torch.equal(x_mix, x) and torch.equal(t, F.one_hot(y, 10).float())


def test_tokenmix_runs_through_a_dataloader():
    x, y = batch(16)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8,
                                         collate_fn=maxup.augment.collate(TokenMix(patch_size=2, num_classes=10)))
    xs, ts = next(iter(loader))
    assert xs.shape == (8, 1, 8, 8) and ts.shape == (8, 10)


# ------------------------------------------------------------------ the registry and training steps


def test_registered_with_their_traits_and_options():
    assert REGISTRY["transmix"].cls is TransMix and REGISTRY["tokenmix"].cls is TokenMix
    for cls in (TransMix, TokenMix):
        assert (cls.kind, cls.domain, cls.random, cls.mixes_rows, cls.context) == ("augment", "image", True, True, None)
        assert cls.last
    assert REGISTRY["transmix"].options() == {"alpha": 1.0, "area_weight": 0.5, "per_sample": True, "p": 1.0}
    assert REGISTRY["tokenmix"].options() == {"ratio": (0.3, 0.7), "patch_size": None, "teacher": None,
                                              "min_aspect": 0.3, "per_sample": True, "p": 1.0}
    with pytest.raises(ValueError, match="last"):
        M.parse("transmix+cropflip")


@pytest.mark.parametrize("spec", ["transmix", "maxup(m=2)+transmix", "sam+transmix(area_weight=0.0)",
                                  "tokenmix", "maxup(m=2)+cropflip(padding=1)+tokenmix(ratio=0.5)",
                                  "sam+smooth+tokenmix(per_sample=false)"])
def test_specs_build_and_train_a_step_on_the_vit(spec):
    model = small_vit()
    step = M.build_step(spec, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), num_classes=10)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batch(8)
    result = step(model, x, y, torch.Generator().manual_seed(0))
    assert torch.isfinite(result.loss)
    assert torch.allclose(result.targets.sum(1), torch.ones(len(result.targets)), atol=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_maxup_keeps_each_copys_attention_labels():
    """Under MaxUp every copy is relabelled by the attention on that copy: the chosen rows carry those labels."""
    model = small_vit()
    objective = maxup.MaxUp(TransMix(model=model, num_classes=10, per_sample=True), m=3)
    x, y = batch(6)
    xs, ts = objective.candidates(x, y, torch.Generator().manual_seed(0))
    result = objective(model, x, y, torch.Generator().manual_seed(0))
    for i in range(6):
        row = next(j for j in range(3) if torch.equal(xs[j, i], result.inputs[i]))
        assert torch.equal(result.targets[i], ts[row, i])


@pytest.mark.parametrize("spec", ["transmix", "maxup(m=2)+tokenmix"])
def test_two_seeded_runs_agree(spec):
    def run():
        model = small_vit()
        step = M.build_step(spec, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), num_classes=10)
        g = torch.Generator().manual_seed(1)
        x, y = batch(6)
        for _ in range(2):
            step(model, x, y, g)
        return [p.detach().clone() for p in model.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(run(), run()))


@pytest.mark.parametrize("spec", ["transmix", "maxup(m=2)+transmix", "tokenmix", "tokenmix(per_sample=false)"])
def test_the_step_makes_no_host_read(spec):
    """The TokenMix mask is drawn on the host from the host generator; nothing waits for the device."""
    from maxup.functional import _random as R
    from maxup.train.syncs import count_step_syncs

    model = small_vit()
    step = M.build_step(spec, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01), num_classes=10)
    x, y = batch(8)
    counter = count_step_syncs(step, model, x, y, R.DeviceGenerator("cpu", seed=1, host_seed=2), steps=2)
    assert counter.reads == 0 and counter.made == 0, counter.report()
