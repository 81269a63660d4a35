"""Graph convolution over feature-map nodes and pooling into super-nodes, the fusion head's steps 5-6.

Every grid position (and, in ``per_scale`` mode, every scale) of the fused map is a node. A few
:class:`~torch_geometric.nn.dense.DenseGCNConv` layers relate the nodes over an adjacency matrix,
an assignment layer scores each node against ``K`` super-nodes, and each super-node is the
assignment-weighted *mean* of its nodes (:func:`pool_into_super_nodes`). The MinCut or DiffPool
regularisers train the assignment and are returned as the auxiliary loss.

Why a mean and not the pooling's ``X' = SᵀX``: with a softmax assignment every row of ``S`` sums to 1,
so the equal-weight average over the ``K`` rows of ``SᵀX`` is ``(1/K) Σ_n X_n`` whatever ``S`` is.
The assignment then never reaches the logits, and the readout's scale grows with the number of nodes.
The mean of each super-node, averaged with equal weight per super-node (the paper's "对这些超级节点的
特征进行平均", "the features of these super-nodes are averaged"), depends on ``S``: a small super-node
(a bird's head) weighs as much as a large one (the background).

Adjacency. A parameter of fixed size ``(N, N)`` would tie the head to one input size, while the head
has to serve any grid (other crops, other backbones). So:

- ``similarity`` (default): a k-nearest-neighbour graph in feature space, recomputed per image:
  ``A_ij = max(0, cos(x_i, x_j))`` kept for the ``top_k`` most similar ``j`` of each ``i`` and
  symmetrised. Needs no grid and no parameters.
- ``learned``: a learned function of the two nodes' positions, ``A_ij = sigmoid(T[y_i - y_j,
  x_i - x_j] + S[s_i, s_j])`` with a table ``T`` over all 2-D offsets up to ``max_grid - 1`` (indexed
  like the attention's relative position bias) and ``S`` over scale pairs. ``T`` starts as the
  8-neighbour grid graph (as ``torch_geometric.utils.grid``), ``S`` at zero, so the graph starts as
  "neighbours and the same position on the other scales" and learns longer or weaker links.
- ``both``: the mean of the two.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import LayerScale
from torch import Tensor, nn
from torch_geometric.nn.dense import DenseGCNConv, dense_diff_pool, dense_mincut_pool

from mgff.models.attention import relative_position_index

__all__ = ["GraphPooling", "LearnedGridAdjacency", "pool_into_super_nodes", "similarity_adjacency"]

ADJACENCY_KINDS = ("similarity", "learned", "both")
POOL_KINDS = ("mincut", "diffpool")


def similarity_adjacency(x: Tensor, top_k: int | None = 8) -> Tensor:
    """k-nearest-neighbour graph of cosine similarity between node features.

    Args:
        x: node features ``(B, N, F)``.
        top_k: neighbours kept per node (before symmetrising); ``None`` or ``>= N`` keeps all.

    Returns:
        ``(B, N, N)`` symmetric, non-negative, zero diagonal (the GCN adds self-loops). Off-diagonal
        weights have a floor of ``1e-4``: a node whose similarities are all negative would otherwise
        have degree 0, and MinCut's normaliser (the degree-weighted trace) would be 0/0 = NaN.
    """
    n = x.shape[1]
    x = F.normalize(x, dim=-1)
    sim = (x @ x.transpose(1, 2)).clamp(min=0)
    eye = torch.eye(n, device=x.device, dtype=torch.bool)
    sim = sim.masked_fill(eye, 0)
    if top_k is not None and top_k < n - 1:
        threshold = sim.topk(top_k, dim=-1).values[..., -1:]
        sim = sim * (sim >= threshold)
        sim = torch.maximum(sim, sim.transpose(1, 2))
    return sim + 1e-4 * (~eye).to(sim.dtype)


def pool_into_super_nodes(
    x: Tensor, adj: Tensor, logits: Tensor, pool: str = "mincut", eps: float = 1e-6
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Super-nodes as assignment-weighted means of the nodes, and the pooling's regularisers.

    .. math::
        \mathbf{S} = \mathrm{softmax}(\text{logits}), \quad
        \mathbf{X}' = \mathrm{diag}(\mathbf{S}^\top \mathbf{1} + \epsilon)^{-1} \mathbf{S}^\top \mathbf{X}

    Args:
        x: node features ``(B, N, F)``.
        adj: adjacency ``(B, N, N)``.
        logits: assignment scores ``(B, N, K)`` (softmax over ``K`` inside).
        pool: ``mincut`` (:func:`~torch_geometric.nn.dense.dense_mincut_pool`) or ``diffpool``
            (:func:`~torch_geometric.nn.dense.dense_diff_pool`); chooses the regularisers.
        eps: added to each super-node's mass ``Σ_n S_nk``, so an empty super-node gives ``~0``
            instead of ``0/0``.

    Returns:
        ``(super_nodes (B, K, F), aux_loss (), assignment S (B, N, K))``; ``aux_loss`` is the sum of
        the two regularisers (see :class:`GraphPooling`).
    """
    if pool == "mincut":
        summed, _, loss_a, loss_b = dense_mincut_pool(x, adj, logits)
    elif pool == "diffpool":
        summed, _, loss_a, loss_b = dense_diff_pool(x, adj, logits)
    else:
        raise ValueError(f"unknown pool {pool!r}; choose one of {POOL_KINDS}")
    assignment = logits.softmax(dim=-1)
    mass = assignment.sum(dim=1).unsqueeze(-1)  # (B, K, 1)
    return summed / (mass + eps).to(summed.dtype), loss_a + loss_b, assignment


class LearnedGridAdjacency(nn.Module):
    """Adjacency of grid nodes as a learned function of their offset and scales.

    Nodes are ordered (scale, row, column): ``N = num_scales * H * W``.
    ``A_ij = sigmoid(T[offset(i, j)] + S[scale_i, scale_j])``.

    Args:
        num_scales: scales stacked as separate nodes (1 when the scales are concatenated per node).
        max_grid: largest grid side the offset table covers.
        init_edge, init_no_edge: initial logits of the 8-neighbour grid edges (and self) and of all
            other offsets; ``sigmoid(4) = 0.98``, ``sigmoid(-6) = 0.0025``.

    Shapes:
        ``forward(height, width) -> (N, N)``
    """

    def __init__(
        self,
        num_scales: int = 1,
        max_grid: int = 32,
        init_edge: float = 4.0,
        init_no_edge: float = -6.0,
    ) -> None:
        super().__init__()
        self.num_scales, self.max_grid = num_scales, max_grid
        side = 2 * max_grid - 1
        offsets = torch.arange(side) - (max_grid - 1)
        near = (offsets.abs() <= 1)[:, None] & (offsets.abs() <= 1)[None, :]
        logits = torch.full((side, side), init_no_edge).masked_fill(near, init_edge)
        self.offset_logits = nn.Parameter(logits.flatten())
        self.scale_logits = nn.Parameter(torch.zeros(num_scales, num_scales))

    def forward(self, height: int, width: int) -> Tensor:
        device = self.offset_logits.device
        index = relative_position_index(height, width, self.max_grid, device=device)
        logits = self.offset_logits[index]  # (HW, HW)
        s = self.num_scales
        # Symmetric in the scales so the graph stays undirected.
        scale = 0.5 * (self.scale_logits + self.scale_logits.T)
        logits = logits.repeat(s, s) + scale.repeat_interleave(height * width, 0).repeat_interleave(
            height * width, 1
        )
        return torch.sigmoid(logits)


class GraphPooling(nn.Module):
    r"""GCN layers, then pooling of the nodes into ``K`` super-nodes.

    .. math::
        \mathbf{X}^{(l+1)} = \mathrm{GELU}\big(\hat{\mathbf{D}}^{-1/2} \hat{\mathbf{A}}
        \hat{\mathbf{D}}^{-1/2} \mathbf{X}^{(l)} \mathbf{W}^{(l)}\big), \quad
        \mathbf{S} = \mathrm{softmax}(\mathbf{X}^{(L)} \mathbf{W}_s), \quad
        \mathbf{X}' = \mathrm{diag}(\mathbf{S}^\top \mathbf{1} + \epsilon)^{-1}
        \mathbf{S}^\top \mathbf{X}^{(L)}

    with :math:`\hat{\mathbf{A}} = \mathbf{A} + \mathbf{I}` (Kipf & Welling, ICLR 2017), and the
    assignment :math:`\mathbf{S} \in \mathbb{R}^{B \times N \times K}` trained by the pooling's
    regularisers:

    - ``mincut`` (Bianchi et al., ICML 2020, "Spectral Clustering with Graph Neural Networks for
      Graph Pooling"): the MinCut loss :math:`-\mathrm{Tr}(\mathbf{S}^\top\mathbf{A}\mathbf{S}) /
      \mathrm{Tr}(\mathbf{S}^\top\mathbf{D}\mathbf{S})` in ``[-1, 0]`` (connected nodes go to the same
      super-node) plus the orthogonality loss in ``[0, 2]`` (super-nodes of similar size, none empty).
    - ``diffpool`` (Ying et al., NeurIPS 2018, "Hierarchical Graph Representation Learning with
      Differentiable Pooling"): the link prediction loss
      :math:`\|\mathbf{A} - \mathbf{S}\mathbf{S}^\top\|_F / N^2` (connected nodes share a super-node)
      plus the entropy of each node's assignment (assignments close to one-hot).

    Args:
        in_dim: node feature width ``F``.
        hidden_dim: width of the GCN layers and of the super-nodes.
        num_layers: GCN layers (>= 1).
        num_super_nodes: ``K``.
        pool: ``mincut`` or ``diffpool``.
        adjacency: ``similarity``, ``learned`` or ``both`` (see the module docstring).
        num_scales: for ``learned``: scales stacked as separate nodes.
        max_grid: for ``learned``: largest grid side.
        top_k: for ``similarity``: neighbours kept per node.
        dropout: dropout after each GCN layer.
        residual: each layer adds to its input, ``X + gamma * GELU(GCN(X))`` with timm's ``LayerScale``
            ``gamma`` (initialised to ``layer_scale``) and a bias-free linear skip where the width
            changes (the first layer, ``in_dim != hidden_dim``): the nodes reach the pooling as they came
            in until the GCN has learned something to add (the residual MGFF head, :mod:`mgff.models.fusion`).
        layer_scale: initial ``gamma`` of the residual layers.

    Shapes:
        ``forward(x: (B, N, F), grid_size: (H, W) | None) -> (super_nodes (B, K, hidden_dim),
        aux_loss (), assignment (B, N, K))``; ``grid_size`` is needed for ``learned`` adjacency,
        with ``N = num_scales * H * W``.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        num_layers: int = 2,
        num_super_nodes: int = 8,
        pool: str = "mincut",
        adjacency: str = "similarity",
        num_scales: int = 1,
        max_grid: int = 32,
        top_k: int | None = 8,
        dropout: float = 0.0,
        residual: bool = False,
        layer_scale: float = 0.1,
    ) -> None:
        super().__init__()
        if pool not in POOL_KINDS:
            raise ValueError(f"unknown pool {pool!r}; choose one of {POOL_KINDS}")
        if adjacency not in ADJACENCY_KINDS:
            raise ValueError(f"unknown adjacency {adjacency!r}; choose one of {ADJACENCY_KINDS}")
        if num_layers < 1:
            raise ValueError("GraphPooling needs at least one GCN layer")
        self.pool, self.adjacency, self.top_k = pool, adjacency, top_k
        self.learned_adjacency = (
            LearnedGridAdjacency(num_scales, max_grid) if adjacency != "similarity" else None
        )
        dims = [in_dim] + [hidden_dim] * num_layers
        self.convs = nn.ModuleList(DenseGCNConv(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.assign = nn.Linear(hidden_dim, num_super_nodes)
        if residual:
            self.skip = nn.Linear(in_dim, hidden_dim, bias=False) if in_dim != hidden_dim else nn.Identity()
            self.scales = nn.ModuleList(LayerScale(hidden_dim, layer_scale) for _ in self.convs)
        else:
            self.skip = self.scales = None

    def build_adjacency(self, x: Tensor, grid_size: tuple[int, int] | None) -> Tensor:
        """``(B, N, N)`` adjacency for node features ``x (B, N, F)``."""
        b, n, _ = x.shape
        parts = []
        if self.learned_adjacency is not None:
            if grid_size is None:
                raise ValueError(f"adjacency={self.adjacency!r} needs the grid_size of the nodes")
            learned = self.learned_adjacency(*grid_size).to(x.dtype)
            if learned.shape[0] != n:
                raise ValueError(
                    f"{n} nodes do not fit grid {grid_size} x {self.learned_adjacency.num_scales} "
                    "scales"
                )
            parts.append(learned.expand(b, n, n))
        if self.adjacency != "learned":
            # Detached: otherwise the pooling losses could lower themselves by making all features
            # alike (one dense cluster) instead of by learning a good assignment.
            parts.append(similarity_adjacency(x.detach(), self.top_k).to(x.dtype))
        return parts[0] if len(parts) == 1 else 0.5 * (parts[0] + parts[1])

    def forward(
        self, x: Tensor, grid_size: tuple[int, int] | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        adj = self.build_adjacency(x, grid_size)
        for i, conv in enumerate(self.convs):
            update = self.dropout(self.act(conv(x, adj)))
            if self.scales is None:
                x = update
            else:
                x = (self.skip(x) if i == 0 else x) + self.scales[i](update)
        return pool_into_super_nodes(x, adj, self.assign(x), self.pool)
