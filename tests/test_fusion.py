"""MGFF head (and the linear baseline head) on real backbones: shapes, gradients, ablations,
node modes, pooling and attention choices, visualisation details, torch.compile, bf16 autocast; the
residual head starts as the linear head, and each of its branches matters once trained a few steps."""

import pytest
import torch

from mgff.models.backbone import TimmBackbone
from mgff.models.fusion import MGFFHead
from mgff.models.heads import HeadOutput, LinearHead

TINY_SWIN = dict(window_size=6, embed_dim=24, depths=(1, 1, 2, 1), num_heads=(1, 2, 3, 4))
SMALL_HEAD = dict(dim=32, num_heads=4, num_super_nodes=4)
NUM_CLASSES = 5


def tiny_swin(image_size=96):
    return TimmBackbone("swin_base_patch4_window12_384", img_size=image_size, **TINY_SWIN)


@pytest.fixture(scope="module")
def swin_features():
    """Tiny Swin stage maps at 96 px: (2, 48, 12, 12), (2, 96, 6, 6), (2, 192, 3, 3)."""
    torch.manual_seed(0)
    backbone = tiny_swin()
    with torch.no_grad():
        return backbone(torch.randn(2, 3, 96, 96)), backbone.feature_channels, backbone.feature_reductions


def make_head(swin_features, **kwargs):
    _, channels, reductions = swin_features
    return MGFFHead(channels, reductions, NUM_CLASSES, **{**SMALL_HEAD, **kwargs})


def assert_all_have_gradients(module, what, allow_zero=False):
    """Every parameter is on the loss's graph (and, unless allow_zero, gets a non-zero gradient)."""
    missing = [n for n, p in module.named_parameters() if p.grad is None or not (allow_zero or p.grad.any())]
    assert not missing, f"{what} parameters without gradient: {missing}"


def sgd_steps(head, maps, steps=3, lr=0.5, labels=None):
    """A few SGD steps of ``head`` on fixed ``maps`` (CE + aux loss), in train mode; returns the head in eval mode."""
    labels = torch.arange(maps[0].shape[0]) % NUM_CLASSES if labels is None else labels
    optimizer = torch.optim.SGD(head.parameters(), lr=lr)
    head.train()
    for _ in range(steps):
        out = head(maps)
        (torch.nn.functional.cross_entropy(out.logits, labels) + out.aux_loss).backward()
        optimizer.step()
        optimizer.zero_grad()
    return head.eval()


@pytest.mark.parametrize(
    "make_backbone, image_size",
    [
        (tiny_swin, 96),
        (lambda: TimmBackbone("test_resnet", out_indices=(-3, -2, -1)), 64),
        (lambda: TimmBackbone("convnext_atto"), 64),
        (lambda: TimmBackbone("test_vit", out_indices=(-1,), img_size=64), 64),
    ],
    ids=["swin", "resnet", "convnext_atto", "vit"],
)
@pytest.mark.parametrize("residual", [True, False])
def test_gradients_reach_the_backbone_and_every_head_parameter(make_backbone, image_size, residual):
    torch.manual_seed(0)
    backbone = make_backbone()
    head = MGFFHead(backbone.feature_channels, backbone.feature_reductions, NUM_CLASSES, residual=residual, **SMALL_HEAD)
    images = torch.randn(2, 3, image_size, image_size)
    if residual:  # the fused classifier starts at zero: one step, then the layers behind it get gradients too
        sgd_steps(head, [m.detach() for m in backbone(images)], steps=1)
    out = head(backbone(images))
    assert isinstance(out, HeadOutput)
    assert out.logits.shape == (2, NUM_CLASSES)
    grid = image_size // max(backbone.feature_reductions)
    assert out.assignment.shape == (2, grid * grid, SMALL_HEAD["num_super_nodes"])
    assert out.aux_loss.shape == () and torch.isfinite(out.aux_loss)
    (out.logits.square().mean() + out.aux_loss).backward()
    assert_all_have_gradients(head, "head")
    # timm zero-initialises the last norm of residual blocks, so the branch inside gets zero gradient
    assert_all_have_gradients(backbone, "backbone", allow_zero=True)
    assert any(p.grad.any() for p in backbone.parameters())


def test_one_head_serves_several_grid_sizes():
    # per_scale nodes with learned adjacency and MHSA: every table is indexed from the grid.
    small, large = tiny_swin(96), tiny_swin(192)
    head = MGFFHead(small.feature_channels, small.feature_reductions, NUM_CLASSES, nodes="per_scale",
                    adjacency="learned", **SMALL_HEAD)
    assert head(small(torch.randn(1, 3, 96, 96))).assignment.shape == (1, 3 * 3 * 3, 4)
    assert head(large(torch.randn(1, 3, 192, 192))).assignment.shape == (1, 3 * 6 * 6, 4)


def test_maps_off_the_coarsest_grid_are_pooled_onto_it():
    backbone = TimmBackbone("test_resnet", out_indices=(-3, -2, -1))
    maps = backbone(torch.randn(1, 3, 100, 100))  # 13x13, 7x7, 4x4: strides do not divide
    head = MGFFHead(backbone.feature_channels, backbone.feature_reductions, NUM_CLASSES, **SMALL_HEAD)
    details = head.forward_details(maps)
    assert details["grid"] == (4, 4)
    assert all(m.shape[-2:] == (4, 4) for m in details["aligned"])


@pytest.mark.parametrize(
    "switch, module_name",
    [("use_attention", "attention"), ("use_se", "se"), ("use_gcn", "graph")],
)
@pytest.mark.parametrize("residual", [True, False])
def test_each_ablation_switch_removes_its_module(swin_features, switch, module_name, residual):
    full = make_head(swin_features, residual=residual)
    ablated = make_head(swin_features, residual=residual, **{switch: False})
    assert getattr(full, module_name) is not None
    assert getattr(ablated, module_name) is None
    assert not any(n.startswith(module_name + ".") for n, _ in ablated.named_parameters())
    out = ablated(swin_features[0])
    assert out.logits.shape == (2, NUM_CLASSES)
    if switch == "use_gcn":
        assert out.assignment is None
        assert out.aux_loss.item() == 0 and out.aux_loss.device == out.logits.device
        fused_classifier = ablated.fusion_classifier if residual else ablated.classifier
        assert fused_classifier.in_features == 3 * SMALL_HEAD["dim"]  # mean of concatenated nodes
    else:
        assert out.aux_loss.item() != 0


def test_everything_off_is_align_mean_linear(swin_features):
    head = make_head(swin_features, use_attention=False, use_se=False, use_gcn=False, residual=False)
    names = {n.split(".")[0] for n, _ in head.named_parameters()}
    assert names == {"align", "readout_norm", "classifier"}
    residual = make_head(swin_features, use_attention=False, use_se=False, use_gcn=False)
    assert {n.split(".")[0] for n, _ in residual.named_parameters()} == names | {"norm", "fusion_classifier"}
    assert head(swin_features[0]).logits.shape == (2, NUM_CLASSES)


@pytest.mark.parametrize("nodes, num_nodes", [("concat", 9), ("per_scale", 27)])
@pytest.mark.parametrize("pool", ["mincut", "diffpool"])
def test_node_modes_and_pooling(swin_features, nodes, num_nodes, pool):
    head = make_head(swin_features, nodes=nodes, pool=pool)
    out = head(swin_features[0])
    assert out.assignment.shape == (2, num_nodes, 4)
    assert torch.isfinite(out.aux_loss) and out.aux_loss != 0
    # the pooling losses are in aux_loss: it alone trains the assignment layer
    out.aux_loss.backward()
    assert head.graph.assign.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("attention", ["mhsa", "hilo", "acmix"])
def test_attention_choices(swin_features, attention):
    head = make_head(swin_features, attention=attention)
    assert head(swin_features[0]).logits.shape == (2, NUM_CLASSES)


def test_forward_details_for_visualisation(swin_features):
    head = make_head(swin_features).eval()
    details = head.forward_details(swin_features[0])
    assert details["grid"] == (3, 3)
    assert [a.shape for a in details["attention"]] == [(2, 4, 9, 9)] * 3
    torch.testing.assert_close(details["attention"][0].sum(-1), torch.ones(2, 4, 9))
    assert [m.shape for m in details["enhanced"]] == [(2, 32, 3, 3)] * 3
    assert details["nodes"].shape == (2, 9, 96)
    torch.testing.assert_close(details["output"].logits, head(swin_features[0]).logits)
    assert details["assignment"].shape == (2, 9, 4)


def test_invalid_configurations_are_errors():
    with pytest.raises(ValueError, match="divide"):
        MGFFHead([8, 8], [8, 12], NUM_CLASSES)
    with pytest.raises(ValueError, match="one reduction per map"):
        MGFFHead([8, 8], [8], NUM_CLASSES)
    with pytest.raises(ValueError, match="nodes"):
        MGFFHead([8], [8], NUM_CLASSES, nodes="per_pixel")


def test_torch_compile_whole_graph(swin_features):
    # aot_eager traces forward and backward like inductor without its minutes of C++ compilation
    # on CPU; fullgraph=True fails on any graph break. dropout=0 makes train mode deterministic.
    torch._dynamo.reset()
    head = make_head(swin_features, attention="acmix", nodes="per_scale", adjacency="both", dropout=0.0)
    compiled = torch.compile(head, backend="aot_eager", fullgraph=True)
    maps = swin_features[0]
    sgd_steps(head, maps, steps=1)  # the residual head's fused path needs a step before every layer has a gradient
    head.train()
    out, expected = compiled(maps), head(maps)
    torch.testing.assert_close(out.logits, expected.logits)
    torch.testing.assert_close(out.aux_loss, expected.aux_loss)
    (out.logits.sum() + out.aux_loss).backward()
    assert_all_have_gradients(head, "compiled head")


@pytest.mark.parametrize("kwargs", [dict(), dict(attention="acmix", nodes="per_scale", adjacency="learned")])
def test_bf16_autocast_on_cpu(swin_features, kwargs):
    head = make_head(swin_features, **kwargs).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(swin_features[0])
    assert out.logits.dtype == torch.bfloat16
    assert torch.isfinite(out.logits.float()).all() and torch.isfinite(out.aux_loss.float())
    torch.testing.assert_close(out.logits.float(), head(swin_features[0]).logits, atol=0.05, rtol=0.1)


def test_follows_the_input_dtype(swin_features):
    head = make_head(swin_features, attention="acmix", adjacency="both").double()
    out = head([m.double() for m in swin_features[0]])
    assert out.logits.dtype == out.aux_loss.dtype == torch.float64


def test_linear_head(swin_features):
    maps, channels, reductions = swin_features
    head = LinearHead(channels, reductions, NUM_CLASSES, dropout=0.1)
    out = head(maps)
    assert out.logits.shape == (2, NUM_CLASSES) and out.assignment is None
    assert out.aux_loss.item() == 0
    out.logits.sum().backward()
    assert_all_have_gradients(head, "linear head")


def test_single_node_graph_is_refused_with_a_clear_error():
    head = MGFFHead([8, 16], [16, 32], num_classes=3, dim=16, num_heads=2, num_super_nodes=2)
    with pytest.raises(ValueError, match=r"1 graph node.*at least 2"):
        head([torch.randn(2, 8, 2, 2), torch.randn(2, 16, 1, 1)])
    # per-scale nodes give two nodes on the same 1x1 grid: allowed
    per_scale = MGFFHead([8, 16], [16, 32], num_classes=3, dim=16, num_heads=2, num_super_nodes=2, nodes="per_scale")
    out = per_scale([torch.randn(2, 8, 2, 2), torch.randn(2, 16, 1, 1)])
    assert torch.isfinite(out.aux_loss)


def test_paper_maps_last_one_enters_as_it_is():
    # the paper's reading: three patch-merging outputs through 4x4/2x2/1x1 convs, the final normed map as it is
    torch.manual_seed(0)
    backbone = TimmBackbone("swin_base_patch4_window12_384", out_indices=(3,), stage_inputs=(1, 2, 3), img_size=96, **TINY_SWIN)
    head = MGFFHead(backbone.feature_channels, backbone.feature_reductions, NUM_CLASSES, dim=192, align_last=False,
                    num_heads=4, num_super_nodes=4)
    assert [type(a).__name__ for a in head.align] == ["Sequential", "Sequential", "Sequential", "Identity"]
    assert [a[0].kernel_size for a in head.align[:3]] == [(4, 4), (2, 2), (1, 1)]
    maps = backbone(torch.randn(2, 3, 96, 96))
    record = head.forward_details(maps)
    torch.testing.assert_close(record["aligned"][-1], maps[-1])  # untouched
    assert record["nodes"].shape == (2, 9, 4 * 192)  # four maps concatenated per 3x3 grid position
    assert record["output"].logits.shape == (2, NUM_CLASSES)


def test_align_last_false_needs_the_width_of_the_last_map(swin_features):
    with pytest.raises(ValueError, match="align_last=False.*192 channels"):
        make_head(swin_features, align_last=False, dim=32)


def test_logits_depend_on_the_super_node_assignment(swin_features):
    # with the old sum-pooling readout, the assignment layer never reached the logits
    torch.manual_seed(0)
    head = make_head(swin_features, use_attention=False, use_se=False, residual=False).eval()
    before = head(swin_features[0]).logits
    with torch.no_grad():
        head.graph.assign.weight.mul_(5.0).add_(torch.randn_like(head.graph.assign.weight))
    after = head(swin_features[0]).logits
    assert (before - after).abs().max() > 1e-4
    head(swin_features[0]).logits.sum().backward()
    assert head.graph.assign.weight.grad.abs().sum() > 0  # the classification loss trains S too


def test_readout_norm_gives_the_classifier_a_normalised_vector(swin_features):
    # without it the averaged super-nodes are small and SGD barely moves the classifier (BENCHMARKS.md)
    seen = {}
    for readout_norm in (True, False):
        torch.manual_seed(0)
        head = make_head(swin_features, readout_norm=readout_norm, residual=False).eval()
        head.classifier.register_forward_hook(lambda m, i, o, key=readout_norm: seen.__setitem__(key, i[0]))
        head(swin_features[0])
    torch.testing.assert_close(seen[True].var(dim=-1, unbiased=False), torch.ones(2), atol=1e-2, rtol=0)
    assert seen[False].var(dim=-1).max() < 0.5


# ----- the residual head (fusion_residual, the default) -----------------------------------------


@pytest.mark.parametrize(
    "make_backbone, kwargs",
    [
        (tiny_swin, {}),
        (tiny_swin, dict(attention="acmix", nodes="per_scale", adjacency="both", pool="diffpool")),
        (lambda: TimmBackbone("test_resnet", out_indices=(-3, -2, -1)), {}),
    ],
    ids=["swin", "swin_other_options", "resnet"],
)
def test_residual_head_at_initialisation_is_the_linear_head(make_backbone, kwargs):
    torch.manual_seed(0)
    backbone = make_backbone()
    maps = backbone(torch.randn(3, 3, 96, 96))
    linear = LinearHead(backbone.feature_channels, backbone.feature_reductions, NUM_CLASSES).eval()
    head = MGFFHead(backbone.feature_channels, backbone.feature_reductions, NUM_CLASSES, **{**SMALL_HEAD, **kwargs}).eval()
    head.norm.load_state_dict(linear.norm.state_dict())
    head.classifier.load_state_dict(linear.classifier.state_dict())
    torch.testing.assert_close(head(maps).logits, linear(maps).logits, atol=1e-6, rtol=0)
    # the same classifier init as the linear head's, so a run of either starts from the same kind of logits
    assert head.classifier.weight.std().item() == pytest.approx(linear.classifier.weight.std().item(), rel=0.1)


BRANCHES = {
    "align": lambda h: h.align,
    "attention": lambda h: h.attention,
    "attention_scale": lambda h: h.attention_scale,
    "se": lambda h: h.se,
    "se_scale": lambda h: h.se_scale,
    "gcn": lambda h: h.graph.convs,
    "gcn_skip": lambda h: h.graph.skip,
    "gcn_scale": lambda h: h.graph.scales,
    "super_nodes": lambda h: h.graph.assign,
    "readout_norm": lambda h: h.readout_norm,
    "fusion_classifier": lambda h: h.fusion_classifier,
    "base_norm": lambda h: h.norm,
}


def perturbed_change(head, branch, maps):
    """Largest change of the eval logits when only ``branch``'s weights are perturbed."""
    before = head(maps).logits
    with torch.no_grad():
        for p in BRANCHES[branch](head).parameters():
            p.add_(torch.randn_like(p) * (p.abs().mean() + 0.1))
    return (head(maps).logits - before).abs().max().item()


@pytest.mark.parametrize("branch", sorted(BRANCHES))
def test_each_branch_of_the_residual_head_matters_after_a_few_steps(swin_features, branch):
    torch.manual_seed(0)
    maps = swin_features[0]
    head = sgd_steps(make_head(swin_features), maps, steps=3)
    assert perturbed_change(head, branch, maps) > 1e-3, f"{branch} does not reach the logits after 3 steps"


def test_two_zero_factors_in_series_stay_zero_for_a_step(swin_features):
    # layer_scale=0 puts a second zero behind SE's branch (gamma, then the zero fused classifier): after one step
    # gamma has had no gradient (the classifier was still zero), so SE's weights do not reach the logits yet;
    # after the second step they do. The default layer_scale > 0 keeps one zero factor per path. (No GCN: its
    # pooling loss would reach gamma directly.)
    maps = swin_features[0]
    changes = []
    for steps in (1, 3):
        torch.manual_seed(0)
        head = sgd_steps(make_head(swin_features, layer_scale=0.0, use_gcn=False), maps, steps=steps, lr=0.05)
        changes.append(perturbed_change(head, "se", maps))
    assert changes[0] == 0.0 and changes[1] > 1e-6  # small: gamma has had one step (about 2e-3)


def test_negative_layer_scale_is_refused(swin_features):
    with pytest.raises(ValueError, match="layer_scale must be >= 0"):
        make_head(swin_features, layer_scale=-0.1)
