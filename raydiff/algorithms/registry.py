"""Algorithms by name. Adding one: write `algorithms/<name>.py` with a `Config`
(a Section whose `name: Literal["<name>"]`) and an `Algorithm` subclass, then list it in `_MODULES`."""

from __future__ import annotations

import importlib
from typing import Annotated, Union

from pydantic import Discriminator, Tag

_MODULES = ["raydiff.algorithms.ddpo", "raydiff.algorithms.alignprop", "raydiff.algorithms.draft", "raydiff.algorithms.drtune", "raydiff.algorithms.dag", "raydiff.algorithms.diffinstruct_pp", "raydiff.algorithms.flow_grpo", "raydiff.algorithms.nft"]
_ALGORITHMS = {}
for _mod_name in _MODULES:
    _mod = importlib.import_module(_mod_name)
    _ALGORITHMS[_mod.Config.model_fields["name"].default] = _mod.ALGORITHM

_configs = tuple(a.config_cls for a in _ALGORITHMS.values())
if len(_configs) == 1:
    AlgorithmConfig = _configs[0]
else:  # tagged union: `algorithm.name` picks the class (the first algorithm's when omitted), errors name the algorithm
    _DEFAULT_NAME = _configs[0].model_fields["name"].default

    def _algorithm_tag(value) -> str:
        return value.get("name", _DEFAULT_NAME) if isinstance(value, dict) else getattr(value, "name", _DEFAULT_NAME)

    AlgorithmConfig = Annotated[
        Union[tuple(Annotated[c, Tag(c.model_fields["name"].default)] for c in _configs)],
        Discriminator(_algorithm_tag),
    ]


def default_algorithm_config():
    return _configs[0]()


def algorithm_names() -> list[str]:
    return sorted(_ALGORITHMS)


def make_algorithm(config, sampling, reward=None):
    """Instantiate the algorithm that `config.name` names."""
    return _ALGORITHMS[config.name](config, sampling, reward)
