"""``convert``: swap every ``nn.LSTM``/``nn.GRU`` inside a model for its Highway twin."""

from __future__ import annotations

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
    return twin


def convert(module: nn.Module, **options: Any) -> nn.Module:
    """Replace, in place, every ``nn.LSTM`` and ``nn.GRU`` in ``module`` (exactly those
    classes, not subclasses) by ``HighwayLSTM``/``HighwayGRU`` with ``options``.

    Parameters and ``state_dict`` keys are kept. Returns ``module`` (or its twin when
    ``module`` itself is an ``nn.LSTM``/``nn.GRU``).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(module).__name__}")
    if type(module) in _TWINS:
        return highway_twin(module, **options)
    for name, child in module.named_children():
        if type(child) in _TWINS:
            setattr(module, name, highway_twin(child, **options))
        else:
            convert(child, **options)
    return module
