"""A griffe extension for the docs build: make ``aioshm``'s lazily loaded names visible.

``aioshm`` loads ``Pool``, ``run_sync``, ``spawn``… on first access (a module ``__getattr__``),
so a static reading of ``aioshm/__init__.py`` does not see them. For every name of
``aioshm.__all__`` that the static reading misses, this imports aioshm, looks the object up
and adds an alias to where it is really defined, so the API reference can say
``::: aioshm.Pool`` whichever private module ``Pool`` lives in. A name whose import needs an
optional dependency that is not installed (``RayBackend`` without ray), or that is an
instance (``local_backend``), is looked up statically instead: the one submodule that defines
it. ``aioshm.Process``, statically an attribute bound to a class, becomes an alias of that
class. Once the package imports the lazy names under ``TYPE_CHECKING`` too, this finds
nothing more to add.

The docstrings use Sphinx roles (``:class:`Pool```, ``:meth:`~Pool.join```), which Markdown
would print as they are: they are shown as code instead (``Pool``, ``join``), in the rendered
text only. A reST ``::`` that ends a paragraph before a literal block becomes ``:``, and
``:raises ~aioshm.X:`` shows ``aioshm.X``.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterator
from typing import Any

import griffe


class LazyNames(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        if pkg.name != "aioshm":
            return
        runtime = importlib.import_module("aioshm")
        for name in runtime.__all__:
            static = pkg.members.get(name)
            if static is not None and not (
                static.is_attribute and isinstance(getattr(runtime, name), type)
            ):
                continue  # found statically (an attribute bound to a class, like Process, is not)
            try:
                obj = getattr(runtime, name)
            except ImportError:
                target = _defined_in(pkg, name)
            else:
                module = getattr(obj, "__module__", None)
                qualname = getattr(obj, "__qualname__", None)
                if module and qualname and module.startswith("aioshm."):
                    target = f"{module}.{qualname}"
                else:  # an instance, such as local_backend
                    target = _defined_in(pkg, name)
            pkg.set_member(name, griffe.Alias(name, target, parent=pkg))
        for obj in _walk(pkg):
            if obj.docstring is not None:
                obj.docstring.value = _markdown(obj.docstring.value)


_RAISES_TILDE = re.compile(r"(:raises) ~")
_ROLE = re.compile(r":(?:class|meth|func|mod|data|attr|exc|obj):`(~?)([^`]+)`")
_LITERAL = re.compile(r"(?<=\S)::$", re.MULTILINE)


def _markdown(text: str) -> str:
    text = _ROLE.sub(lambda m: f"`{m[2].rsplit('.', 1)[-1] if m[1] else m[2]}`", text)
    text = _RAISES_TILDE.sub(r"\1 ", text)
    return _LITERAL.sub(":", text)


def _walk(obj: griffe.Object) -> Iterator[griffe.Object]:
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _walk(member)  # type: ignore[arg-type]


def _defined_in(pkg: griffe.Module, name: str) -> str:
    found = [
        f"{mod.path}.{name}"
        for mod in pkg.modules.values()
        if name in mod.members and not mod.members[name].is_alias
    ]
    if len(found) != 1:
        raise RuntimeError(f"aioshm.{name}: defined in {len(found)} submodules, expected one")
    return found[0]
