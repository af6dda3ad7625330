"""peft-ext: LoRA-family methods from recent papers as first-class Hugging Face PEFT methods.

Importing this package registers every method with PEFT (``get_peft_model``, ``PeftModel.from_pretrained``,
``save_pretrained``, merging). Installing it also registers them automatically whenever ``peft`` is imported, so
saved adapters load in processes that never import ``peft_ext``. See ``list_methods()`` for the papers.
"""

from .version import __version__ as __version__  # re-exported: peft_ext.__version__


def _quiet_bitsandbytes_kernel_probe() -> None:
    """Drop the one warning bitsandbytes logs at import on CPUs with AVX512-BF16 when it cannot download an optional
    kernel from the Hub ("Failed to load CPU gemm_4bit_forward from kernels-community ..."): offline it always fails,
    bitsandbytes falls back to its own kernel, and the line would open every ``peft-ext`` command. Takes effect when
    peft_ext is imported before peft (the command, or ``import peft_ext`` first); every other record passes."""
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: "gemm_4bit_forward from kernels-community" not in str(record.msg)
    )


_quiet_bitsandbytes_kernel_probe()

from .registry import MethodSpec, get_method, list_methods  # noqa: E402  (registers every method)
from .tuners.dylora import DyLoraConfig, DyLoraModel  # noqa: E402
from .tuners.nola import NolaConfig, NolaModel  # noqa: E402
from .tuners.lora_sb import LoraSBConfig, LoraSBModel  # noqa: E402
from .tuners.block_lora import BlockLoraConfig, BlockLoraModel  # noqa: E402
from .tuners.switchlora import SwitchLoraConfig, SwitchLoraModel  # noqa: E402
from .tuners.codyra import CodyraConfig, CodyraModel  # noqa: E402
from .tuners.o3_lora import O3LoraConfig, O3LoraModel  # noqa: E402
from .tuners.lora_mixer import LoraMixerConfig, LoraMixerModel  # noqa: E402
from .tuners.mola import MolaConfig, MolaModel  # noqa: E402
from .tuners.smora import SmoraConfig, SmoraModel  # noqa: E402
from .tuners.gated_lora import GatedLoraConfig, GatedLoraModel  # noqa: E402
from .tuners.prompt_aware_lora import PromptAwareLoraConfig, PromptAwareLoraModel  # noqa: E402
from .hub import push_to_hub  # noqa: E402
from .presets import load_config  # noqa: E402
from . import callbacks, fsdp, init, optim, presets  # noqa: E402

__all__ = [
    "BlockLoraConfig",
    "BlockLoraModel",
    "CodyraConfig",
    "CodyraModel",
    "DyLoraConfig",
    "DyLoraModel",
    "GatedLoraConfig",
    "GatedLoraModel",
    "LoraMixerConfig",
    "LoraMixerModel",
    "LoraSBConfig",
    "LoraSBModel",
    "MethodSpec",
    "MolaConfig",
    "MolaModel",
    "NolaConfig",
    "NolaModel",
    "O3LoraConfig",
    "O3LoraModel",
    "PromptAwareLoraConfig",
    "PromptAwareLoraModel",
    "SmoraConfig",
    "SmoraModel",
    "SwitchLoraConfig",
    "SwitchLoraModel",
    "callbacks",
    "fsdp",
    "get_method",
    "init",
    "list_methods",
    "load_config",
    "optim",
    "presets",
    "push_to_hub",
]
