"""Named registries: how routers and expert backends are looked up (and added by users).

A :class:`Registry` maps a name to an entry of one kind (every entry has the same signature),
like transformers' ``AttentionInterface`` / ``ExpertsInterface``::

    from echomoe.moe import EXPERT_BACKENDS, ExpertBackend

    def my_kernel(experts, x, expert_ids, weights):      # (N, D), (N, k), (N, k) -> (N, D)
        ...

    EXPERT_BACKENDS.register("my_kernel", ExpertBackend(my_kernel))
    build_moe_layer(64, 32, num_experts=8, top_k=2, backend="my_kernel")

``register(name)`` without an entry is a decorator, for registries whose entries are the
decorated objects themselves.
An unknown name is a ``ValueError`` that lists the registered ones.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """Name -> entry, in registration order.

    Args:
        kind: what the entries are (``"router"``, ``"backend"``), for error messages.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T | None = None, *, replace: bool = False):
        """Register ``entry`` under ``name``; without ``entry``, a decorator that registers the
        decorated object.  Re-using a name needs ``replace=True``."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")

        def add(value: T) -> T:
            if name in self._entries and not replace:
                raise ValueError(f"{self.kind} {name!r} is already registered (pass "
                                 "replace=True to override it)")
            self._entries[name] = value
            return value

        return add if entry is None else add(entry)

    def unregister(self, name: str) -> T:
        """Remove and return the entry ``name``."""
        return self._entries.pop(self._check(name))

    def _check(self, name: str) -> str:
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; valid: {', '.join(self._entries)}")
        return name

    def __getitem__(self, name: str) -> T:
        return self._entries[self._check(name)]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def get(self, name: str, default: T | None = None) -> T | None:
        """The entry ``name``, or ``default`` when there is none."""
        return self._entries.get(name, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"

