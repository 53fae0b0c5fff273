"""splitnet: the two-GPU AlexNet of Krizhevsky, Sutskever & Hinton (NIPS 2012), as the paper laid it out."""
from .config import ConfigError
from .model.config import ModelConfig
from .model.exchange import ExchangeEvent, record_exchanges
from .model.layout import Layout, LayerRow, LayoutError, get_layout, layouts, make_layout
from .model.columns import SplitAlexNet
from .model.placement import DeviceError

__version__ = "0.1.0"

__all__ = ["SplitAlexNet", "ModelConfig", "ConfigError", "Layout", "LayerRow", "LayoutError",
           "DeviceError", "ExchangeEvent", "record_exchanges", "get_layout", "layouts", "make_layout"]
