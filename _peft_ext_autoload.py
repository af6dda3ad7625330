"""Register peft-ext's methods the moment ``peft`` is imported, at no cost to processes that never import it.

Installed next to ``peft_ext`` together with ``peft_ext_autoload.pth``, which imports this module at interpreter start.
This module imports nothing heavy: it puts one finder at the front of ``sys.meta_path`` that answers ``None`` for every
module except ``peft``. When ``peft`` is imported, the finder steps aside, lets the normal machinery load ``peft``, and
right after ``peft`` finishes executing imports ``peft_ext``, which registers every method (DyLoRA, NOLA, ...) with
PEFT. ``PeftModel.from_pretrained`` of a peft-ext adapter then works in a fresh process without ``import peft_ext``.

Set ``PEFT_EXT_NO_AUTOLOAD=1`` to switch this off.
"""

import os
import sys


class _PeftImportHook:
    """A ``sys.meta_path`` finder that imports ``peft_ext`` right after ``peft`` has been executed."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "peft":
            return None
        _uninstall()
        import importlib.util

        spec = importlib.util.find_spec("peft")
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_peft = spec.loader.exec_module

        def exec_module(module):
            exec_peft(module)
            try:
                import peft_ext  # noqa: F401  (registers every method)
            except Exception as exc:  # never break `import peft` because of us
                import warnings

                warnings.warn(f"peft-ext could not register its methods with PEFT: {exc!r}", stacklevel=2)

        spec.loader.exec_module = exec_module
        return spec


def _uninstall():
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _PeftImportHook)]


def install():
    """Put the hook in place unless ``peft`` is already imported or ``PEFT_EXT_NO_AUTOLOAD`` is set."""
    if os.environ.get("PEFT_EXT_NO_AUTOLOAD", "") not in ("", "0"):
        return
    if "peft" in sys.modules or any(isinstance(f, _PeftImportHook) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _PeftImportHook())


install()
