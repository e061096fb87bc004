"""``nn.Embedding``: a linear layer on one-hot inputs.

Looking up row ``i`` of the weight ``E`` ``(num_embeddings, dim)`` is the product
``y = Eᵀ e_i`` with the one-hot vector ``e_i``, so an embedding is a linear map from
``R^{num_embeddings}`` to ``R^{dim}`` with the matrix ``V = Eᵀ`` ``(dim, num_embeddings)``:

* its domain factor ``A = E[e_i e_iᵀ]`` is the diagonal of token frequencies (the mean over
  rows of the one-hot vectors' squares), held as a vector of ``num_embeddings`` numbers and
  counted without forming one-hot rows;
* its co-domain factor ``G`` is the dense second moment of the output gradients ``g``
  ``(dim, dim)``, as for ``nn.Linear``.

Every index of the ``(...)`` index tensor is a sample with one location (the tokens of a
sequence are samples, as for ``nn.Linear`` on ``(batch, sequence, features)``), whatever the
weight-sharing option says. The preconditioned step ``G⁻¹ ∇V A⁻¹`` scales each row of ``E``
by its token's damped frequency: rare tokens are not starved of updates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kfrob.layers.base import LayerMath
from kfrob.layers.registry import register

__all__ = ["EmbeddingMath"]


class EmbeddingMath(LayerMath):
    """``nn.Embedding`` as a linear layer ``(dim, num_embeddings)`` on one-hot inputs, with a
    diagonal domain factor."""

    diagonal_domain = True

    @classmethod
    def refuses(cls, module: nn.Module) -> str | None:
        if getattr(module, "sparse", False):
            return "sparse=True: its sparse gradients are kept sparse, with plain SGD"
        return None

    def __init__(self, module: nn.Embedding, weight_sharing: str = "expand") -> None:
        super().__init__(module)
        self.num_embeddings, self.out_features = module.weight.shape
        self.in_features = self.num_embeddings

    def unfold_input(self, x: Tensor) -> Tensor:
        one_hot = F.one_hot(x.reshape(-1), self.num_embeddings)
        return one_hot.to(self.factor_dtype).unsqueeze(-1)

    def input_square_sums(self, x: Tensor) -> tuple[Tensor, int]:
        indices = x.reshape(-1)
        counts = torch.zeros(self.num_embeddings, device=x.device, dtype=self.factor_dtype)
        counts.index_add_(0, indices, torch.ones_like(indices, dtype=counts.dtype))
        return counts.unsqueeze(0), indices.numel()

    def flatten_output(self, y: Tensor) -> Tensor:
        return y.reshape(-1, self.out_features, 1)

    def num_samples(self, t: Tensor) -> int:
        # an index tensor (...) or an output (..., dim): every index is a sample
        return t.numel() if not t.is_floating_point() else t.numel() // self.out_features

    def sample_dims(self, t: Tensor) -> int:
        return t.dim() if not t.is_floating_point() else t.dim() - 1

    def to_matrix(self, weight: Tensor, bias: Tensor | None) -> Tensor:
        return weight.mT.unsqueeze(0)

    def from_matrix(self, mat: Tensor) -> tuple[Tensor, Tensor | None]:
        return mat.squeeze(0).mT, None


register(nn.Embedding, EmbeddingMath)
