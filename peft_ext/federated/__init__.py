"""Federated sparse LoRA: FLASC (Kuo et al., arXiv 2406.05233; CELLM, arXiv 2407.20557, is the same method) on
Flower. Pure functions in ``flasc``; the Flower Strategy / ClientApp / ServerApp in ``flower`` (imports ``flwr``, the
``federated`` extra); recipes in ``recipe`` (``run_federated_recipe``, behind ``peft-ext federate``)."""

from .flasc import (
    FlascConfig,
    FlascServer,
    SparsePayload,
    UpdateRejected,
    apply_mask,
    check_density,
    client_delta,
    client_update,
    decode,
    density_at,
    encode,
    run_local,
    sparsify_topk,
    topk_mask,
    validate_payload,
)
from .recipe import (
    FederatedRecipe,
    dirichlet_split,
    load_federated_recipe,
    plot_accuracy_vs_bytes,
    run_federated_recipe,
)

__all__ = [
    "FederatedRecipe",
    "FlascConfig",
    "FlascServer",
    "SparsePayload",
    "UpdateRejected",
    "apply_mask",
    "check_density",
    "client_delta",
    "client_update",
    "decode",
    "density_at",
    "dirichlet_split",
    "encode",
    "load_federated_recipe",
    "plot_accuracy_vs_bytes",
    "run_federated_recipe",
    "run_local",
    "sparsify_topk",
    "topk_mask",
    "validate_payload",
]
