"""Trie-constrained beam search: never an invalid ID; exact on a tiny codebook."""
import torch

from synergen_core.model.decoding import SemanticIdTrie, constrained_beam_search


def _random_codes(n_items, levels, K, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, K, (n_items, levels), generator=g)


def test_trie_allowed_contains_and_items():
    codes = torch.tensor([[0, 0], [1, 2], [1, 0], [3, 1], [1, 2]])  # row 0 padding; items 1 and 4 collide
    trie = SemanticIdTrie(codes, codebook_size=4)
    assert len(trie) == 3 and trie.n_collisions == 1
    assert trie.allowed(torch.zeros(1, 0, dtype=torch.long)).tolist() == [[False, True, False, True]]
    assert trie.allowed(torch.tensor([[1], [3], [0]])).tolist() == [
        [True, False, True, False], [False, True, False, False], [False, False, False, False]
    ]
    ids = torch.tensor([[1, 2], [1, 0], [3, 1], [0, 0], [2, 2]])
    assert trie.contains(ids).tolist() == [True, True, True, False, False]
    assert trie.items(ids).tolist() == [1, 2, 3, 0, 0]  # the collision maps to the lowest item


def test_trie_item_mask_restricts_ids():
    codes = torch.tensor([[0, 0], [1, 2], [1, 0]])
    trie = SemanticIdTrie(codes, 4, item_mask=torch.tensor([True, False, True]))
    assert trie.contains(torch.tensor([[1, 2], [1, 0]])).tolist() == [False, True]


def test_beam_search_never_returns_an_invalid_id():
    levels, K, beam, B = 3, 16, 10, 64
    codes = _random_codes(200, levels, K, seed=0)
    trie = SemanticIdTrie(codes, K)
    g = torch.Generator().manual_seed(1)
    table = torch.randn(B, levels, K, generator=g) * 5  # random logits, prefix-independent per level

    def step(prefix):  # [B, W, l] -> [B, W, K]
        noise = torch.randn(prefix.shape[0], prefix.shape[1], K, generator=g)
        return table[:, prefix.shape[-1]][:, None] + noise

    out = constrained_beam_search(step, trie, B, beam)
    assert out.codes.shape == (B, beam, levels) and out.items.shape == (B, beam)
    assert torch.isfinite(out.scores).all()
    assert trie.contains(out.codes).all()
    assert (out.items > 0).all()
    assert torch.equal(codes[out.items], out.codes)
    assert (out.scores[:, 1:] <= out.scores[:, :-1]).all()  # best first
    for b in range(B):  # distinct IDs per request
        assert len({tuple(c) for c in out.codes[b].tolist()}) == beam


def test_beam_search_equals_brute_force_on_tiny_codebook():
    levels, K, B = 3, 3, 5
    codes = _random_codes(12, levels, K, seed=3)
    trie = SemanticIdTrie(codes, K)
    valid = sorted({tuple(c) for c in codes[1:].tolist()})
    g = torch.Generator().manual_seed(4)
    # logits depend on the request and on the whole prefix: one table row per (level, prefix)
    tables = [torch.randn(B, K**lvl, K, generator=g) * 3 for lvl in range(levels)]

    def prefix_key(prefix):
        key = torch.zeros(prefix.shape[:-1], dtype=torch.long)
        for k in range(prefix.shape[-1]):
            key = key * K + prefix[..., k]
        return key

    def step(prefix):  # [B, W, l] -> [B, W, K]
        key = prefix_key(prefix)  # [B, W]
        return torch.stack([tables[prefix.shape[-1]][b, key[b]] for b in range(B)])

    def brute_score(b, ident):
        s = 0.0
        for lvl in range(levels):
            logp = torch.log_softmax(tables[lvl][b, prefix_key(torch.tensor(ident[:lvl]))], -1)
            s += logp[ident[lvl]].item()
        return s

    beam = len(valid)  # >= the number of valid prefixes at every level: search is exact
    out = constrained_beam_search(step, trie, B, beam)
    for b in range(B):
        ranked = sorted(valid, key=lambda ident: -brute_score(b, ident))
        assert [tuple(c) for c in out.codes[b].tolist()] == ranked
        torch.testing.assert_close(
            out.scores[b], torch.tensor([brute_score(b, i) for i in ranked]), atol=1e-5, rtol=1e-5
        )


def test_fewer_valid_ids_than_beam_are_padded_not_invented():
    codes = torch.tensor([[0, 0], [1, 1], [2, 0]])
    trie = SemanticIdTrie(codes, 3)
    out = constrained_beam_search(lambda p: torch.zeros(2, p.shape[1], 3), trie, 2, beam=5)
    assert out.codes.shape == (2, 5, 2)
    assert torch.isfinite(out.scores[:, :2]).all() and torch.isinf(out.scores[:, 2:]).all()
    assert set(map(tuple, out.codes[0, :2].tolist())) == {(1, 1), (2, 0)}
    assert (out.codes[:, 2:] == -1).all() and (out.items[:, 2:] == 0).all()
