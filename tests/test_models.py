"""Model structure helpers: the transformer block stack of every tiny family."""

from __future__ import annotations

import pytest

from fedpeft.errors import ConfigError
from fedpeft.models import transformer_blocks


@pytest.mark.parametrize("family, prefix", [("tiny-bert", "bert.encoder.layer"), ("tiny-vit", "vit.layers"),
                                            ("tiny-gpt2", "transformer.h"), ("tiny-llama", "model.layers")])
def test_transformer_blocks_finds_each_familys_block_list(tiny, family, prefix):
    loaded = tiny(family)
    blocks = transformer_blocks(loaded.model, loaded.info.num_layers)
    assert blocks.prefix == prefix and len(blocks) == loaded.info.num_layers == 2
    indices = {blocks.index_of(n) for n, _ in loaded.model.named_parameters()}
    assert indices == {None, 0, 1}  # embeddings and head belong to no block
    assert blocks.index_of(f"{prefix}.1.attention.x") == 1 and blocks.index_of(f"{prefix}x.1.y") is None
    with pytest.raises(ConfigError, match="expected one list of 3 transformer blocks"):
        transformer_blocks(loaded.model, 3)
