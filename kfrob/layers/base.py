"""Per-layer math: how a layer turns its inputs and output gradients into factor rows, and
its gradient into a matrix.

Every supported layer is viewed the same way. Its forward pass is a batched matrix product
``y[b, :, l] = W_k @ a[b, :, l]`` over ``blocks`` independent blocks ``k`` (the groups of a
grouped convolution; one block for everything else), where for sample ``b`` and location ``l``

* ``a`` is the input patch that location ``l`` sees (the whole input row for ``nn.Linear``,
  an unfolded receptive field for a convolution), with a trailing 1 appended when the layer
  has a bias, and
* ``W_k`` is the block's weight matrix of shape ``(out, in)`` with the bias as its last column.

A :class:`LayerMath` therefore only needs to know how to *unfold* its input into
``(samples, features, locations)`` and how to *flatten* its output (or output gradient) into
``(samples, channels, locations)``; everything else (rows, factors, gradient matrices) is
shared. ``nn.Linear`` treats every leading index of its ``(..., d_in)`` input as a sample and
has a single location; ``nn.Conv1d``/``nn.Conv2d`` have ``B`` samples and one location per
output position.

A convolution shares its weight over locations, and there are two ways to turn that into
factor rows (Eschenhagen et al. 2023, "Kronecker-factored approximate curvature for modern
neural network architectures"):

* ``"expand"`` (the default): every (sample, location) is a row, ``A = mean_{n,l} a aᵀ`` and
  ``G = mean_n Σ_l g gᵀ``, i.e. locations are treated like extra samples;
* ``"reduce"``: one row per sample, the mean patch ``â_n = mean_l a_{n,l}`` and the summed
  output gradient ``ĝ_n = Σ_l g_{n,l}``, so ``A = mean_n â âᵀ`` and ``G = mean_n ĝ ĝᵀ``. This
  is exact for a sample whose patches are all equal (its gradient is then ``ĝ âᵀ``) and costs
  ``locations`` times less to accumulate.

Both coincide for ``nn.Linear`` (one location).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["WEIGHT_SHARING", "LayerMath"]

WEIGHT_SHARING = ("expand", "reduce")


class LayerMath:
    """Shared per-layer math; subclasses implement :meth:`unfold_input` and
    :meth:`flatten_output` (and override the parameter layout where theirs differs).

    A ``LayerMath`` owns its module's parameters: nothing else in kfrob reads
    ``module.weight`` or ``module.bias``. :attr:`parameters` are the tensors that enter the
    matrix ``V = [W, b]``; :meth:`gradient_matrix` turns per-parameter tensors (gradients,
    steps) into ``V``-shaped matrices and :meth:`split` turns a matrix back.

    Shapes (``k = blocks``): factor rows are ``(k, rows, features)``; the domain factor
    ``A`` is ``(k, in, in)`` with ``in = in_features (+1 for the bias)``; the co-domain factor
    ``G`` is ``(k, out, out)``; a gradient matrix is ``(k, out, in)``.
    """

    #: whether the layer's data domain factor is diagonal whatever ``domain`` says (its
    #: input rows are one-hot, so ``E[a aᵀ]`` is diagonal: an embedding's token frequencies)
    diagonal_domain: bool = False
    #: the dimension of the layer's output that holds its features (``1`` for channels-first
    #: layers such as convolutions: their ``(B, C, ...)`` outputs have classes at dimension 1)
    output_feature_dim: int = -1

    @classmethod
    def refuses(cls, module: nn.Module) -> str | None:
        """Why this kind cannot serve ``module`` after all (``None`` when it can): the module
        then gets plain SGD with the reason."""
        return None

    def __init__(self, module: nn.Module, blocks: int = 1, weight_sharing: str = "expand") -> None:
        self.module = module
        self.blocks = blocks
        self.weight_sharing = weight_sharing
        bias = getattr(module, "bias", None)
        # a frozen bias is a constant shift: the weight's curvature then has no bias column
        self.has_bias = bias is not None and bias.requires_grad
        weight: Tensor = module.weight  # type: ignore[assignment]
        self.out_features = weight.shape[0] // blocks
        self.in_features = math.prod(weight.shape[1:]) + int(self.has_bias)

    # --- the two layer-specific pieces -------------------------------------------------
    def unfold_input(self, x: Tensor) -> Tensor:
        """Input ``x`` as ``(samples, blocks * features, locations)`` (no bias column)."""
        raise NotImplementedError

    def flatten_output(self, y: Tensor) -> Tensor:
        """Output-shaped ``y`` as ``(samples, blocks * out, locations)``."""
        raise NotImplementedError

    # --- shared ------------------------------------------------------------------------
    def _rows(self, t: Tensor) -> Tensor:
        """``(samples, blocks * f, locations)`` → ``(blocks, samples * locations, f)`` in
        :attr:`factor_dtype`."""
        samples, channels, locations = t.shape
        features = channels // self.blocks  # explicit: an empty batch has no -1 to infer
        t = t.reshape(samples, self.blocks, features, locations).permute(1, 0, 3, 2)
        return t.reshape(self.blocks, samples * locations, features).to(self.factor_dtype)

    def input_rows(self, x: Tensor) -> Tensor:
        """Domain rows ``a`` of shape ``(blocks, rows, in)``, bias column of ones last
        (``"reduce"``: one row per sample, the mean over locations)."""
        patches = self.unfold_input(x)
        if self.weight_sharing == "reduce":
            patches = patches.mean(-1, keepdim=True)
        rows = self._rows(patches)
        if self.has_bias:
            rows = F.pad(rows, (0, 1), value=1.0)
        return rows

    def check_call(self, x: Tensor, output: Tensor) -> str | None:
        """Why the hooks cannot record this call of the layer on input ``x`` with ``output``
        (``None`` when they can; the layer then falls back to a plain update with the reason)."""
        return None

    def input_square_sums(self, x: Tensor) -> tuple[Tensor, int]:
        """``(Σ_rows a², rows)``: the diagonal of ``Σ a aᵀ`` as ``(blocks, in)`` and the
        number of rows, what a diagonal domain factor adds. Layers with sparse rows (one-hot
        inputs) compute it without forming the rows."""
        rows = self.input_rows(x)
        return rows.square().sum(1), rows.shape[1]

    def input_sketch(self, x: Tensor, basis: Tensor) -> tuple[Tensor, Tensor, int]:
        """``(Σ_rows a (aQ)ᵀ, Σ_rows ‖a‖², rows)`` for a basis ``Q`` ``(blocks, in, r)``:
        what a sketched domain factor adds (``(blocks, in, r)``, ``(blocks,)``), from the
        rows here; layers that can form it without the rows (convolutions) do."""
        rows = self.input_rows(x)
        return rows.mT @ (rows @ basis), rows.square().sum((1, 2)), rows.shape[1]

    def output_rows(self, grad_output: Tensor) -> Tensor:
        """Co-domain rows ``g`` of shape ``(blocks, rows, out)`` from ``dL/dy``
        (``"reduce"``: one row per sample, the sum over locations)."""
        grads = self.flatten_output(grad_output)
        if self.weight_sharing == "reduce":
            grads = grads.sum(-1, keepdim=True)
        return self._rows(grads)

    def num_samples(self, t: Tensor) -> int:
        """Number of samples in an input or output tensor (what the loss averages over)."""
        return self.flatten_output(t).shape[0]

    def sample_dims(self, t: Tensor) -> int:
        """How many leading dimensions of an input or output tensor ``t`` index its samples
        (a loss mask over these dimensions selects samples; one for a batch of images, two
        for the tokens of ``(batch, sequence, features)`` under ``"expand"``)."""
        return 1

    def to_matrix(self, weight: Tensor, bias: Tensor | None) -> Tensor:
        """Weight-shaped (and bias-shaped) tensors as one ``(blocks, out, in)`` matrix."""
        mat = weight.reshape(self.blocks, self.out_features, -1)
        if self.has_bias:
            if bias is None:
                bias = weight.new_zeros(weight.shape[0])
            mat = torch.cat([mat, bias.reshape(self.blocks, self.out_features, 1)], dim=-1)
        return mat

    def from_matrix(self, mat: Tensor) -> tuple[Tensor, Tensor | None]:
        """Inverse of :meth:`to_matrix`: ``(weight_like, bias_like or None)``."""
        weight = self.weight
        if not self.has_bias:
            return mat.reshape(weight.shape), None
        bias_shape = self.module.bias.shape  # type: ignore[union-attr]
        return mat[..., :-1].reshape(weight.shape), mat[..., -1].reshape(bias_shape)

    # --- the layer's parameters ----------------------------------------------------------
    @property
    def weight(self) -> Tensor:
        return self.module.weight  # type: ignore[return-value]

    @property
    def bias(self) -> Tensor | None:
        """The bias, if it is part of the matrix (present and trainable at creation)."""
        return self.module.bias if self.has_bias else None  # type: ignore[return-value]

    @property
    def parameters(self) -> tuple[Tensor, ...]:
        """The tensors of the matrix ``V``: the weight, then the bias if it has one."""
        bias = self.bias
        return (self.weight,) if bias is None else (self.weight, bias)

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def factor_dtype(self) -> torch.dtype:
        """The dtype of the layer's curvature: the wider of float32 and the weight's dtype
        (float32 for half-precision layers, float64 for float64 ones)."""
        return torch.promote_types(torch.float32, self.weight.dtype)

    @property
    def trainable(self) -> bool:
        """Whether the weight is trained (a frozen weight is neither recorded nor refreshed)."""
        return self.weight.requires_grad

    @property
    def bias_changed(self) -> bool:
        """Whether the bias was frozen or unfrozen since this object was made."""
        bias = getattr(self.module, "bias", None)
        return self.has_bias != (bias is not None and bias.requires_grad)

    def describe(self) -> str:
        """The layer's kind and shapes, e.g. ``"Linear (4, 3) with bias"``, for comparing
        the models of several ranks."""
        shape = tuple(self.weight.shape)
        return f"{type(self.module).__name__} {shape} {'with' if self.has_bias else 'without'} bias"

    def covers(self, tensors: Mapping[Tensor, Tensor]) -> bool:
        """Whether ``tensors`` holds an entry for every parameter of the matrix."""
        return all(p in tensors for p in self.parameters)

    def gradient_matrix(self, tensors: Mapping[Tensor, Tensor]) -> Tensor | None:
        """The ``(blocks, out, in)`` matrix of per-parameter tensors (``tensors[weight]``,
        ``tensors[bias]``; a missing bias entry counts as zeros), or ``None`` without a
        weight entry. Sparse tensors are made dense."""
        weight = tensors.get(self.weight)
        if weight is None:
            return None
        bias = tensors.get(self.bias) if self.bias is not None else None
        return self.to_matrix(*(_dense(t) for t in (weight, bias)))  # type: ignore[arg-type]

    def split(self, matrix: Tensor) -> dict[Tensor, Tensor]:
        """A ``(blocks, out, in)`` matrix as ``{parameter: parameter-shaped tensor}``."""
        weight, bias = self.from_matrix(matrix)
        out = {self.weight: weight}
        if bias is not None and self.bias is not None:
            out[self.bias] = bias
        return out

    def matrix(self) -> Tensor:
        """The layer's parameters as one matrix ``[W, b]`` ``(blocks, out, in)``, with their
        graph (for penalties)."""
        return self.to_matrix(self.weight, self.bias)

    def weight_matrix(self) -> Tensor:
        """The weight alone as ``(blocks, out, in)`` (no bias column), with its graph."""
        return self.to_matrix(self.weight, None)[..., : self.in_features - int(self.has_bias)]

    def parameter_matrix(self) -> Tensor:
        """The layer's current parameters as one detached matrix ``[W, b]``."""
        return self.matrix().detach()


def _dense(t: Tensor | None) -> Tensor | None:
    return t.to_dense() if t is not None and t.is_sparse else t
