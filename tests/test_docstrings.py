"""Every public module, class, function and method of the documented packages has a docstring.

The walk imports every module under :data:`PACKAGES` (``__main__`` modules excepted) and checks:

* the module's own docstring (private ``_name`` modules are skipped);
* each public function and class *defined* in that module (re-exports are checked where they are
  defined; names starting with ``_`` are private);
* each public method, classmethod, staticmethod and property defined in such a class.

A method may inherit its docstring from the method it overrides when that method is documented,
except ``forward`` overriding a third-party base (``torch.nn.Module.forward`` says nothing about
the tensors a particular module takes). Auto-generated docstrings (dataclass / NamedTuple
signatures, Enum's default) count as missing.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import importlib
import inspect
import pkgutil
from types import ModuleType

import pytest

PACKAGES = (
    "echomoe",
    "echomoe.cli",
    "echomoe.config",
    "echomoe.data",
    "echomoe.distributed",
    "echomoe.grounding",
    "echomoe.metrics",
    "echomoe.models",
    "echomoe.moe",
    "echomoe.train",
    "echomoe.utils",
    "echomoe.vision",
)
"""Packages (or single modules) whose public API must be documented; ``"echomoe"`` itself
stands for the top-level module only, not its sub-packages."""


def _modules(name: str) -> list[ModuleType]:
    module = importlib.import_module(name)
    found = [module]
    if name == "echomoe" or not hasattr(module, "__path__"):
        return found
    for info in pkgutil.walk_packages(module.__path__, prefix=f"{name}."):
        leaf = info.name.rsplit(".", 1)[-1]
        if leaf == "__main__" or leaf.startswith("_"):
            continue
        if any(part.startswith("_") for part in info.name.split(".")[1:]):
            continue
        found.append(importlib.import_module(info.name))
    return found


def _own_doc(obj) -> str | None:
    doc = getattr(obj, "__doc__", None)
    return doc if isinstance(doc, str) and doc.strip() else None


def _class_doc_missing(cls: type) -> bool:
    doc = _own_doc(cls) if "__doc__" in cls.__dict__ else None
    if doc is None:
        return True
    # dataclasses and NamedTuples write "Name(field, ...)" when the class has no docstring.
    auto = dataclasses.is_dataclass(cls) or (issubclass(cls, tuple) and hasattr(cls, "_fields"))
    if auto and doc.startswith(f"{cls.__name__}("):
        return True
    return issubclass(cls, enum.Enum) and doc.strip() == "An enumeration."


def _unwrap(member):
    if isinstance(member, (staticmethod, classmethod)):
        return member.__func__
    if isinstance(member, property):
        return member.fget
    if isinstance(member, functools.cached_property):
        return member.func
    if inspect.isfunction(member):
        return member
    return None


def _inherited_doc(cls: type, name: str) -> bool:
    """Whether the nearest documented definition of ``name`` up the MRO may stand in."""
    for base in cls.__mro__[1:]:
        func = _unwrap(base.__dict__.get(name))
        if func is None or _own_doc(func) is None:
            continue
        third_party = not base.__module__.startswith("echomoe")
        return not (third_party and name == "forward")
    return False


def _missing_in_class(cls: type, where: str) -> list[str]:
    missing = []
    for name, member in vars(cls).items():
        if name.startswith("_"):
            continue
        func = _unwrap(member)
        if func is None or _own_doc(func) is not None or _inherited_doc(cls, name):
            continue
        missing.append(f"{where}.{name}")
    return missing


def missing_docstrings(packages=PACKAGES) -> list[str]:
    """Dotted names of every public module / class / function / method without a docstring."""
    missing, seen = [], set()
    for package in packages:
        for module in _modules(package):
            if module.__name__ in seen:
                continue
            seen.add(module.__name__)
            if _own_doc(module) is None:
                missing.append(f"{module.__name__} (module)")
            for name, obj in vars(module).items():
                if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                    continue
                where = f"{module.__name__}.{name}"
                if inspect.isclass(obj):
                    if _class_doc_missing(obj):
                        missing.append(where)
                    missing.extend(_missing_in_class(obj, where))
                elif inspect.isfunction(obj) and _own_doc(obj) is None:
                    missing.append(where)
    return missing


def test_public_api_is_documented():
    missing = missing_docstrings()
    assert not missing, f"{len(missing)} public items lack a docstring:\n" + "\n".join(missing)


def test_the_check_can_fail():
    """The walker reports what it should: an undocumented function, class, method, dataclass."""
    module = ModuleType("echomoe._doc_probe", "A probe module.")

    def undocumented(x):
        return x

    class Documented:
        """Has a docstring."""

        def method(self):
            return 1

        @property
        def prop(self):
            return 2

        def forward(self):
            """Documented."""

    @dataclasses.dataclass
    class Plain:
        a: int = 0

    for obj in (undocumented, Documented, Plain):
        obj.__module__ = module.__name__
        setattr(module, obj.__name__, obj)
    names = []
    for name, obj in vars(module).items():
        if inspect.isclass(obj):
            names += [name] if _class_doc_missing(obj) else []
            names += _missing_in_class(obj, name)
        elif inspect.isfunction(obj) and _own_doc(obj) is None:
            names.append(name)
    assert sorted(names) == ["Documented.method", "Documented.prop", "Plain", "undocumented"]


@pytest.mark.parametrize("name", ["forward", "extra_repr"])
def test_inherited_docstrings(name):
    import torch

    class Sub(torch.nn.Module):
        """A module."""

    class SubSub(Sub):
        """A module whose parent overrides ``name`` without a docstring."""

    setattr(Sub, name, lambda self: None)
    setattr(SubSub, name, lambda self: None)
    # nn.Module.forward's docstring says nothing about this module's tensors; extra_repr's does.
    assert _inherited_doc(Sub, name) is (name != "forward")
    assert _inherited_doc(SubSub, name) is (name != "forward")
