"""A tiny name -> builder registry, in the spirit of timm's model registry."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from denuc.errors import DenucError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects (usually builder callables).

    ``Registry("encoder")`` is used as a decorator::

        ENCODERS = Registry("encoder")

        @ENCODERS.register("efficientnet-lite0")
        def build(...): ...

    Unknown names raise :class:`DenucError` listing the known ones.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        if obj is not None:
            self._add(name, obj)
            return obj

        def deco(o: T) -> T:
            self._add(name, o)
            return o

        return deco

    def _add(self, name: str, obj: T) -> None:
        if name in self._items:
            raise DenucError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = obj

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "(none)"
            raise DenucError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def __len__(self) -> int:
        return len(self._items)
