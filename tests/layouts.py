"""Reference state_dict layouts of NVIDIA's released networks (tests/data/*.keys, from networks_keys.md)."""
from __future__ import annotations

from pathlib import Path

import torch

DATA = Path(__file__).parent / "data"


def read_layout(name: str) -> list[tuple[str, list[int], str]]:
    """[(key, shape, 'param' | 'buffer')] of ``tests/data/<name>.keys`` in state_dict order."""
    rows = []
    for line in (DATA / f"{name}.keys").read_text().splitlines():
        if line.startswith("#"):
            continue
        key, shape, kind = line.split()
        rows.append((key, [] if shape == "-" else [int(s) for s in shape.split(",")], kind))
    return rows


def assert_layout(net: torch.nn.Module, name: str, drop: tuple[str, ...] = ()) -> None:
    """``net``'s state_dict has exactly the keys, order, shapes and param/buffer kinds of the layout
    (minus the keys in ``drop``)."""
    expected = [row for row in read_layout(name) if row[0] not in drop]
    sd = net.state_dict()
    params = {k for k, _ in net.named_parameters()}
    assert list(sd) == [k for k, _, _ in expected]
    for key, shape, kind in expected:
        assert list(sd[key].shape) == shape, key
        assert (key in params) == (kind == "param"), key
