"""Model surgery: unwrap parallel wrappers and swap named submodules."""

from __future__ import annotations

from torch import nn

__all__ = ["unwrap", "get_submodule", "replace_modules"]


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` wrappers (or ``model`` itself)."""
    while isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        model = model.module
    return model


def get_submodule(model: nn.Module, name: str) -> nn.Module:
    """``model.get_submodule(name)`` with an error that names what is missing."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"the model has no submodule named '{name}'") from None


def replace_modules(model: nn.Module, new: dict[str, nn.Module]) -> nn.Module:
    """Replace each ``{name: module}`` in place (``name`` as in ``model.named_modules()``); returns ``model``."""
    for name, module in new.items():
        if not name:
            raise ValueError("cannot replace the root module itself")
        parent_name, _, child = name.rpartition(".")
        parent = get_submodule(model, parent_name) if parent_name else model
        get_submodule(model, name)  # raises a clear error if it does not exist
        setattr(parent, child, module)
    return model
