"""find_layers: the longest run of same-class blocks in any container; ambiguity names the candidates."""

from __future__ import annotations

import pytest
from torch import nn

from random_ltd.layers import convert_to_random_ltd
from random_ltd.layers.convert import find_layers


class Block(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim)

    def forward(self, x):
        return x + self.fc(self.norm(x))


class Other(Block):
    pass


class TimmViT(nn.Module):
    """timm's layout: ``blocks`` is an nn.Sequential, next to a patch embed, norm and head."""

    def __init__(self, depth: int = 6) -> None:
        super().__init__()
        self.patch_embed = nn.Sequential(nn.Conv2d(1, 8, 2, 2))
        self.blocks = nn.Sequential(*[Block() for _ in range(depth)])
        self.norm = nn.LayerNorm(8)
        self.head = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8), nn.Linear(8, 8))


def test_blocks_in_sequential_are_found() -> None:
    model = TimmViT()
    assert find_layers(model) == list(model.blocks)
    assert find_layers(nn.DataParallel(model)) == list(model.blocks)  # the wrapper of main_imagenet.py


def test_run_inside_a_flat_sequential_model() -> None:
    blocks = [Block() for _ in range(4)]
    model = nn.Sequential(nn.Linear(8, 8), *blocks, nn.LayerNorm(8), nn.Linear(8, 8))
    assert find_layers(model) == blocks


def test_leaf_runs_never_count() -> None:
    """An MLP's Linear layers (no submodules) are not transformer blocks, however many there are."""
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(5)], Block(), Block())
    assert len(find_layers(model)) == 2


def test_longest_run_wins() -> None:
    model = nn.Module()
    model.encoder = nn.Sequential(*[Block() for _ in range(3)])
    model.decoder = nn.ModuleList([Other() for _ in range(5)])
    assert find_layers(model) == list(model.decoder)


def test_equal_runs_are_ambiguous_and_named() -> None:
    model = nn.Module()
    model.encoder = nn.ModuleList([Block() for _ in range(3)])
    model.decoder = nn.Sequential(*[Other() for _ in range(3)])
    with pytest.raises(ValueError, match=r"ambiguous.*3 x Block at encoder\.0\.\.encoder\.2; "
                                         r"3 x Other at decoder\.0\.\.decoder\.2"):
        find_layers(model)
    assert find_layers(model, Other) == list(model.decoder)


def test_mixed_module_list_is_not_split() -> None:
    """Part of a mixed ModuleList (e.g. alternating layer kinds) is not "the layers": it must be named."""
    model = nn.Module()
    model.layers = nn.ModuleList([Block(), Other(), Other(), Other(), Block()])
    with pytest.raises(ValueError, match="could not find the transformer layers"):
        find_layers(model)


def test_wrapped_blocks_still_count_as_one_class() -> None:
    model = TimmViT(depth=4)
    convert_to_random_ltd(model, config={"total_layer_num": 4})
    assert find_layers(model) == list(model.blocks)


class LoraLinear(nn.Module):
    """PEFT's lora.Linear shape: a container (base layer + adapters), so consecutive projections form a run."""

    def __init__(self) -> None:
        super().__init__()
        self.base_layer = nn.Linear(8, 8)
        self.lora_A = nn.ModuleDict({"default": nn.Linear(8, 2)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(2, 8)})


class LoraBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.q, self.k, self.v, self.o = LoraLinear(), LoraLinear(), LoraLinear(), LoraLinear()
        self.experts = nn.ModuleList([Block() for _ in range(6)])


def test_repeats_inside_a_layer_do_not_count() -> None:
    """Two layers, each holding 4 LoRA projections and 6 experts: the layers are the two blocks."""
    model = nn.Module()
    model.layers = nn.ModuleList([LoraBlock(), LoraBlock()])
    assert find_layers(model) == list(model.layers)
