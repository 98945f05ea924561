"""Start-up objects leave the collector's generations, so full collections no longer walk them."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from shared.gc_freeze import freeze_startup_objects


@pytest.fixture
def unfreeze_after() -> Iterator[None]:
    yield
    gc.unfreeze()


@pytest.mark.usefixtures("unfreeze_after")
def test_objects_alive_at_start_up_are_frozen_and_later_ones_are_not() -> None:
    held_since_start_up: list[object] = [{}]
    frozen = freeze_startup_objects()
    made_later: list[object] = [{}]

    assert frozen == gc.get_freeze_count() > 0
    tracked = {id(obj) for obj in gc.get_objects()}
    assert id(held_since_start_up) not in tracked
    assert id(made_later) in tracked


@pytest.mark.usefixtures("unfreeze_after")
def test_cycles_made_after_the_freeze_are_still_collected() -> None:
    freeze_startup_objects()
    node = _Node()
    node.partner = node  # a reference cycle: only the collector frees it
    gone = weakref.ref(node)
    del node
    gc.collect()
    assert gone() is None


class _Node:
    partner: object = None
