"""splitnet: the two-GPU AlexNet of Krizhevsky, Sutskever & Hinton (NIPS 2012), as the paper laid it out."""
from .config import ConfigError
from .model.config import ModelConfig
from .model.exchange import ExchangeEvent, record_exchanges
from .model.layout import Layout, LayerRow, LayoutError, get_layout, layouts, make_layout
from .model.columns import SplitAlexNet
from .model.placement import DeviceError

__version__ = "0.1.0"


def load(run, devices=None, data=None, need_mean: bool = True):
    """(model, preprocessing) of a run folder: trained, reproduced or imported (pretrained/load.py)."""
    from .pretrained.load import load as _load  # here: the package's top level stays light
    return _load(run, devices, data, need_mean)


__all__ = ["SplitAlexNet", "ModelConfig", "ConfigError", "Layout", "LayerRow", "LayoutError",
           "DeviceError", "ExchangeEvent", "record_exchanges", "get_layout", "layouts", "make_layout", "load"]
