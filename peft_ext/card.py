"""The model card peft-ext writes for its adapters (``PeftModel.save_pretrained`` calls ``update_model_card``)."""

from __future__ import annotations

import os

from ._io import atomic_write_text


def model_card_section(specs) -> str:
    """The markdown block peft-ext adds to a saved adapter's model card: method, paper citation, official code."""
    lines = ["## peft-ext", ""]
    for spec in specs:
        lines.append(f"This adapter was trained with **{spec.name}** from [peft-ext](https://pypi.org/project/peft-ext/).")
        lines.append("Load it with `PeftModel.from_pretrained` after `pip install peft-ext`.")
        lines.append("")
        lines.append(f"- Paper: *{spec.paper_title}* — {spec.paper_url}")
        lines.append(f"- Official code: {spec.code_url or 'none public'}")
        lines.append("")
    lines.append("### Citation")
    lines.append("")
    for spec in specs:
        lines.append(f"- {spec.paper_title}. {spec.paper_url}")
    return "\n".join(lines) + "\n"


def update_model_card(model, output_dir: str, specs) -> None:
    """Add the peft-ext section (method, paper, official code) to the card PEFT just wrote in ``output_dir``.

    ``specs`` are the ``MethodSpec`` of the peft-ext adapters of ``model`` (a ``PeftModel``); saving again replaces
    the section instead of appending a second one."""
    path = os.path.join(output_dir, "README.md")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    marker = "## peft-ext\n"
    if marker in text:
        text = text[: text.index(marker)].rstrip("\n") + "\n"
    text = text.rstrip("\n") + "\n\n" + model_card_section(specs)
    atomic_write_text(path, text)
