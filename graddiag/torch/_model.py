"""How the PyTorch adapter sees a model: its layers (modules that own trainable parameters), their
parameters, and the names users know them by."""

from __future__ import annotations

import numpy as np
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside `torch.compile` / (Distributed)DataParallel wrappers, so layer
    names read `encoder.0`, not `_orig_mod.encoder.0` or `module.encoder.0` (same parameters)."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model


def _owner(module_name: str) -> str:
    """The layer a module's parameters belong to: a parametrization's parameters
    (`0.parametrizations.weight.original`, from `weight_norm`, `spectral_norm`,
    `register_parametrization`) belong to the parametrized module (`0`), not to a layer of their own.
    """
    parts = module_name.split(".")
    if "parametrizations" in parts:
        parts = parts[: parts.index("parametrizations")]
    return ".".join(parts)


def layers_of(
    model: nn.Module,
) -> tuple[list[str], list[nn.Parameter], list[str], np.ndarray, list[str], list[str]]:
    """Layers (modules directly owning trainable parameters), their params, names and frozen ones."""
    seen: dict[int, str] = {}
    layers: list[str] = []
    params: list[nn.Parameter] = []
    pnames: list[str] = []
    layer_of: list[int] = []
    frozen: list[str] = []
    shared: list[str] = []
    root = type(model).__name__
    for mname, module in model.named_modules(remove_duplicate=False):
        for pname, p in module.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if id(p) in seen:
                if seen[id(p)] != full:
                    shared.append(full)
                continue
            seen[id(p)] = full
            if not p.requires_grad:
                frozen.append(full)
                continue
            lname = _owner(mname) or root
            if not layers or layers[-1] != lname:
                if lname in layers:
                    layer_idx = layers.index(lname)
                else:
                    layers.append(lname)
                    layer_idx = len(layers) - 1
            else:
                layer_idx = len(layers) - 1
            params.append(p)
            pnames.append(full)
            layer_of.append(layer_idx)
    return layers, params, pnames, np.asarray(layer_of, dtype=np.int64), frozen, shared


def lazy_parameters(model: nn.Module) -> list[tuple[str, str]]:
    """(parameter name, module class) of each parameter not materialized yet (`nn.LazyLinear` and
    other lazy modules before their first forward pass)."""
    return [
        (f"{mname}.{pname}" if mname else pname, type(module).__name__)
        for mname, module in model.named_modules()
        for pname, p in module.named_parameters(recurse=False)
        if nn.parameter.is_lazy(p)
    ]


def new_trainable(model: nn.Module, known: set[int]) -> list[str]:
    """Names of the parameters that train now (`requires_grad`) but are not in `known` (ids):
    modules added, layers unfrozen or parametrizations applied after the monitor was built."""
    return [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in known]
