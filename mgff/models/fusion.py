"""The paper's multi-granularity feature fusion (MGFF) head.

Fine-grained differences sit in small regions that the coarsest backbone stage blurs, so the head
fuses several stages (granularities) of the backbone:

1. **align**: each selected map goes through a strided conv (kernel = stride = its reduction ratio to
   the coarsest map) and a LayerNorm2d, so all maps share the coarsest grid and width ``dim``
   (Swin-B at 384: 48x48, 24x24, 12x12 with 4x4, 2x2, 1x1 kernels -> 12x12);
2. **spatial attention** per map over its grid tokens (pre-norm, residual): the paper's MHSA with a
   relative position bias, or HiLo / ACmix;
3. **channel attention** per map: squeeze-and-excitation;
4. **graph nodes**: ``concat`` stacks the maps along channels (one node per grid position, ``F =
   S * dim``); ``per_scale`` makes every scale's positions separate nodes (``N = S * H * W``);
5. **GCN** layers relate the nodes; 6. **pooling** into ``K`` super-nodes (auxiliary losses);
7. **classify**: mean over the super-nodes, LayerNorm, dropout, linear.

Steps 2, 3 and 5-6 can each be switched off for ablations; a switched-off step has no module.

Departure in step 7: the paper averages the super-nodes and applies "a linear classifier"
("使用线性分类器"); a LayerNorm sits between them here (``readout_norm``), as timm's heads put a norm
before their classifier. Without it the averaged vector is small (each GCN layer and the two means
shrink it) and, under SGD, the classifier's effective step scales with the squared norm of its input:
on real CUB photos (EfficientNet-Lite0 at 224 px), with the head at 10x lr, it stayed near chance after the first
epoch where the linear head did not; with the norm the head trains but needs a lower lr (BENCHMARKS.md, "The plain
head's readout norm").

**The residual head (``residual=True``, the default).** The paper's claim for its GCN and pooling is that
"这种方法的优点是可以更有效地集成每个点的特征,而不会破坏主干模型输出的结果" ("the advantage of this method is that it
integrates the features of every point more effectively *without destroying what the backbone outputs*").
The paper does not say how the head is initialised or wired [not stated]; this head makes that claim hold
from the first step:

- a **base path** that *is* the linear head (:class:`~mgff.models.heads.LinearHead`): LayerNorm2d on the
  last map, global average pool, dropout, ``classifier``. At initialisation (eval mode) the head's logits
  are exactly the linear head's with the same ``norm``/``classifier`` weights;
- the **fused path** (steps 1-7 above) enters the logits through its own ``fusion_classifier``,
  initialised to zero: ``logits = classifier(pool(norm(last))) + fusion_classifier(readout)``;
- inside the fused path each step is a residual whose branch starts small and is learned, with timm's
  ``LayerScale`` (per-channel ``gamma``, initialised to ``layer_scale``): spatial attention
  ``x + gamma * attn(norm(x))``; SE ``x + gamma * (se(x) - x)`` (the identity at ``gamma = 0``, where the
  plain SE halves the map at initialisation); every GCN layer ``x + gamma * GELU(GCN(x))`` with a linear
  skip where the width changes (:class:`~mgff.models.graph.GraphPooling`, ``residual=True``).

So the fused path has exactly one zero factor in series (``fusion_classifier``): it gets a gradient at
the first step, every layer behind it from the second. ``residual=False`` is the head as the paper's
figure draws it (and as mgff had it before): the super-node readout alone feeds ``classifier``.

Measured in BENCHMARKS.md, "Real photos: fusion head" (short fine-tunes) and "The ablations of `full.yaml`"
(converged; both EfficientNet-Lite0 at 224 px on 25 CUB classes, Swin-B at 384 px for 50 epochs is unmeasured):
the residual head ties a well-trained linear head where the plain head falls behind both. It trained best with
the fused path at the backbone's lr and the base path at the linear head's 10x (``fusion_lr_scale: 1``).

**Training the two paths** (``detach_base``, the LightningModule's ``fusion_training``). Trained jointly
(one cross-entropy on ``base + fused``, the default), the fresh fused path fits the training labels
alongside the base path from the first steps. With ``detach_base`` the base path is trained by its own
cross-entropy, exactly as the linear head alone, and the fused path by the cross-entropy of
``base.detach() + fused`` (the same values): it learns to correct what the base path gets wrong, as a
boosting stage fits the residual of the stages before it. Predictions are ``base + fused`` either way.
[not stated] in the paper: its "不会破坏主干模型输出的结果" read as a training rule. On the real photos it did
not help: the fused correction lowered validation below the base path alone (BENCHMARKS.md, "Recipe search: 3
epochs, seed 0, chosen on validation").

**Which maps: the paper's words and this reading.** The seed (§1.4.2) says:
"需要将每一层变换为每个特征的统一尺寸(最后一层除外)... 总共需要处理三个特征图。它们的大小分别为
48 × 48 × 256、24 × 24 × 512 和 12 × 12 × 1024。使用内核大小为 4 × 4、2 × 2 和 1 × 1 的卷积。所有特征图的
统一大小为 12 × 12 × 1024 ... 最后,四个特征图在通道维度上连接起来" ("every layer is transformed to one
common size (except the last layer) ... three feature maps are processed in total, of sizes 48x48x256,
24x24x512 and 12x12x1024, with convolutions of kernel 4x4, 2x2 and 1x1; all maps share the size
12x12x1024 ... finally the four feature maps are concatenated along the channels").

Read against Microsoft's Swin code, where a layer is its blocks *followed by* patch merging, these are
consistent: the outputs of layers 1-3 (after their merging) are exactly 48x48x256, 24x24x512,
12x12x1024; the fourth layer has no merging and gives the final 12x12x1024 map, which is "the last
layer" that is not transformed. Four maps are concatenated. So the paper configs
(``experiments/cub.yaml``...) fuse, in timm's Swin-B at 384 px:

- ``layers.1.downsample``, ``layers.2.downsample``, ``layers.3.downsample`` (timm's PatchMerging
  outputs, before the blocks of stages 1-3), through 4x4, 2x2, 1x1 convs to 1024 channels;
- ``norm(layers.3)``, the final normalised 12x12x1024 map, as it is (``align_last=False``).

In the backbone config: ``stages: [3]``, ``stage_inputs: [1, 2, 3]``; in the head: ``dim: 1024``,
``align_last: False``. Departure: each converted map also gets a LayerNorm2d (the paper names only
the conv). Other readings stay options: timm's stage outputs (``stages: [1, 2, 3]``, the maps
*after* each stage's blocks, same sizes), all four stage outputs (``stages: [0, 1, 2, 3]``), and a
1x1 conv on the last map too (``align_last=True``, needed when ``dim`` differs from its channels).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d, LayerScale, LayerScale2d, SEModule, trunc_normal_
from torch import Tensor, nn

from mgff.models.attention import build_spatial_attention
from mgff.models.graph import GraphPooling
from mgff.models.heads import HeadOutput

__all__ = ["MGFFHead"]

NODE_MODES = ("concat", "per_scale")


class MGFFHead(nn.Module):
    """Multi-granularity feature fusion head on a list of backbone maps.

    Args:
        in_channels: channels ``C_i`` of each backbone map (all maps given are fused).
        reductions: reduction ``r_i`` of each map; every ``r_i`` divides the largest.
        num_classes: number of classes.
        dim: width of the aligned maps.
        attention: spatial attention kind, ``mhsa`` | ``hilo`` | ``acmix``.
        num_heads: heads of the spatial attention (divides ``dim``).
        use_attention: step 2 on/off.
        use_se: step 3 on/off.
        se_reduction: SE bottleneck ratio ``r`` (``dim / r`` hidden units).
        use_gcn: steps 5-6 on/off; off: mean over the nodes, no auxiliary loss.
        nodes: ``concat`` or ``per_scale`` (step 4).
        gcn_layers: GCN layers.
        gcn_dim: GCN and super-node width (default ``dim``).
        adjacency: ``similarity`` | ``learned`` | ``both`` (see :mod:`mgff.models.graph`).
        pool: ``mincut`` | ``diffpool``.
        num_super_nodes: ``K``.
        dropout: dropout after the GCN layers and before the classifier.
        max_grid: largest grid side of the aligned maps (relative position tables).
        readout_norm: LayerNorm on the averaged super-node vector before the classifier.
        align_last: the last map goes through a conv + norm like the others (``True``) or enters as
            it is (``False``, the paper's "最后一层除外"; its channels must equal ``dim`` and it must be
            on the coarsest grid).
        residual: the base path is the linear head and the fused path is added through a
            zero-initialised ``fusion_classifier`` (see above); ``False``: the fused readout alone.
        layer_scale: initial ``gamma`` of the residual branches of attention, SE and GCN (``residual``
            only; ``0`` starts them at the identity, and then each branch waits one more step for a
            gradient).
        detach_base: ``residual`` only: in training, the logits are ``base.detach() + fused`` (same values), so
            a loss on them trains the fused path to correct the base path and leaves the base path to a loss of
            its own on ``base_logits`` (see "Training the two paths" above).

    Shapes:
        ``forward([(B, C_i, H_i, W_i), ...]) -> HeadOutput(logits (B, num_classes), aux_loss (),
        assignment (B, N, K) or None)`` with ``N = H * W`` (concat) or ``S * H * W`` (per_scale) on
        the coarsest grid ``H x W``; the base path reads the last map ``(B, C_last, h, w)``.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        reductions: Sequence[int],
        num_classes: int,
        dim: int = 256,
        attention: str = "mhsa",
        num_heads: int = 8,
        use_attention: bool = True,
        use_se: bool = True,
        se_reduction: int = 16,
        use_gcn: bool = True,
        nodes: str = "concat",
        gcn_layers: int = 2,
        gcn_dim: int | None = None,
        adjacency: str = "similarity",
        pool: str = "mincut",
        num_super_nodes: int = 8,
        dropout: float = 0.1,
        max_grid: int = 32,
        align_last: bool = True,
        readout_norm: bool = True,
        residual: bool = True,
        layer_scale: float = 0.1,
        detach_base: bool = False,
    ) -> None:
        super().__init__()
        if len(in_channels) != len(reductions) or not in_channels:
            raise ValueError(f"need one reduction per map, got {in_channels} and {reductions}")
        if nodes not in NODE_MODES:
            raise ValueError(f"unknown nodes mode {nodes!r}; choose one of {NODE_MODES}")
        coarsest = max(reductions)
        if any(coarsest % r for r in reductions):
            raise ValueError(f"reductions {list(reductions)} must all divide the largest")
        num_scales = len(in_channels)
        if not align_last and (in_channels[-1] != dim or reductions[-1] != coarsest):
            raise ValueError(
                f"align_last=False feeds the last map as it is: it needs {dim} channels (dim) on the coarsest "
                f"grid (reduction {coarsest}), got {in_channels[-1]} channels at reduction {reductions[-1]}"
            )
        if residual and layer_scale < 0:
            raise ValueError(f"layer_scale must be >= 0, got {layer_scale}")
        if detach_base and not residual:
            raise ValueError("detach_base needs the residual head (residual=True): the plain head has no base path")
        self.nodes, self.residual, self.detach_base = nodes, residual, detach_base
        self.coarsest_index = list(reductions).index(coarsest)

        # 1. align every map to the coarsest grid and width dim.
        self.align = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(c, dim, kernel_size=coarsest // r, stride=coarsest // r),
                LayerNorm2d(dim),
            )
            for c, r in zip(in_channels, reductions)
        )
        if not align_last:
            self.align[-1] = nn.Identity()
        # 2. spatial attention, one per map (each granularity attends in its own way).
        if use_attention:
            kwargs = {"max_grid": max_grid} if attention == "mhsa" else {}
            self.attention_norm = nn.ModuleList(nn.LayerNorm(dim) for _ in in_channels)
            self.attention = nn.ModuleList(
                build_spatial_attention(attention, dim, num_heads, **kwargs) for _ in in_channels
            )
        else:
            self.attention_norm = self.attention = None
        # 3. channel attention, one per map.
        self.se = (
            nn.ModuleList(SEModule(dim, rd_ratio=1.0 / se_reduction) for _ in in_channels)
            if use_se
            else None
        )
        # residual branches of steps 2 and 3 start at layer_scale
        scales = lambda make, on: nn.ModuleList(make(dim, layer_scale) for _ in in_channels) if residual and on else None  # noqa: E731
        self.attention_scale = scales(LayerScale, use_attention)
        self.se_scale = scales(LayerScale2d, use_se)
        # 4-6. nodes, GCN, pooling.
        node_dim = num_scales * dim if nodes == "concat" else dim
        if use_gcn:
            out_dim = gcn_dim or dim
            self.graph = GraphPooling(
                node_dim,
                out_dim,
                num_layers=gcn_layers,
                num_super_nodes=num_super_nodes,
                pool=pool,
                adjacency=adjacency,
                num_scales=num_scales if nodes == "per_scale" else 1,
                max_grid=max_grid,
                dropout=dropout,
                residual=residual,
                layer_scale=layer_scale,
            )
        else:
            out_dim, self.graph = node_dim, None
        # 7. classify.
        self.readout_norm = nn.LayerNorm(out_dim) if readout_norm else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        if residual:
            # the base path: the linear head's norm and classifier on the last map (same names, same init)
            self.norm = LayerNorm2d(int(in_channels[-1]))
            self.classifier = nn.Linear(int(in_channels[-1]), num_classes)
            self.fusion_classifier = nn.Linear(out_dim, num_classes)
            nn.init.zeros_(self.fusion_classifier.weight)
            nn.init.zeros_(self.fusion_classifier.bias)
        else:
            self.classifier = nn.Linear(out_dim, num_classes)
        trunc_normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)

    def classifier_modules(self) -> list[nn.Module]:
        """The optimiser's ``classifier`` role (:mod:`mgff.lit.optim`): the base path's norm and classifier (the
        linear head inside the residual head, trained as the linear head is), or the plain head's ``classifier``.
        The fused path's ``fusion_classifier`` is not among them: it is the end of the residual branch and is
        trained with the fusion layers (one lr for the whole branch)."""
        return [self.norm, self.classifier] if self.residual else [self.classifier]

    def enhance(self, features: Sequence[Tensor], record: dict | None = None) -> list[Tensor]:
        """Steps 1-3: ``[(B, C_i, H_i, W_i)] -> [(B, dim, H, W)]`` on the coarsest grid ``H x W``.

        ``record``, when given, receives the intermediate maps for visualisation.
        """
        if len(features) != len(self.align):
            raise ValueError(f"expected {len(self.align)} maps, got {len(features)}")
        maps = [align(f) for align, f in zip(self.align, features)]
        grid = maps[self.coarsest_index].shape[-2:]
        # Sizes that the reductions do not divide (e.g. 13x13 -> 3x3 next to a 4x4 coarsest map)
        # leave a map a pixel off the coarsest grid: pool it onto that grid.
        maps = [m if m.shape[-2:] == grid else F.adaptive_avg_pool2d(m, grid) for m in maps]
        if record is not None:
            record["aligned"] = list(maps)
            record["attention"] = []
        if self.attention is not None:
            enhanced = []
            scales = self.attention_scale or [nn.Identity()] * len(maps)
            for norm, attention, scale, m in zip(self.attention_norm, self.attention, scales, maps):
                x = m.permute(0, 2, 3, 1)  # (B, H, W, dim)
                normed = norm(x)
                x = x + scale(attention(normed))
                enhanced.append(x.permute(0, 3, 1, 2))
                if record is not None:
                    get_map = getattr(attention, "attention_map", None)
                    record["attention"].append(get_map(normed) if get_map else None)
            maps = enhanced
        if self.se is not None:
            if self.se_scale is None:
                maps = [se(m) for se, m in zip(self.se, maps)]
            else:
                maps = [m + scale(se(m) - m) for se, scale, m in zip(self.se, self.se_scale, maps)]
        if record is not None:
            record["enhanced"] = list(maps)
        return maps

    def to_nodes(self, maps: Sequence[Tensor]) -> Tensor:
        """Step 4: ``S`` maps ``(B, dim, H, W)`` -> nodes ``(B, H*W, S*dim)`` (concat) or
        ``(B, S*H*W, dim)`` (per_scale, ordered scale, row, column)."""
        if self.nodes == "concat":
            return torch.cat(list(maps), dim=1).flatten(2).transpose(1, 2)
        b, c, h, w = maps[0].shape
        stacked = torch.stack(list(maps), dim=1)  # (B, S, dim, H, W)
        return stacked.permute(0, 1, 3, 4, 2).reshape(b, len(maps) * h * w, c)

    def _classify(self, maps: list[Tensor], last: Tensor) -> tuple[HeadOutput, Tensor]:
        nodes = self.to_nodes(maps)
        if self.graph is not None and nodes.shape[1] < 2:
            # one node has no edges: the pooling losses are 0/0 and would turn every weight into NaN
            raise ValueError(
                f"the coarsest map is {tuple(maps[0].shape[-2:])}, which gives {nodes.shape[1]} graph node: "
                "the GCN and super-node pooling need at least 2; use a larger input, earlier stages, "
                "nodes='per_scale' or use_gcn=False"
            )
        if self.graph is not None:
            super_nodes, aux_loss, assignment = self.graph(nodes, tuple(maps[0].shape[-2:]))
            pooled = super_nodes.mean(dim=1)
        else:
            pooled, assignment = nodes.mean(dim=1), None
        fused = self.dropout(self.readout_norm(pooled))
        base_logits = None
        if self.residual:
            base = self.norm(last).mean(dim=(2, 3))  # (B, C_last): the linear head's pooled vector
            base_logits = self.classifier(self.dropout(base))
            held = base_logits.detach() if self.detach_base and self.training else base_logits
            logits = held + self.fusion_classifier(fused)
        else:
            logits = self.classifier(fused)
        if self.graph is None:
            aux_loss = logits.new_zeros(())
        return HeadOutput(logits, aux_loss, assignment, base_logits), nodes

    def forward(self, features: Sequence[Tensor]) -> HeadOutput:
        output, _ = self._classify(self.enhance(features), features[-1])
        return output

    def forward_details(self, features: Sequence[Tensor]) -> dict:
        """Forward pass that keeps what visualisation notebooks show.

        Returns a dict with ``output`` (the :class:`HeadOutput`), ``aligned`` and ``enhanced`` (lists
        of ``(B, dim, H, W)`` per scale, after step 1 and after steps 2-3), ``attention`` (per scale:
        ``(B, heads, H*W, H*W)`` softmax weights for ``mhsa``, ``None`` for kinds without one global
        map; empty without attention), ``nodes`` (``(B, N, F)``), ``assignment`` (``(B, N, K)`` or
        ``None``) and ``grid`` (``(H, W)``).
        """
        record: dict = {}
        maps = self.enhance(features, record)
        output, nodes = self._classify(maps, features[-1])
        record.update(
            output=output,
            nodes=nodes,
            assignment=output.assignment,
            grid=tuple(maps[0].shape[-2:]),
        )
        return record

