"""peft-ext: LoRA-family methods from recent papers as first-class Hugging Face PEFT methods.

Importing this package registers every method with PEFT (``get_peft_model``, ``PeftModel.from_pretrained``,
``save_pretrained``, merging). Installing it also registers them automatically whenever ``peft`` is imported, so
saved adapters load in processes that never import ``peft_ext``. See ``list_methods()`` for the papers.
"""

__version__ = "0.1.0"

from .registry import MethodSpec, get_method, list_methods  # noqa: E402  (registers every method)
from .tuners.dylora import DyLoraConfig, DyLoraModel  # noqa: E402
from .tuners.nola import NolaConfig, NolaModel  # noqa: E402
from .hub import push_to_hub  # noqa: E402
from . import callbacks, optim  # noqa: E402

__all__ = [
    "DyLoraConfig",
    "DyLoraModel",
    "MethodSpec",
    "NolaConfig",
    "NolaModel",
    "callbacks",
    "get_method",
    "list_methods",
    "optim",
    "push_to_hub",
]
