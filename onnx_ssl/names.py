"""The one source of new names: a name not yet taken, made from a base.

Every module that adds tensors, nodes or spaces names them here, each in its own spelling
(``conv_2``, ``W.1``, ``stage1#2``): the spelling is part of what the tools write out, so it
stays, and only the search for a free name is shared. For example, with ``a`` and ``a_2``
taken, ``fresh_name(taken, "a")`` is ``a_3``. Nothing here depends on the rest of the package.
"""

from __future__ import annotations


def fresh_name(taken: set[str], base: str, *, sep: str = "_", start: int = 2,
               numbered: bool = False) -> str:
    """``base`` when it is free (and not ``numbered``), else ``base{sep}{k}`` for the first
    ``k`` >= ``start`` that is free; the name returned is added to ``taken``."""
    if numbered or base in taken:
        k = start
        while f"{base}{sep}{k}" in taken:
            k += 1
        base = f"{base}{sep}{k}"
    taken.add(base)
    return base
