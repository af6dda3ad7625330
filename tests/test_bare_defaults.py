"""A bare config either trains or says what it needs (issue 20).

Every registered method, configured with ``target_modules`` alone (every other field at its default), as a new user
would write it: on a tiny causal LM, one ordinary training step (forward with labels, ``loss.backward()``, an
optimizer step) must change at least one adapter parameter, or the method must stop early, at ``get_peft_model`` or
at that first forward, with a ValueError / TypeError that names the method. What it must not do is train nothing
silently or fail inside autograd ("element 0 of tensors does not require grad"). Parametrised over the registry, so a
new method is covered the moment it is registered.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from conftest import method_params, tiny_llama

TARGETS = ["q_proj", "v_proj"]


def names_the_method(spec, exc: BaseException) -> bool:
    """The message names the method: its registry name (``gated_lora``) or its config class (``GatedLoraConfig``)."""
    text = str(exc)
    return spec.name in text or spec.config_cls.__name__ in text


@pytest.mark.parametrize("spec", method_params())
def test_bare_config_trains_or_names_what_it_needs(spec):
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    try:
        model = get_peft_model(tiny_llama(), spec.config_cls(target_modules=list(TARGETS)))
    except (ValueError, TypeError) as exc:
        assert names_the_method(spec, exc), f"{spec.name}: the error at get_peft_model does not name the method: {exc}"
        return
    model.train()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, f"{spec.name}: a bare config leaves no trainable parameter"
    before = {n: p.detach().clone() for n, p in trainable.items()}
    # Adam without weight decay moves exactly the parameters whose gradient is non-zero (by about lr each), so a
    # change means the loss reached the adapter, and no change cannot come from decay alone.
    optimizer = torch.optim.Adam(trainable.values(), lr=1e-3)
    try:
        out = model(input_ids=ids, labels=ids)
    except (ValueError, TypeError) as exc:
        assert names_the_method(spec, exc), f"{spec.name}: the error at the first forward does not name it: {exc}"
        return
    out.loss.backward()  # a loss that does not reach the adapter fails here, inside autograd: what the test forbids
    optimizer.step()
    changed = [n for n, p in trainable.items() if not torch.equal(p.detach(), before[n])]
    assert changed, f"{spec.name}: one training step with the bare config changed no adapter parameter"
