"""Merging adapters: LoRA-LEGO (rank-wise clustering) and PEFT's merge rules over adapter folders.

``lego_merge`` / ``add_lego_adapter`` (``lego.py``) and ``merge_adapters`` (``merge.py``, behind ``peft-ext merge``)
take PEFT LoRA adapters, or peft-ext adapters that export to LoRA, and give a plain LoRA adapter;
``add_merged_adapter`` (``merge.py``) merges adapters loaded in one model into a new adapter of that model.
"""

from .adapters import LoraView, MergeInputError, load_adapter, write_lora_folder
from .lego import add_lego_adapter, kmeans, lego_merge
from .merge import IN_MODEL_RULES, RULES, add_merged_adapter, merge_adapters

__all__ = ["IN_MODEL_RULES", "RULES", "LoraView", "MergeInputError", "add_lego_adapter", "add_merged_adapter", "kmeans",
           "lego_merge", "load_adapter", "merge_adapters", "write_lora_folder"]
