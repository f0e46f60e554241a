"""``convert``: swap every ``nn.LSTM``/``nn.GRU`` inside a model for its Highway twin."""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from .rnn import HighwayGRU, HighwayLSTM

__all__ = ["convert", "highway_twin"]

_TWINS: dict[type, type] = {nn.LSTM: HighwayLSTM, nn.GRU: HighwayGRU}


def highway_twin(module: nn.RNNBase, **options: Any) -> nn.RNNBase:
    """A Highway layer with the same configuration that holds ``module``'s own parameter
    objects (an optimizer built on the old module keeps working)."""
    twin_cls = _TWINS[type(module)]
    kwargs = dict(
        num_layers=module.num_layers, bias=module.bias, batch_first=module.batch_first,
        dropout=module.dropout, bidirectional=module.bidirectional,
    )
    if isinstance(module, nn.LSTM):
        kwargs["proj_size"] = module.proj_size
    ref = module._flat_weights[0]
    twin = twin_cls(module.input_size, module.hidden_size, device=ref.device, dtype=ref.dtype, **kwargs, **options)
    for name in module._flat_weights_names:
        setattr(twin, name, getattr(module, name))
    twin._init_flat_weights()
    twin.train(module.training)
    # The same hook dictionaries (forward/backward/state-dict hooks registered on the old
    # module keep firing, and their handles can still remove them).
    for key, value in vars(module).items():
        if key.startswith("_") and key.endswith("hooks") and isinstance(value, dict):
            twin.__dict__[key] = value
    return twin


def _warn_skipped(module: nn.Module, where: str) -> None:
    if isinstance(module, (nn.LSTM, nn.GRU)) and not isinstance(module, tuple(_TWINS.values())):
        warnings.warn(
            f"convert: {where or 'the module'} is a {type(module).__name__}, a subclass of "
            f"nn.{'LSTM' if isinstance(module, nn.LSTM) else 'GRU'} (e.g. with a parametrization such as "
            "weight_norm, or a custom subclass): it is NOT converted and keeps training with BPTT.",
            UserWarning,
            stacklevel=3,
        )


def convert(module: nn.Module, **options: Any) -> nn.Module:
    """Replace, in place, every ``nn.LSTM`` and ``nn.GRU`` in ``module`` (exactly those
    classes, not subclasses) by ``HighwayLSTM``/``HighwayGRU`` with ``options``.

    Parameters, hooks and ``state_dict`` keys are kept. Returns ``module`` (or its twin
    when ``module`` itself is an ``nn.LSTM``/``nn.GRU``). A subclass of ``nn.LSTM``/``nn.GRU``
    (a parametrized one included) is left as it is, with a ``UserWarning`` naming it.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(module).__name__}")
    return _convert(module, "", options)


def _convert(module: nn.Module, where: str, options: dict) -> nn.Module:
    if type(module) in _TWINS:
        return highway_twin(module, **options)
    _warn_skipped(module, where)
    for name, child in module.named_children():
        path = f"{where}.{name}" if where else name
        if type(child) in _TWINS:
            setattr(module, name, highway_twin(child, **options))
        else:
            _convert(child, path, options)
    return module
