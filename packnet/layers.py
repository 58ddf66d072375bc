"""The layer types a pack shares between tasks beyond Linear and Conv2d, and the registry of every packable kind.

Each kind maps a plain module type to its packed twin and names the state-dict keys of the packed weight and of
the bias stored per task:

========================  ===============================  ==================  ============================
kind                      plain module                     packed              weight (shape)
========================  ===============================  ==================  ============================
``linear``                ``nn.Linear``                    ``PackedLinear``    ``weight [out, in]``
``conv1d``                ``nn.Conv1d``                    ``PackedConv1d``    ``weight [out, in/g, k]``
``conv2d``                ``nn.Conv2d``                    ``PackedConv2d``    ``weight [out, in/g, kh, kw]``
``transformers_conv1d``   transformers' ``Conv1D``         ``PackedTransposedLinear``  ``weight [in, out]``
``embedding``             ``nn.Embedding``                 ``PackedEmbedding`` ``weight [num, dim]``
``multihead_attention``   ``nn.MultiheadAttention``        ``PackedMultiheadAttention``  ``in_proj_weight [3E, E]``
========================  ===============================  ==================  ============================

A pack stores every weight in its plain module's own layout, so a task exports to the plain model as it is.
transformers is never imported here: its ``Conv1D`` is recognised by its class.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from packnet_kernels import masked_conv2d, masked_embedding, masked_linear
from packnet_kernels._checks import linear_rows

from .modules import PackedConv2d, PackedLinear, _PackedLayer, _spread, _TaskSelecting, spread_tasks

__all__ = [
    "KINDS",
    "LayerKind",
    "PackedConv1d",
    "PackedEmbedding",
    "PackedMultiheadAttention",
    "PackedTransposedLinear",
    "is_transformers_conv1d",
    "kind_of",
    "pack_layer",
    "packable_problem",
]


def is_transformers_conv1d(module: nn.Module) -> bool:
    """True for ``transformers.pytorch_utils.Conv1D`` (GPT-2's projections: ``y = x @ W + b``, ``W [in, out]``) and
    its subclasses, recognised without importing transformers."""
    return any(cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.") for cls in type(module).__mro__)


class PackedConv1d(_PackedLayer):
    """``nn.Conv1d`` for a pack, run by the conv2d kernel as a 2-D conv of height 1 (views, no copies).

    Shapes: ``weight``/``task_ids`` ``[out, in/groups, k]``, ``bias`` ``[num_tasks, out]``; input ``[N, C, L]`` or
    ``[C, L]``.
    """

    kind = "conv1d"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        num_tasks: int,
        stride: int = 1,
        padding: int | str = 0,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = True,
        *,
        device=None,
        dtype=None,
        backend: str = "auto",
    ):
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self._init_storage((out_channels, in_channels // groups, kernel_size), num_tasks, bias, device, dtype, backend)

    @classmethod
    def from_dense(
        cls,
        conv: nn.Conv1d,
        task_ids: torch.Tensor,
        num_tasks: int,
        biases: Sequence[torch.Tensor] | None = None,
        backend: str = "auto",
    ) -> PackedConv1d:
        """Pack ``conv``'s weight with ``task_ids``; each task gets ``biases[t-1]`` or else ``conv.bias``.

        Raises:
            ValueError: ``conv`` pads with a mode other than zeros.
        """
        problem = packable_problem(conv)
        if problem:
            raise ValueError(f"PackedConv1d: {problem}")
        padding = conv.padding if isinstance(conv.padding, str) else conv.padding[0]
        packed = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size[0],
            num_tasks,
            conv.stride[0],
            padding,
            conv.dilation[0],
            conv.groups,
            conv.bias is not None,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
            backend=backend,
        )
        if biases is None and conv.bias is not None:
            biases = [conv.bias.detach()] * num_tasks
        packed.load_packed(conv.weight.detach(), task_ids, biases)
        return packed

    def kernel_operands(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``[out, in/groups, 1, k]`` views of the weight and ids: the conv2d kernel's operands."""
        return self.weight.unsqueeze(2), self.task_ids.unsqueeze(2)

    def forward(self, x: torch.Tensor, task: int | torch.Tensor | None = None) -> torch.Tensor:
        """``x [N, C, L]`` (or ``[C, L]``) -> ``[N, out, L_out]``; ``task`` an int or a task tensor ``[N]``."""
        task = self._resolve_task(task)
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(0)
        if x.dim() != 3:
            raise ValueError(f"PackedConv1d: input must be [N, C, L] or [C, L], got shape {tuple(x.shape)}")
        if isinstance(task, torch.Tensor):
            x, task = spread_tasks(type(self).__name__, task, x, x.shape[0])
        bias, scale, shift = self._epilogue(task)
        weight, task_ids = self.kernel_operands()
        padding = self.padding if isinstance(self.padding, str) else (0, self.padding)
        y = masked_conv2d(
            x.unsqueeze(2),
            weight,
            task_ids,
            task,
            bias,
            (1, self.stride),
            padding,
            (1, self.dilation),
            self.groups,
            scale=scale,
            shift=shift,
            relu=self.relu,
            backend=self.backend,
            **self._kernel_tile_args(x),
        ).squeeze(2)
        return y.squeeze(0) if unbatched else y

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, num_tasks={self.num_tasks}, "
            f"bias={self.bias is not None}"
        )


class PackedTransposedLinear(_PackedLayer):
    """transformers' ``Conv1D`` for a pack: ``y = x @ where(task_ids in 1..t, W, 0) + bias[t]`` with ``W [in, out]``.

    The weight and ids keep ``Conv1D``'s ``[in, out]`` layout (its state-dict layout, so a task exports to the plain
    model as it is); the linear kernel reads their transposed ``[out, in]`` views, which it takes with any strides, so
    no transposed copy is ever made.
    """

    kind = "transformers_conv1d"

    def __init__(
        self, in_features: int, out_features: int, num_tasks: int, bias: bool = True, *, device=None, dtype=None,
        backend: str = "auto",
    ):  # fmt: skip
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_storage((in_features, out_features), num_tasks, bias, device, dtype, backend, out_features)

    @classmethod
    def from_dense(
        cls,
        conv1d: nn.Module,
        task_ids: torch.Tensor,
        num_tasks: int,
        biases: Sequence[torch.Tensor] | None = None,
        backend: str = "auto",
    ) -> PackedTransposedLinear:
        """Pack a transformers ``Conv1D`` (``weight [in, out]``) with ``task_ids [in, out]``."""
        in_features, out_features = conv1d.weight.shape
        has_bias = getattr(conv1d, "bias", None) is not None
        packed = cls(
            in_features,
            out_features,
            num_tasks,
            has_bias,
            device=conv1d.weight.device,
            dtype=conv1d.weight.dtype,
            backend=backend,
        )
        if biases is None and has_bias:
            biases = [conv1d.bias.detach()] * num_tasks
        packed.load_packed(conv1d.weight.detach(), task_ids, biases)
        return packed

    def bias_features(self) -> int:
        return self.out_features

    def kernel_operands(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``[out, in]`` transposed views of the ``[in, out]`` weight and ids."""
        return self.weight.t(), self.task_ids.t()

    def forward(self, x: torch.Tensor, task: int | torch.Tensor | None = None) -> torch.Tensor:
        """``x [..., in]`` -> ``[..., out]``; ``task`` as for :class:`packnet.PackedLinear`."""
        task = self._resolve_task(task)
        if isinstance(task, torch.Tensor):
            x, task = spread_tasks(type(self).__name__, task, x, linear_rows(x))
        bias, scale, shift = self._epilogue(task)
        weight, task_ids = self.kernel_operands()
        return masked_linear(
            x,
            weight,
            task_ids,
            task,
            bias,
            scale=scale,
            shift=shift,
            relu=self.relu,
            backend=self.backend,
            **self._kernel_tile_args(x),
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, num_tasks={self.num_tasks}, "
            f"bias={self.bias is not None}, weight_layout=[in, out]"
        )


class PackedEmbedding(_PackedLayer):
    """``nn.Embedding`` for a pack: row ``i`` of task ``t`` is ``where(task_ids[i] in 1..t, W[i], 0)``.

    Shapes: ``weight``/``task_ids`` ``[num_embeddings, dim]``; input integer indices ``[...]``, output
    ``[..., dim]``. The lookup (:func:`packnet_kernels.masked_embedding`) gathers only the rows looked up and their
    ids. ``padding_idx`` only changes training, so it is kept for the record; ``max_norm`` (which rewrites the
    table during the forward) cannot be packed.
    """

    kind = "embedding"

    def __init__(
        self, num_embeddings: int, embedding_dim: int, num_tasks: int, padding_idx: int | None = None, *,
        device=None, dtype=None, backend: str = "auto",
    ):  # fmt: skip
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self._init_storage((num_embeddings, embedding_dim), num_tasks, False, device, dtype, backend)

    @classmethod
    def from_dense(
        cls,
        embedding: nn.Embedding,
        task_ids: torch.Tensor,
        num_tasks: int,
        biases: Sequence[torch.Tensor] | None = None,
        backend: str = "auto",
    ) -> PackedEmbedding:
        """Pack ``embedding``'s table with ``task_ids``.

        Raises:
            ValueError: ``embedding`` has ``max_norm`` set.
        """
        problem = packable_problem(embedding)
        if problem:
            raise ValueError(f"PackedEmbedding: {problem}")
        packed = cls(
            embedding.num_embeddings,
            embedding.embedding_dim,
            num_tasks,
            embedding.padding_idx,
            device=embedding.weight.device,
            dtype=embedding.weight.dtype,
            backend=backend,
        )
        packed.load_packed(embedding.weight.detach(), task_ids)
        return packed

    def forward(self, indices: torch.Tensor, task: int | torch.Tensor | None = None) -> torch.Tensor:
        """``indices [...]`` -> ``[..., dim]``; ``task`` an int or a task tensor with one entry per sample
        (``indices``' dimension 0; a ``[1, S]`` input meets ``B`` tasks expanded) or per index."""
        task = self._resolve_task(task)
        if isinstance(task, torch.Tensor):
            indices, task = spread_tasks(type(self).__name__, task, indices, indices.numel())
        return masked_embedding(indices, self.weight, self.task_ids, task, backend=self.backend)

    def extra_repr(self) -> str:
        padding = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        return f"{self.num_embeddings}, {self.embedding_dim}{padding}, num_tasks={self.num_tasks}"


def _additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True = may not attend) as 0/-inf in ``dtype``; a float mask as it is (added to the scores)."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    if not mask.is_floating_point():
        raise TypeError(f"PackedMultiheadAttention: a mask must be bool or floating point, got {mask.dtype}")
    return mask.to(dtype)


class PackedMultiheadAttention(_PackedLayer):
    """``nn.MultiheadAttention`` for a pack, built on ``F.scaled_dot_product_attention``.

    The input projection (``in_proj_weight [3E, E]``) is this layer's packed weight and ``in_proj_bias`` its per-task
    bias; ``out_proj`` is a submodule (a :class:`packnet.PackedLinear` when packed too). The forward takes
    ``nn.MultiheadAttention``'s arguments and returns ``(output, weights)``: ``weights`` averaged over heads (or per
    head) when ``need_weights``, else None. ``nn.MultiheadAttention`` reads ``out_proj.weight`` itself, so it cannot
    run with a packed ``out_proj``: it is replaced whole. Supports one embedding size for query, key and value
    (``kdim = vdim = embed_dim``), no ``bias_k``/``bias_v`` and no ``add_zero_attn`` (what
    :func:`packable_problem` checks). Outputs are close to, not bitwise, those of ``nn.MultiheadAttention``, whose
    fused paths compute in another order.
    """

    kind = "multihead_attention"
    weight_key = "in_proj_weight"
    bias_key = "in_proj_bias"

    def __init__(
        self, embed_dim: int, num_heads: int, num_tasks: int, bias: bool = True, batch_first: bool = False,
        dropout: float = 0.0, *, device=None, dtype=None, backend: str = "auto",
    ):  # fmt: skip
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.batch_first, self.dropout = batch_first, dropout
        self._init_storage((3 * embed_dim, embed_dim), num_tasks, bias, device, dtype, backend)
        self.out_proj: nn.Module = nn.Linear(embed_dim, embed_dim, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_dense(
        cls,
        attention: nn.MultiheadAttention,
        task_ids: torch.Tensor,
        num_tasks: int,
        biases: Sequence[torch.Tensor] | None = None,
        backend: str = "auto",
    ) -> PackedMultiheadAttention:
        """Pack ``attention``'s ``in_proj_weight`` with ``task_ids``; ``attention.out_proj`` becomes this layer's
        ``out_proj`` as it is (pack it separately).

        Raises:
            ValueError: an attention :func:`packable_problem` refuses.
        """
        problem = packable_problem(attention)
        if problem:
            raise ValueError(f"PackedMultiheadAttention: {problem}")
        has_bias = attention.in_proj_bias is not None
        packed = cls(
            attention.embed_dim,
            attention.num_heads,
            num_tasks,
            has_bias,
            attention.batch_first,
            attention.dropout,
            device=attention.in_proj_weight.device,
            dtype=attention.in_proj_weight.dtype,
            backend=backend,
        )
        if biases is None and has_bias:
            biases = [attention.in_proj_bias.detach()] * num_tasks
        packed.load_packed(attention.in_proj_weight.detach(), task_ids, biases)
        packed.out_proj = attention.out_proj
        return packed

    def _project(self, x: torch.Tensor, part: slice | None, task, bias) -> torch.Tensor:
        """``x [B, L, E]`` through the packed input projection (rows ``part`` of it, or all three)."""
        weight, task_ids = self.weight, self.task_ids
        tile_args = self._kernel_tile_args(x) if part is None else {}
        if part is not None:
            weight, task_ids = weight[part], task_ids[part]
            bias = None if bias is None else bias[..., part]
        if isinstance(task, torch.Tensor):
            task = _spread(task, x.shape[1])
        return masked_linear(x, weight, task_ids, task, bias, backend=self.backend, **tile_args)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        task: int | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As ``nn.MultiheadAttention.forward``; ``task`` an int or a task tensor with one task per sample (the
        batch dimension of the inputs, whichever ``batch_first`` says).

        Raises:
            RuntimeError: ``is_causal`` without ``attn_mask`` (as ``nn.MultiheadAttention``).
            ValueError: a task tensor whose length is not the batch size.
        """
        task = self._resolve_task(task)
        if is_causal and attn_mask is None:
            raise RuntimeError("PackedMultiheadAttention: is_causal=True is a hint and needs attn_mask, as in torch")
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            # Batch first and dense: the projections then see the same rows whether a batch is mixed or not.
            if query is key and key is value:
                query = key = value = query.transpose(0, 1).contiguous()
            else:
                query, key, value = (tensor.transpose(0, 1).contiguous() for tensor in (query, key, value))
        batch, length, _ = query.shape
        source = key.shape[1]
        if isinstance(task, torch.Tensor) and task.shape[0] != batch:
            raise ValueError(f"PackedMultiheadAttention: {task.shape[0]} tasks for a batch of {batch} samples")
        bias = self._epilogue(task)[0]
        embed = self.embed_dim
        if query is key and key is value:
            q, k, v = self._project(query, None, task, bias).chunk(3, dim=-1)
        else:
            q = self._project(query, slice(0, embed), task, bias)
            k = self._project(key, slice(embed, 2 * embed), task, bias)
            v = self._project(value, slice(2 * embed, 3 * embed), task, bias)
        heads, head_dim = self.num_heads, self.head_dim
        q = q.reshape(batch, length, heads, head_dim).transpose(1, 2)
        k = k.reshape(batch, source, heads, head_dim).transpose(1, 2)
        v = v.reshape(batch, source, heads, head_dim).transpose(1, 2)
        mask = None
        if attn_mask is not None:
            mask = _additive_mask(attn_mask, q.dtype)
            mask = mask.view(1, 1, length, source) if mask.dim() == 2 else mask.view(batch, heads, length, source)
        if key_padding_mask is not None:
            padding = _additive_mask(key_padding_mask, q.dtype).view(batch, 1, 1, source)
            mask = padding if mask is None else mask + padding
        dropout = self.dropout if self.training else 0.0
        if need_weights:
            scores = q @ k.transpose(-2, -1) * (1.0 / math.sqrt(head_dim))
            if mask is not None:
                scores = scores + mask
            weights = torch.softmax(scores, dim=-1)
            attended = F.dropout(weights, dropout, self.training) @ v
            weights = weights.mean(dim=1) if average_attn_weights else weights
        else:
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
            weights = None
        attended = attended.transpose(1, 2).reshape(batch, length, embed)
        if isinstance(self.out_proj, _TaskSelecting):
            output = self.out_proj(attended, task=task)
        else:
            output = self.out_proj(attended)
        if unbatched:
            return output.squeeze(0), None if weights is None else weights.squeeze(0)
        if not self.batch_first:
            output = output.transpose(0, 1)
        return output, weights

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}, "
            f"num_tasks={self.num_tasks}, bias={self.bias is not None}"
        )


@dataclass(frozen=True)
class LayerKind:
    """A packable layer type: how to recognise the plain module, its packed twin, its weight's and its per-task
    bias's attribute names, and the weight's number of dimensions."""

    name: str
    packed: type[_PackedLayer]
    weight_key: str
    bias_key: str
    weight_dims: int


KINDS: dict[str, LayerKind] = {
    kind.name: kind
    for kind in (
        LayerKind("linear", PackedLinear, "weight", "bias", 2),
        LayerKind("conv1d", PackedConv1d, "weight", "bias", 3),
        LayerKind("conv2d", PackedConv2d, "weight", "bias", 4),
        LayerKind("transformers_conv1d", PackedTransposedLinear, "weight", "bias", 2),
        LayerKind("embedding", PackedEmbedding, "weight", "bias", 2),
        LayerKind("multihead_attention", PackedMultiheadAttention, "in_proj_weight", "in_proj_bias", 2),
    )
}


def kind_of(module: nn.Module) -> str | None:
    """The kind of a plain module a pack can share (see the module docstring), or None."""
    if is_transformers_conv1d(module):
        return "transformers_conv1d"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv1d):
        return "conv1d"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.MultiheadAttention):
        return "multihead_attention"
    return None


def packable_problem(module: nn.Module) -> str | None:
    """Why a module of a packable kind cannot be packed (one line), or None when it can."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r} is not supported (only 'zeros')"
    if isinstance(module, nn.Embedding) and module.max_norm is not None:
        return "max_norm renormalises the table during the forward; a shared table cannot be rewritten per call"
    if isinstance(module, nn.MultiheadAttention):
        if not module._qkv_same_embed_dim or module.in_proj_weight is None:
            return "kdim/vdim differ from embed_dim (separate q/k/v weights); only one in_proj_weight is supported"
        if module.bias_k is not None or module.add_zero_attn:
            return "add_bias_kv and add_zero_attn are not supported"
    return None


def pack_layer(
    kind: str,
    module: nn.Module,
    task_ids: torch.Tensor,
    num_tasks: int,
    biases: Sequence[torch.Tensor] | None = None,
    backend: str = "auto",
) -> _PackedLayer:
    """The packed twin of the plain ``module`` of ``kind`` (its weight with ``task_ids``, ``biases`` per task)."""
    return KINDS[kind].packed.from_dense(module, task_ids, num_tasks, biases, backend=backend)
