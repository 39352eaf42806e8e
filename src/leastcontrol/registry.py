"""A tiny name -> factory registry, shared by systems, methods and data sets."""
from __future__ import annotations

from typing import Callable, Dict, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to factories; unknown names raise a ValueError listing the valid ones.

    >>> r = Registry("method"); r.register("x", dict); sorted(r.names())
    ['x']
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: Dict[str, Callable[..., T]] = {}

    def register(self, name: str, factory: Callable[..., T], *, overwrite: bool = False) -> Callable[..., T]:
        if not overwrite and name in self._items:
            raise ValueError(f"{self.kind} '{name}' is already registered; pass overwrite=True to replace it")
        self._items[name] = factory
        return factory

    def names(self) -> list[str]:
        return sorted(self._items)

    def factory(self, name: str) -> Callable[..., T]:
        try:
            return self._items[name]
        except KeyError:
            raise ValueError(
                f"unknown {self.kind} '{name}'; valid {self.kind}s: {', '.join(self.names())}"
            ) from None

    def create(self, name: str, *args, **kwargs) -> T:
        return self.factory(name)(*args, **kwargs)

    def __contains__(self, name: str) -> bool:
        return name in self._items
