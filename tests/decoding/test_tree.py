import torch

from hawkspec.backbones.base import ImageGrid
from hawkspec.decoding.tree import TopologyTable, build_topology, normalize_paths, paths_from_budget


def test_paths_are_prefix_closed_and_sized():
    paths = paths_from_budget(20, 4, 3)
    assert len(paths) == 20
    assert all(p[:-1] in paths for p in paths if len(p) > 1)
    assert normalize_paths([(0, 1, 2)]) == [(0,), (0, 1), (0, 1, 2)]


def test_forced_token_is_spliced_once_per_parent():
    paths = normalize_paths([(0, 0), (0, 1), (1, 0)])
    t = build_topology(paths, forced_offsets={2}, max_offset=10)
    # root, (0,), (1,), eol under (0,), eol under (1,), then codes at offset 3
    assert t.forced.sum() == 2
    eols = t.forced.nonzero().squeeze(1)
    assert set(t.depth[eols].tolist()) == {2}
    codes_after = (~t.forced) & (t.depth == 3)
    assert codes_after.sum() == 3
    assert all(t.forced[t.parent[i]] for i in codes_after.nonzero().squeeze(1))


def test_tree_is_cut_at_the_image_end():
    paths = paths_from_budget(10, 4, 3)
    t = build_topology(paths, forced_offsets=set(), max_offset=2)
    assert int(t.depth.max()) == 2


def test_table_masks_are_ancestor_masks():
    grid = ImageGrid(4, 4)
    tab = TopologyTable(paths_from_budget(12, 4, 3), grid)
    for i, t in enumerate(tab.topologies):
        m = tab.mask[i]
        for node in range(t.size):
            anc = {node}
            j = int(t.parent[node])
            while j >= 0:
                anc.add(j)
                j = int(t.parent[j])
            assert set(m[node].nonzero().squeeze(1).tolist()) == anc
    # a root right before an end-of-line token gets a tree with a forced node at offset 1
    ids = tab.lookup(torch.tensor([3]))
    t = tab.topologies[int(ids)]
    assert t.forced[t.depth == 1].all()
