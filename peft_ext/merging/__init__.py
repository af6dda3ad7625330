"""Merging adapters: LoRA-LEGO (rank-wise clustering) and PEFT's merge rules over adapter folders.

``lego_merge`` / ``add_lego_adapter`` (``lego.py``) and ``merge_adapters`` (``merge.py``, behind ``peft-ext merge``)
take PEFT LoRA adapters, or peft-ext adapters that export to LoRA, and give a plain LoRA adapter.
"""

from .adapters import LoraView, MergeInputError, load_adapter, write_lora_folder
from .lego import add_lego_adapter, kmeans, lego_merge
from .merge import RULES, merge_adapters

__all__ = ["RULES", "LoraView", "MergeInputError", "add_lego_adapter", "kmeans", "lego_merge", "load_adapter",
           "merge_adapters", "write_lora_folder"]
