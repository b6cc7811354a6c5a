"""The one place that maps ``--algo`` to its network: dqn's dueling network (``networks``), rainbow's
and iqn's (``distributional``), the asynchronous family's (``asyncrl``). Every role builds its network
here; the network modules import only ``torsos`` and each other's leaves, never this one."""

from __future__ import annotations

from typing import Any

from torch import nn

from .asyncrl import build_async_network
from .config import ASYNC_ALGOS
from .distributional import build_distributional_network
from .envs import EnvSpec
from .networks import build_dqn_network


def build_network(spec: EnvSpec, hidden: int, algo: str = "dqn", **options: Any) -> nn.Module:
    """The network ``algo`` learns for ``spec``: for dqn the dueling (``dueling=False``: single-head) Q network; for rainbow and iqn
    ``distributional.build_distributional_network`` with ``options`` (``config.net_options``) on the same
    torso; for the asynchronous family Mnih et al. 2016's (``asyncrl.build_async_network``)."""
    if algo in ASYNC_ALGOS:
        if options:
            raise ValueError(f"{algo}'s network takes no options, got {sorted(options)}")
        return build_async_network(spec, hidden, algo)
    if algo != "dqn":  # rainbow, iqn; another name is refused there, naming the choices
        return build_distributional_network(spec, hidden, algo, **options)
    if set(options) - {"dueling"}:
        raise ValueError(f"dqn's network takes only the option 'dueling', got {sorted(options)}")
    return build_dqn_network(spec, hidden, **options)
