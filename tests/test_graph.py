"""GCN + super-node pooling: adjacencies, pooling against torch-geometric's dense ops, losses."""

import pytest
import torch
from torch_geometric.nn.dense import dense_diff_pool, dense_mincut_pool
from torch_geometric.utils import grid, to_dense_adj

from mgff.models.graph import GraphPooling, LearnedGridAdjacency, pool_into_super_nodes, similarity_adjacency


def test_similarity_adjacency_is_a_symmetric_knn_graph():
    torch.manual_seed(0)
    adj = similarity_adjacency(torch.randn(2, 20, 8), top_k=3)
    assert adj.shape == (2, 20, 20)
    assert torch.equal(adj, adj.transpose(1, 2))
    assert (adj >= 0).all() and (adj.diagonal(dim1=1, dim2=2) == 0).all()
    neighbours = (adj > 0).sum(-1)
    assert neighbours.max() < 20  # sparse: not every pair is linked


def test_similarity_adjacency_links_identical_nodes():
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    adj = similarity_adjacency(x, top_k=None)
    assert adj[0, 0, 1] == pytest.approx(1.0, abs=2e-4) and adj[0, 0, 2] == pytest.approx(1e-4)  # only the floor
    assert adj[0, 0, 0] == 0


def test_similarity_adjacency_keeps_every_degree_positive():
    # opposite features: every cosine is negative, yet MinCut needs a positive degree per node
    x = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])
    adj = similarity_adjacency(x, top_k=None)
    assert (adj.sum(-1) > 0).all()


def test_learned_adjacency_starts_as_the_grid_graph():
    height, width = 3, 4
    edge_index, _ = grid(height, width)  # 8-neighbour grid graph with self-loops
    expected = to_dense_adj(edge_index, max_num_nodes=height * width)[0] > 0
    adj = LearnedGridAdjacency(num_scales=1, max_grid=6)(height, width)
    assert adj.shape == (12, 12)
    assert torch.equal(adj > 0.5, expected)


def test_learned_adjacency_links_the_same_position_across_scales():
    adj = LearnedGridAdjacency(num_scales=2, max_grid=4)(2, 3)
    assert adj.shape == (12, 12)
    assert torch.allclose(adj, adj.T)
    assert adj[0, 6] > 0.5  # node (scale 0, 0, 0) and (scale 1, 0, 0)
    assert torch.equal(adj[:6, :6], adj[6:, 6:])


@pytest.mark.parametrize("pool, reference", [("mincut", dense_mincut_pool), ("diffpool", dense_diff_pool)])
@pytest.mark.parametrize("adjacency", ["similarity", "learned", "both"])
def test_pooling_matches_torch_geometric_and_returns_both_losses(pool, reference, adjacency):
    torch.manual_seed(0)
    module = GraphPooling(16, 12, num_layers=2, num_super_nodes=4, pool=pool, adjacency=adjacency, max_grid=8)
    module.eval()
    x = torch.randn(2, 3 * 4, 16)
    pooled, aux_loss, assignment = module(x, grid_size=(3, 4))
    assert pooled.shape == (2, 4, 12) and assignment.shape == (2, 12, 4)
    torch.testing.assert_close(assignment.sum(-1), torch.ones(2, 12))

    adj = module.build_adjacency(x, (3, 4))
    h = x
    for conv in module.convs:
        h = module.act(conv(h, adj))
    logits = module.assign(h)
    summed, _, loss_a, loss_b = reference(h, adj, logits)
    mass = logits.softmax(-1).sum(dim=1).unsqueeze(-1)
    torch.testing.assert_close(pooled, summed / (mass + 1e-6))  # each super-node: the weighted mean
    torch.testing.assert_close(aux_loss, loss_a + loss_b)
    assert torch.isfinite(aux_loss)


def test_aux_loss_alone_trains_the_assignment_and_the_gcn():
    module = GraphPooling(16, 12, num_super_nodes=4, adjacency="both")
    _, aux_loss, _ = module(torch.randn(2, 9, 16), grid_size=(3, 3))
    aux_loss.backward()
    assert module.assign.weight.grad.abs().sum() > 0
    assert module.convs[0].lin.weight.grad.abs().sum() > 0
    assert module.learned_adjacency.offset_logits.grad.abs().sum() > 0


def test_per_scale_nodes_with_learned_adjacency():
    module = GraphPooling(8, 8, num_super_nodes=3, adjacency="learned", num_scales=3, max_grid=4)
    pooled, _, assignment = module(torch.randn(2, 3 * 2 * 2, 8), grid_size=(2, 2))
    assert pooled.shape == (2, 3, 8) and assignment.shape == (2, 12, 3)


def test_learned_adjacency_needs_the_grid():
    module = GraphPooling(8, 8, adjacency="learned")
    with pytest.raises(ValueError, match="grid_size"):
        module(torch.randn(1, 9, 8))
    with pytest.raises(ValueError, match="do not fit"):
        module(torch.randn(1, 10, 8), grid_size=(3, 3))


def test_similarity_graph_has_no_parameters():
    module = GraphPooling(8, 8, adjacency="similarity")
    assert module.learned_adjacency is None
    pooled, _, _ = module(torch.randn(1, 7, 8))  # any number of nodes, no grid needed
    assert pooled.shape == (1, 8, 8)


@pytest.mark.parametrize("kwargs", [dict(pool="topk"), dict(adjacency="full"), dict(num_layers=0)])
def test_bad_options_are_errors(kwargs):
    with pytest.raises(ValueError):
        GraphPooling(8, 8, **kwargs)


def _old_readout(x, adj, logits, pool):
    """The readout before the fix, kept here as the reference the new one must differ from:
    ``mean_k (SᵀX)_k``, which is ``(1/K) Σ_n X_n`` for any softmax assignment."""
    reference = dense_mincut_pool if pool == "mincut" else dense_diff_pool
    return reference(x, adj, logits)[0].mean(dim=1)


def _new_readout(x, adj, logits, pool):
    return pool_into_super_nodes(x, adj, logits, pool)[0].mean(dim=1)


@pytest.mark.parametrize("pool", ["mincut", "diffpool"])
def test_readout_depends_on_the_assignment(pool):
    torch.manual_seed(0)
    x = torch.randn(1, 10, 6)
    adj = similarity_adjacency(x)
    logits_a, logits_b = torch.randn(1, 10, 3), 3 * torch.randn(1, 10, 3)
    new_a, new_b = _new_readout(x, adj, logits_a, pool), _new_readout(x, adj, logits_b, pool)
    assert (new_a - new_b).abs().max() > 1e-2
    old_a, old_b = _old_readout(x, adj, logits_a, pool), _old_readout(x, adj, logits_b, pool)
    torch.testing.assert_close(old_a, old_b)  # the old formula ignores S


@pytest.mark.parametrize("pool", ["mincut", "diffpool"])
@pytest.mark.parametrize("num_nodes", [4, 50])
def test_readout_of_identical_nodes_is_that_node_whatever_n(pool, num_nodes):
    torch.manual_seed(0)
    row = torch.randn(6)
    x = row.expand(2, num_nodes, 6).clone()
    logits = torch.randn(2, num_nodes, 3)
    adj = torch.ones(2, num_nodes, num_nodes) - torch.eye(num_nodes)
    torch.testing.assert_close(_new_readout(x, adj, logits, pool), row.expand(2, 6), atol=1e-4, rtol=1e-4)
    old = _old_readout(x, adj, logits, pool)
    assert not torch.allclose(old, row.expand(2, 6), atol=1e-2)  # (N/K) times the row


def test_an_empty_super_node_gives_no_nan():
    x = torch.randn(1, 5, 4)
    logits = torch.zeros(1, 5, 3)
    logits[..., 2] = -1e4  # nothing is assigned to super-node 2
    super_nodes, aux, _ = pool_into_super_nodes(x, similarity_adjacency(x), logits, "mincut")
    assert torch.isfinite(super_nodes).all() and torch.isfinite(aux)
    assert super_nodes[0, 2].abs().max() < 1e-3
    torch.testing.assert_close(super_nodes[0, 0], x[0].mean(0))
