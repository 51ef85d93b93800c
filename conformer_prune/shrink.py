"""Shrink: remove closed units physically, save and reload compact models, export for SpeechBrain.

    conformer-prune shrink results/<name>/<seed>/ --out compact/<name>   # a training run folder
    conformer-prune shrink path/to/CKPT+... --out DIR                    # or one checkpoint folder

As in DPHuBERT, each prunable module type has one function that removes its closed units and
returns the new module with its widths (`shrink_ffn`, `shrink_attention`, `shrink_conv`);
`shrink_modules` collects the widths into a JSON-able dict. A compact model is rebuilt from
`arch.json` alone: `build_asr_modules(**arch)`, then `apply_widths` swaps in compact modules of the
saved widths, then the weights load strictly. Design and formulas: docs/PRUNING.md.
"""

import inspect
import json
import math
import shutil
import warnings
from pathlib import Path

import torch
from ruamel.yaml import YAML
from ruamel.yaml.constructor import SafeConstructor
from speechbrain.lobes.models.transformer.Conformer import ConvolutionModule
from speechbrain.nnet.activations import Swish
from speechbrain.nnet.attention import PositionalwiseFeedForward, RelPosMHAXL
from speechbrain.utils.checkpoints import Checkpointer
from torch import nn
from torch.nn import functional as F

from conformer_prune.errors import InputError, gist
from conformer_prune.gated_conformer import (
    attention_mask_4d,
    gate_keep,
    insert_gates,
    is_self_attention,
    relpos_attention,
    set_threshold,
)
from conformer_prune.model import (
    build_asr_modules,
    count_params,
    encode_sparse,
    load_weights,
    param_state,
)
from conformer_prune.lm import LM_INFO, LM_WEIGHTS, check_lm_folder, check_lm_tokens
from conformer_prune.sites import MODULE_PATHS, check_keep, encoder_layers, module_keep

# -------------------------------------------------------------------------- compact modules


def _quiet(build):
    """Builds modules that may have zero-sized weights (a fully pruned site) without torch's
    'Initializing zero-element tensors is a no-op' warnings."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        return build()


class PhantomLayerNorm(nn.Module):
    """LayerNorm over the kept channels of a layer whose other channels hold constants.

    The pruned channels of the gated convolution module are constant (their depthwise bias); they
    still enter the statistics of the original LayerNorm over all `total` channels. This module
    adds them back ("phantom" constants) with the original channel count, which is exact:
    mean = (sum_kept x + sum_phantom c) / total,
    var = (sum_kept (x - mean)^2 + sum_phantom (c - mean)^2) / total.
    """

    def __init__(self, channels, total, eps=1e-5):
        super().__init__()
        self.total = total
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.phantom = nn.Parameter(torch.zeros(total - channels))

    def forward(self, x):
        mean = (x.sum(-1, keepdim=True) + self.phantom.sum()) / self.total
        squares = (x - mean).pow(2).sum(-1, keepdim=True)
        squares = squares + (self.phantom - mean).pow(2).sum(-1, keepdim=True)
        return (x - mean) / torch.sqrt(squares / self.total + self.eps) * self.weight + self.bias

    def extra_repr(self):
        return f"channels={self.weight.numel()}, total={self.total}, eps={self.eps}"


class CompactConvolutionModule(ConvolutionModule):
    """SpeechBrain's convolution module with `channels` depthwise channels out of `input_size`.

    Same submodules and forward as ConvolutionModule (so Dynamic Chunk Convolution works too),
    with a PhantomLayerNorm after the depthwise convolution. With no channel left the module's
    output is the bias of its last Linear: only that bias is kept.
    """

    def __init__(
        self,
        input_size,
        channels,
        kernel_size=31,
        activation=Swish,
        dropout=0.0,
        causal=False,
        dilation=1,
        eps=1e-5,
    ):
        nn.Module.__init__(self)
        self.channels = channels
        self.kernel_size = kernel_size
        self.causal = causal
        self.dilation = dilation
        # SpeechBrain's padding rule.
        span = (kernel_size - 1) * 2 ** (dilation - 1)
        self.padding = span if causal else span // 2
        if channels == 0:
            self.bias = nn.Parameter(torch.zeros(input_size))
            self.dropout = nn.Dropout(dropout)
            return
        self.layer_norm = nn.LayerNorm(input_size)
        self.bottleneck = nn.Sequential(nn.Conv1d(input_size, 2 * channels, 1), nn.GLU(dim=1))
        self.conv = nn.Conv1d(
            channels,
            channels,
            kernel_size,
            padding=self.padding,
            dilation=dilation,
            groups=channels,
        )
        self.after_conv = nn.Sequential(
            PhantomLayerNorm(channels, input_size, eps),
            activation(),
            nn.Linear(channels, input_size),
            nn.Dropout(dropout),
        )

    def forward(self, x, mask=None, dynchunktrain_config=None):
        if self.channels == 0:
            out = self.dropout(self.bias.expand(*x.shape[:-1], -1))
            return out if mask is None else out.masked_fill(mask, 0.0)
        if self.training or torch.is_grad_enabled() or dynchunktrain_config is not None:
            return super().forward(x, mask, dynchunktrain_config)
        return self._inference_forward(x, mask)

    def _inference_forward(self, x, mask):
        """ConvolutionModule's function with the kernel-1 bottleneck as a matrix product on
        the (batch, time, channels) input, before the transpose: SpeechBrain transposes the
        LayerNorm output and runs a Conv1d on it, which at batch 16 with all 144 channels took
        8.9 ms against 6.8 ms this way (150 frames, one thread; equal at 60 channels and at
        batch 1)."""
        bottleneck = self.bottleneck[0]
        out = F.linear(self.layer_norm(x), bottleneck.weight.squeeze(-1), bottleneck.bias)
        out = self.conv(F.glu(out, dim=-1).transpose(1, 2))
        if self.causal:
            out = out[..., : -self.padding]  # SpeechBrain's chomp
        out = self.after_conv(out.transpose(1, 2))
        if mask is not None:
            out.masked_fill_(mask, 0.0)
        return out


def relative_shift_view(positions):
    """RelPosMHAXL.rel_shift without its copies: the (batch, heads, time, time) view of the
    position scores (batch, heads, time, 2 * time - 1) whose element (i, j) is element
    (i, time - 1 - i + j), read with strides (row stride 2 * time - 2) from the same memory."""
    positions = positions.contiguous()
    batch, heads, time, span = positions.shape
    return positions.as_strided(
        (batch, heads, time, time),
        (positions.stride(0), positions.stride(1), span - 1, 1),
        positions.storage_offset() + time - 1,
    )


class RaggedRelPosMHAXL(RelPosMHAXL):
    """RelPosMHAXL whose heads have their own query/key width and value width.

    Parameters: `in_proj_weight` stacks the query rows of all heads, then the key rows, then the
    value rows (head after head inside each block); `pos_bias_u`, `pos_bias_v` and `linear_pos`
    have one entry/row per query dimension; `out_proj` one column per value dimension. Heads with
    no value dimension are gone. The score scale stays SpeechBrain's 1 / sqrt(embed_dim) of the
    original width, so the compact scores equal the gated ones.
    """

    def __init__(
        self, embed_dim, num_heads, query_widths, value_widths, dropout=0.0, mask_pos_future=False
    ):
        nn.Module.__init__(self)
        if len(query_widths) != num_heads or len(value_widths) != num_heads:
            raise ValueError("RaggedRelPosMHAXL: one query and one value width per head")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.query_widths = list(query_widths)
        self.value_widths = list(value_widths)
        self.dropout = dropout
        self.mask_pos_future = mask_pos_future
        self.vbias = None
        self.scale = embed_dim**-0.5
        self.attn_fill_value = -float("inf")
        queries, values = sum(query_widths), sum(value_widths)
        self.in_proj_weight = nn.Parameter(torch.zeros(2 * queries + values, embed_dim))
        self.pos_bias_u = nn.Parameter(torch.zeros(queries))
        self.pos_bias_v = nn.Parameter(torch.zeros(queries))
        self.dropout_att = nn.Dropout(dropout)
        self.linear_pos = _quiet(lambda: nn.Linear(embed_dim, queries, bias=False))
        self.out_proj = _quiet(lambda: nn.Linear(values, embed_dim))
        self.reset_parameters()

    def reset_parameters(self):
        """SpeechBrain's initialisation of the dense module, at the compact shapes: what a
        compact model trained from scratch starts from (the shrink overwrites every value).
        Left at zero, queries and keys would get no gradient and never learn."""
        # xavier_uniform_ of the dense (3 * embed_dim, embed_dim) in_proj_weight
        bound = math.sqrt(6.0 / (4 * self.embed_dim))
        nn.init.uniform_(self.in_proj_weight, -bound, bound)
        # xavier_uniform_ of the dense (head_dim, heads) positional biases
        bound = math.sqrt(6.0 / (self.embed_dim // self.num_heads + self.num_heads))
        nn.init.uniform_(self.pos_bias_u, -bound, bound)
        nn.init.uniform_(self.pos_bias_v, -bound, bound)

    def forward(
        self,
        query,
        key,
        value,
        pos_embs,
        key_padding_mask=None,
        attn_mask=None,
        return_attn_weights=True,
    ):
        if not is_self_attention(query, key, value):
            raise NotImplementedError("RaggedRelPosMHAXL: self-attention only")
        bsz, qlen = query.shape[:2]
        alive = self._alive_heads()
        if not alive:
            out = self.out_proj(query.new_zeros(bsz, qlen, 0))
            return out if not return_attn_weights else (out, None)
        # Why pack: one batched attention over all heads, each padded to the widest, is much
        # faster than a loop over heads. The padding is done on the weights (zero rows and
        # columns, rebuilt each call so that gradients still reach the stored parameters),
        # which is cheaper than padding the activations: zero query/key dimensions add exactly
        # 0 to the scores, zero value dimensions meet zero out_proj columns.
        in_w, bias_u, bias_v, pos_w, out_w, width_q, width_v = self._packed_weights()
        heads = len(alive)
        queries, values = heads * width_q, heads * width_v
        q, k, v = F.linear(query, in_w).split([queries, queries, values], dim=-1)

        def by_head(x, width):  # (batch, time, heads * width) -> (batch, heads, time, width)
            return x.view(*x.shape[:2], heads, width).transpose(1, 2)

        q_u, q_v = by_head(q + bias_u, width_q), by_head(q + bias_v, width_q)
        p_k = by_head(F.linear(pos_embs, pos_w), width_q)
        attn_mask = attention_mask_4d(attn_mask, self.num_heads, qlen, key.shape[1])
        if attn_mask is not None and attn_mask.shape[1] > 1:
            attn_mask = attn_mask[:, self._packed_heads()]
        k, v = by_head(k, width_q), by_head(v, width_v)
        if self._fast_path_applies(attn_mask, p_k, qlen, key.shape[1]):
            context, weights = self._inference_attention(
                q_u, q_v, k, p_k, v, key_padding_mask), None
        else:
            context, weights = relpos_attention(
                self, q_u, q_v, k, p_k, v, key_padding_mask, attn_mask)
        context = context.transpose(1, 2).reshape(bsz, qlen, values)
        out = F.linear(context, out_w, self.out_proj.bias)
        if not return_attn_weights:
            return out
        return out, weights

    def _fast_path_applies(self, attn_mask, p_k, qlen, klen):
        """Inference without an attention mask, over 2 * time - 1 relative positions (what
        RelPosEncXL gives): `_inference_attention` computes the same function for less."""
        return (not self.training and not torch.is_grad_enabled() and attn_mask is None
                and not self.mask_pos_future and qlen == klen and p_k.shape[2] == 2 * klen - 1)

    def _inference_attention(self, q_u, q_v, k, p_k, v, key_padding_mask):
        """The context of every live head (packed with the heads that have query dimensions
        first), computed for less than `relpos_attention` does for the same values:
        - heads with values but no query dimension have all scores 0, so their softmax is
          uniform over the real keys and their context the mean of their values over time:
          O(time) instead of O(time^2);
        - the relative shift of the position scores is a strided view of them (element (i, j)
          of the shifted matrix is element (i, time - 1 - i + j) of the unshifted one), added
          in place to the content scores: no padded copy as in RelPosMHAXL.rel_shift;
        - the padding mask is applied in place, and only when a key is padded; a row cannot be
          fully masked (every utterance has a frame), so the softmax leaves no NaN to clear.
        Scores, softmax and context equal relpos_attention's to float rounding
        (tests/test_shrink.py)."""
        scored = self._scored_heads()
        parts = []
        if scored:
            scores = torch.matmul(q_u[:, :scored] * self.scale, k[:, :scored].transpose(-1, -2))
            positions = torch.matmul(q_v[:, :scored] * self.scale,
                                     p_k[:, :scored].transpose(-1, -2))
            scores += relative_shift_view(positions)
            if key_padding_mask is not None and key_padding_mask.any():
                padding = key_padding_mask.view(key_padding_mask.shape[0], 1, 1, -1)
                scores.masked_fill_(padding, self.attn_fill_value)
            parts.append(torch.matmul(torch.softmax(scores, dim=-1), v[:, :scored]))
        if scored < v.shape[1]:
            values = v[:, scored:]
            if key_padding_mask is None:
                mean = values.mean(dim=2, keepdim=True)
            else:
                real = (~key_padding_mask).to(values.dtype)[:, None, :, None]
                mean = (values * real).sum(dim=2, keepdim=True) / real.sum(dim=2, keepdim=True)
            parts.append(mean.expand(-1, -1, v.shape[2], -1))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _packed_weights(self):
        """The parameters laid out head by head, each head padded to the widest live head:
        (in_proj weight, pos_bias_u, pos_bias_v, linear_pos weight, out_proj weight, query
        width, value width). Without autograd (inference) the packing is kept until a
        parameter changes (its storage or version): it is 5-10% of a compact encoder pass."""
        if torch.is_grad_enabled():
            return self._pack()
        key = tuple((p.data_ptr(), p._version) for p in self.parameters())
        cached = self.__dict__.get("_packed_cache")
        if cached is None or cached[0] != key:
            cached = (key, self._pack())
            self.__dict__["_packed_cache"] = cached
        return cached[1]

    def _pack(self):
        q_src, q_dst, v_src, v_dst, width_q, width_v = self._padding_indices(
            self.in_proj_weight.device)
        queries = sum(self.query_widths)
        w_q, w_k, w_v = self.in_proj_weight.split(
            [queries, queries, sum(self.value_widths)], dim=0)

        def pack(x, src, dst, rows, dim=0):
            picked = x if src is None else x.index_select(dim, src)
            shape = list(x.shape)
            shape[dim] = rows
            return x.new_zeros(shape).index_copy(dim, dst, picked)

        heads = len(self._alive_heads())
        rows_q, rows_v = heads * width_q, heads * width_v
        in_w = torch.cat([pack(w_q, q_src, q_dst, rows_q), pack(w_k, q_src, q_dst, rows_q),
                          pack(w_v, v_src, v_dst, rows_v)])
        return (in_w, pack(self.pos_bias_u, q_src, q_dst, rows_q),
                pack(self.pos_bias_v, q_src, q_dst, rows_q),
                pack(self.linear_pos.weight, q_src, q_dst, rows_q),
                pack(self.out_proj.weight, v_src, v_dst, rows_v, dim=1), width_q, width_v)

    def _alive_heads(self):
        """Heads that still have a value dimension (the others contribute nothing)."""
        return [h for h, width in enumerate(self.value_widths) if width > 0]

    def _packed_heads(self):
        """The live heads in their packed order: those with query dimensions first, so that
        `_inference_attention` takes them and the value-only heads as two slices."""
        alive = self._alive_heads()
        return ([h for h in alive if self.query_widths[h] > 0]
                + [h for h in alive if self.query_widths[h] == 0])

    def _scored_heads(self):
        """How many of the packed heads have query dimensions (they come first)."""
        return sum(1 for h in self._alive_heads() if self.query_widths[h] > 0)

    def _padding_indices(self, device):
        """Where each kept query and value dimension of a live head goes in the padded layout
        (heads side by side in `_packed_heads` order, each as wide as the widest): (q_src,
        q_dst, v_src, v_dst, query width, value width), cached."""
        cache = self.__dict__.setdefault("_index_cache", {})
        if device not in cache:
            cache[device] = self._make_padding_indices(device)
        return cache[device]

    def _make_padding_indices(self, device):
        packed = self._packed_heads()
        width_q = max(self.query_widths[h] for h in packed)
        width_v = max(self.value_widths[h] for h in packed)

        def source_and_slots(widths, width):
            """Stored rows of each packed head, and where they go in the padded layout."""
            starts = [sum(widths[:h]) for h in range(self.num_heads)]
            source = [starts[h] + j for h in packed for j in range(widths[h])]
            slots = [slot * width + j for slot, h in enumerate(packed) for j in range(widths[h])]
            return source, slots

        indices = (*source_and_slots(self.query_widths, width_q),
                   *source_and_slots(self.value_widths, width_v))
        tensors = (torch.tensor(i, dtype=torch.long, device=device) for i in indices)
        return (*tensors, width_q, width_v)

    def extra_repr(self):
        return f"query_widths={self.query_widths}, value_widths={self.value_widths}"


# --------------------------------------------------- compact modules of given widths (empty)


class CompactFeedForward(PositionalwiseFeedForward):
    """SpeechBrain's PositionalwiseFeedForward (same modules), on (batch, time, features) as
    given: SpeechBrain's forward permutes to (time, batch) and back, which changes no value
    (its Linear layers act on the last dimension) and costs a copy of the activations."""

    def forward(self, x):
        return self.ffn(x)


def compact_ffn(ffn, width):
    """A PositionalwiseFeedForward like `ffn` with `width` hidden units."""
    linear1, activation, dropout, _ = ffn.ffn
    return _quiet(
        lambda: CompactFeedForward(
            width, input_size=linear1.in_features, dropout=dropout.p, activation=type(activation)
        )
    )


def compact_attention(mha, widths):
    return RaggedRelPosMHAXL(
        mha.embed_dim,
        mha.num_heads,
        widths["query"],
        widths["value"],
        dropout=mha.dropout,
        mask_pos_future=mha.mask_pos_future,
    )


def compact_conv(conv, channels):
    norm, activation, _, dropout = conv.after_conv
    return CompactConvolutionModule(
        conv.layer_norm.normalized_shape[0],
        channels,
        kernel_size=conv.kernel_size,
        activation=type(activation),
        dropout=dropout.p,
        causal=conv.causal,
        dilation=conv.dilation,
        eps=norm.eps,
    )


COMPACT_CLASSES = (CompactFeedForward, RaggedRelPosMHAXL, CompactConvolutionModule)
COMPACT_BUILDERS = {
    "ffn1": compact_ffn,
    "ffn2": compact_ffn,
    "attention": compact_attention,
    "conv": compact_conv,
}

# ------------------------------------------------------------------- shrink gated modules


@torch.no_grad()
def _fill(compact, tensors):
    """Copies tensors into the compact module's parameters, by name."""
    params = dict(compact.named_parameters())
    for name, tensor in tensors.items():
        params[name].copy_(tensor)


def shrink_ffn(ffn, kept):
    """Removes closed hidden units (`kept` False): rows of the first Linear, columns of the
    second."""
    keep = kept.nonzero().squeeze(1)
    compact = compact_ffn(ffn, len(keep))
    linear1, _, _, linear2 = ffn.ffn
    _fill(
        compact,
        {
            "ffn.0.weight": linear1.weight[keep],
            "ffn.0.bias": linear1.bias[keep],
            "ffn.3.weight": linear2.weight[:, keep],
            "ffn.3.bias": linear2.bias,
        },
    )
    return compact, len(keep)


def shrink_attention(mha, kept):
    """Removes closed query dims (Wq, Wk, pos_bias_u/v, linear_pos rows) and closed value dims
    (Wv rows, out_proj columns); heads become ragged. `kept` = (query, value) masks of shape
    (heads, head_dim), after sites.effective_keep."""
    q_keep, v_keep = kept
    widths = {"query": q_keep.sum(1).tolist(), "value": v_keep.sum(1).tolist()}
    compact = compact_attention(mha, widths)
    head_dim = mha.head_dim
    q_units = q_keep.flatten().nonzero().squeeze(1)  # unit = head * head_dim + dim
    v_units = v_keep.flatten().nonzero().squeeze(1)
    # in_proj_weight is laid out head by head, [q_h; k_h; v_h]: unit f of head h = f // head_dim
    # has its query row at f + 2 * head_dim * h, its key row head_dim later and its value row
    # 2 * head_dim later.
    q_rows = q_units + 2 * head_dim * (q_units // head_dim)
    k_rows = q_rows + head_dim
    v_rows = v_units + 2 * head_dim * (v_units // head_dim) + 2 * head_dim
    weight = mha.in_proj_weight
    _fill(
        compact,
        {
            "in_proj_weight": torch.cat([weight[q_rows], weight[k_rows], weight[v_rows]]),
            # pos_bias_u is stored (head_dim, heads), read as (heads, head_dim): flat index = unit.
            "pos_bias_u": mha.pos_bias_u.flatten()[q_units],
            "pos_bias_v": mha.pos_bias_v.flatten()[q_units],
            "linear_pos.weight": mha.linear_pos.weight[q_units],
            "out_proj.weight": mha.out_proj.weight[:, v_units],
            "out_proj.bias": mha.out_proj.bias,
        },
    )
    return compact, widths


def shrink_conv(conv, kept):
    """Removes closed depthwise channels: both GLU rows of the first pointwise conv, the depthwise
    filter, the LayerNorm entries and the last Linear's column; their depthwise biases stay as
    the phantom constants of the LayerNorm.

    Exact for the gated module (its mask zeroes a closed channel before the depthwise
    convolution and again before the last Linear); for a module without gates it computes what
    that masking would (a magnitude method's masked model)."""
    keep, closed = kept.nonzero().squeeze(1), (~kept).nonzero().squeeze(1)
    compact = compact_conv(conv, len(keep))
    linear = conv.after_conv[2]
    if len(keep) == 0:
        _fill(compact, {"bias": linear.bias})
        return compact, 0
    pointwise, depthwise, norm = conv.bottleneck[0], conv.conv, conv.after_conv[0]
    glu_rows = torch.cat([keep, keep + depthwise.in_channels])  # GLU: value half, gate half
    _fill(
        compact,
        {
            "layer_norm.weight": conv.layer_norm.weight,
            "layer_norm.bias": conv.layer_norm.bias,
            "bottleneck.0.weight": pointwise.weight[glu_rows],
            "bottleneck.0.bias": pointwise.bias[glu_rows],
            "conv.weight": depthwise.weight[keep],
            "conv.bias": depthwise.bias[keep],
            "after_conv.0.weight": norm.weight[keep],
            "after_conv.0.bias": norm.bias[keep],
            "after_conv.0.phantom": depthwise.bias[closed],
            "after_conv.2.weight": linear.weight[:, keep],
            "after_conv.2.bias": linear.bias,
        },
    )
    return compact, len(keep)


SHRINKERS = {
    "ffn1": shrink_ffn,
    "ffn2": shrink_ffn,
    "attention": shrink_attention,
    "conv": shrink_conv,
}


def _replace(layer, name, module, like):
    """Puts module at the layer's MODULE_PATHS[name], on like's device/dtype and mode."""
    parent_path, _, attribute = MODULE_PATHS[name].rpartition(".")
    parent = layer.get_submodule(parent_path) if parent_path else layer
    reference = next(like.parameters())
    module.to(device=reference.device, dtype=reference.dtype).train(like.training)
    setattr(parent, attribute, module)


def shrink_modules(modules, keep=None, every_module=False):
    """Replaces every pruned module by its compact version, in place; returns the widths.

    keep: {(layer, site): bool mask} from any method (sites.py); None takes the gates'
    decision (gated_conformer.gate_keep). Modules with no site in `keep` stay as they are,
    unless `every_module`: then they too become compact modules, keeping every unit, so that
    a model runs the compact modules' inference code in every layer (`conformer-prune shrink`
    does this: a dense run shrunk is then timed with the same code as a pruned one).
    widths = {"layers": [{"ffn1": int, "ffn2": int, "attention": {"query": [per head],
    "value": [per head]}, "conv": int}, ...]}, one dict per encoder layer with its pruned sites.
    """
    keep = gate_keep(modules) if keep is None else keep
    check_keep(modules, keep)
    layers = []
    for i, layer in enumerate(encoder_layers(modules)):
        widths = {}
        for name, path in MODULE_PATHS.items():
            module = layer.get_submodule(path)
            # A module already compact (a model trained at compact widths) has nothing to gain.
            full = every_module and not isinstance(module, COMPACT_CLASSES)
            masks = module_keep(keep, i, name, layer, full)
            if masks is None:
                continue
            compact, widths[name] = SHRINKERS[name](module, _on(masks, module))
            _replace(layer, name, compact, like=module)
        layers.append(widths)
    return {"layers": layers}


def _on(masks, module):
    """Masks on the module's device."""
    device = next(module.parameters()).device
    if isinstance(masks, tuple):
        return tuple(mask.to(device) for mask in masks)
    return masks.to(device)


def apply_widths(modules, widths):
    """Gives a freshly built dense model the compact structure of `widths` (weights unset)."""
    layers = encoder_layers(modules)
    if len(widths["layers"]) != len(layers):
        raise ValueError(
            f"widths describe {len(widths['layers'])} encoder layers, the model has {len(layers)}"
        )
    for layer, layer_widths in zip(layers, widths["layers"]):
        for name, width in layer_widths.items():
            dense = layer.get_submodule(MODULE_PATHS[name])
            _replace(layer, name, COMPACT_BUILDERS[name](dense, width), like=dense)
    return modules


# ------------------------------------------------------------------------ save / load

ARCH_FILE, WEIGHTS_FILE = "arch.json", "model.ckpt"
# What `conformer-prune decode` needs in a compact folder (export_inference_folder writes them).
INFERENCE_FILES = (ARCH_FILE, WEIGHTS_FILE, "tokenizer.ckpt", "normalizer.ckpt",
                   "hyperparams.yaml")


def build_compact(arch, widths):
    """The compact model structure (random weights) from plain values."""
    return apply_widths(build_asr_modules(**arch), widths)


def save_compact(out_dir, modules, arch, widths):
    """Writes arch.json ({"arch": build_asr_modules kwargs, "widths": ...}) and model.ckpt,
    tensors with many exact zeros (unstructured pruning) stored as a bitmask and their
    non-zero values (model.encode_sparse)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ARCH_FILE, "w", encoding="utf-8") as f:
        json.dump({"arch": arch, "widths": widths}, f, indent=1)
    torch.save(encode_sparse(modules.state_dict()), out_dir / WEIGHTS_FILE)


def _require_files(folder, names):
    """A compact folder with a file missing: name it (not a traceback from deep in a load)."""
    for name in names:
        if not (Path(folder) / name).is_file():
            raise InputError(f"{Path(folder) / name}: missing from the compact model folder; "
                             "write the folder again with `conformer-prune shrink`")


def load_compact(path):
    """Rebuilds a compact model from its folder (arch.json + model.ckpt), strictly."""
    path = Path(path)
    _require_files(path, (ARCH_FILE, WEIGHTS_FILE))
    with open(path / ARCH_FILE, encoding="utf-8") as f:
        saved = json.load(f)
    modules = build_compact(saved["arch"], saved["widths"])
    state = load_weights(path / WEIGHTS_FILE)
    expected = modules.state_dict()
    for key, tensor in state.items():
        if key in expected and expected[key].shape != tensor.shape:
            raise ValueError(
                f"{path / WEIGHTS_FILE}: tensor {key!r} has shape {tuple(tensor.shape)}, "
                f"but {ARCH_FILE} (arch + widths) gives {tuple(expected[key].shape)}"
            )
    modules.load_state_dict(state, strict=True)
    return modules


# ------------------------------------------------------------- SpeechBrain inference folder

_N_MELS_DEFAULT = inspect.signature(build_asr_modules).parameters["n_mels"].default

# Decoding defaults: the project's joint CTC/attention beam search and SpeechBrain's features.
DECODE_DEFAULTS = {
    "sample_rate": 16000,
    "n_fft": 400,
    "bos_index": 1,
    "eos_index": 2,
    "blank_index": 0,
    "beam_size": 10,
    "ctc_weight": 0.4,
    "min_decode_ratio": 0.0,
    "max_decode_ratio": 1.0,
    "lm_weight": 0.0,
}

# EncoderDecoderASR needs modules `encoder` (waveform -> encoder states) and `decoder` (the
# searcher), and `tokenizer`. The layout follows SpeechBrain's asr-conformer-transformerlm-
# librispeech hyperparams (Fbank -> InputNormalization -> CNN -> Transformer encoder, then
# S2STransformerBeamSearcher, here with a cached decoder step, with a CTC scorer), without the
# language model. The model structure is built from the inline arch and widths and the
# Pretrainer fills it, with the tokenizer and normalizer, from <name>.ckpt files in the `source`
# folder: the folder is self-contained.
INFERENCE_YAML = """\
# SpeechBrain inference for a compact conformer-prune model (written by conformer_prune.shrink).
#   EncoderDecoderASR.from_hparams(source=<this folder>, savedir=<this folder>)
sample_rate: {sample_rate}
n_fft: {n_fft}
n_mels: {n_mels}
bos_index: {bos_index}
eos_index: {eos_index}
blank_index: {blank_index}
beam_size: {beam_size}
ctc_weight: {ctc_weight}
lm_weight: {lm_weight}  # > 0: the LM of lm.ckpt/lm.json fused in the search (conformer_prune/lm.py)

arch: {arch}
widths: {widths}
asr: !apply:conformer_prune.shrink.build_compact
    arch: !ref <arch>
    widths: !ref <widths>
CNN: !apply:getattr [!ref <asr>, CNN]
Transformer: !apply:getattr [!ref <asr>, Transformer]
ctc_lin: !apply:getattr [!ref <asr>, ctc_lin]
seq_lin: !apply:getattr [!ref <asr>, seq_lin]

compute_features: !new:speechbrain.lobes.features.Fbank
    sample_rate: !ref <sample_rate>
    n_fft: !ref <n_fft>
    n_mels: !ref <n_mels>
normalize: !new:speechbrain.processing.features.InputNormalization
    norm_type: global
Tencoder: !new:speechbrain.lobes.models.transformer.TransformerASR.EncoderWrapper
    transformer: !ref <Transformer>
encoder: !new:speechbrain.nnet.containers.LengthsCapableSequential
    compute_features: !ref <compute_features>
    normalize: !ref <normalize>
    cnn: !ref <CNN>
    transformer_encoder: !ref <Tencoder>

ctc_scorer: !new:speechbrain.decoders.scorer.CTCScorer
    eos_index: !ref <eos_index>
    blank_index: !ref <blank_index>
    ctc_fc: !ref <ctc_lin>
scorer: !new:speechbrain.decoders.scorer.ScorerBuilder
    full_scorers: []
    partial_scorers: [!ref <ctc_scorer>]
    weights:
        ctc: !ref <ctc_weight>
decoder: !new:conformer_prune.search.CachedTransformerBeamSearcher
    modules: [!ref <Transformer>, !ref <seq_lin>]
    bos_index: !ref <bos_index>
    eos_index: !ref <eos_index>
    min_decode_ratio: {min_decode_ratio}
    max_decode_ratio: {max_decode_ratio}
    beam_size: !ref <beam_size>
    using_eos_threshold: False
    length_normalization: True
    scorer: !ref <scorer>

tokenizer: !new:sentencepiece.SentencePieceProcessor

modules:
    encoder: !ref <encoder>
    decoder: !ref <decoder>

pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer
    loadables:
        model: !ref <asr>
        normalizer: !ref <normalize>
        tokenizer: !ref <tokenizer>
"""


def export_inference_folder(
    out_dir, modules, arch, widths, tokenizer_path, normalizer, decode_opts=None, lm_folder=None
):
    """Writes a folder that EncoderDecoderASR.from_hparams loads offline.

    Files: arch.json and model.ckpt (as save_compact), tokenizer.ckpt (the SentencePiece model),
    normalizer.ckpt (`normalizer`: a saved InputNormalization checkpoint file, or the
    InputNormalization itself), hyperparams.yaml. `decode_opts` overrides DECODE_DEFAULTS.
    With an `lm_weight` > 0 in them, the LM files of `lm_folder` (train_lm.py's) are copied in
    too (lm.ckpt, lm.json; its tokenizer is the model's, as load_lm checks).
    """
    out_dir = Path(out_dir)
    opts = {**DECODE_DEFAULTS, **(decode_opts or {})}
    if opts["lm_weight"] > 0:
        lm_folder = check_lm_folder(lm_folder or "(no lm_folder)")
        check_lm_tokens(lm_folder, tokenizer_path)
    save_compact(out_dir, modules, arch, widths)
    if opts["lm_weight"] > 0:
        for name in (LM_WEIGHTS, LM_INFO):
            shutil.copyfile(lm_folder / name, out_dir / name)
    shutil.copyfile(tokenizer_path, out_dir / "tokenizer.ckpt")
    if isinstance(normalizer, (str, Path)):
        shutil.copyfile(normalizer, out_dir / "normalizer.ckpt")
    else:
        normalizer._save(out_dir / "normalizer.ckpt")
    text = INFERENCE_YAML.format(
        n_mels=arch.get("n_mels", _N_MELS_DEFAULT),
        arch=json.dumps(arch),
        widths=json.dumps(widths),
        **opts,
    )
    (out_dir / "hyperparams.yaml").write_text(text, encoding="utf-8")
    return out_dir


# ---------------------------------------------------------------- the `shrink` subcommand


class _PlainConstructor(SafeConstructor):
    """Reads a resolved training YAML without building anything: tagged nodes become None."""


_PlainConstructor.add_multi_constructor("!", lambda constructor, suffix, node: None)


def plain_hparams(hparams_file):
    """A run's resolved hyperparams.yaml as plain values (tagged objects read as None)."""
    yaml = YAML(typ="safe", pure=True)
    yaml.Constructor = _PlainConstructor
    return yaml.load(Path(hparams_file))

# Where each gate site leaves its mark in a gated state_dict.
_SITE_KEYS = {
    "ffn": "ffn_module1.1.gate.logits",
    "query": "query_gate.logits",
    "value": "value_gate.logits",
    "conv": "convolution_module.gate.logits",
}


def load_gated_run(path):
    """Reads a training run folder (results/<name>/<seed>/) or one of its checkpoint folders.

    The run's resolved hyperparams.yaml is read for plain values only (`arch`, decoding options),
    because building it with HyperPyYAML would instantiate the whole training setup with paths
    relative to the training's working directory. The gated model is rebuilt as
    build_asr_modules(**arch) plus the gate sites found in the checkpoint, whose weights then load
    strictly. The checkpoint is the run's latest (the end of the pruning schedule).

    A run whose method trained the model at compact widths (the structured baselines) has an
    arch.json beside its hyperparams.yaml; it is rebuilt at those widths instead.

    Returns a dict: modules (eval mode), arch, base_widths (None unless trained compact),
    hparams (plain values), checkpoint, run_dir, tokenizer (path or None), normalizer (path or
    None).
    """
    path = Path(path)
    if (path / "hyperparams.yaml").exists():
        run_dir = path
        checkpoint = Checkpointer(path / "save").find_checkpoint()
        if checkpoint is None:
            raise InputError(f"{path}: no checkpoint under save/ (did training start?)")
        checkpoint = checkpoint.path
    elif path.name.startswith("CKPT+") and (path / "CKPT.yaml").exists():
        run_dir, checkpoint = path.parent.parent, path  # <run>/save/CKPT+...
    else:
        raise InputError(f"{path}: neither a training run folder (with hyperparams.yaml) nor "
                         "one of its save/CKPT+... checkpoint folders")
    for needed in (run_dir / "hyperparams.yaml", checkpoint / WEIGHTS_FILE):
        if not needed.is_file():
            raise InputError(f"{needed}: missing; the run folder is incomplete")
    hparams = plain_hparams(run_dir / "hyperparams.yaml")
    arch = hparams["arch"]
    state = torch.load(checkpoint / WEIGHTS_FILE, map_location="cpu")
    base_widths = None
    if (run_dir / ARCH_FILE).exists():
        # A run trained at compact widths (a structured baseline): nothing is gated, and the
        # model is rebuilt at the widths its method wrote.
        saved = json.loads((run_dir / ARCH_FILE).read_text(encoding="utf-8"))
        arch, base_widths = saved["arch"], saved["widths"]
        modules = build_compact(arch, base_widths)
    else:
        sites = [site for site, mark in _SITE_KEYS.items() if any(k.endswith(mark) for k in state)]
        modules = build_asr_modules(**arch)
        if sites:
            insert_gates(modules, sites=sites, threshold=hparams.get("gate_threshold", 0.5))
    try:
        modules.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise InputError(
            f"{checkpoint / WEIGHTS_FILE}: does not fit the model that "
            f"{run_dir / 'hyperparams.yaml'} (arch) and {ARCH_FILE} describe: {gist(err)}"
        ) from None
    # The run's own tokenizer, or the one its YAML points to (a fine-tuned baseline uses its
    # dense run's; the path is relative to where training ran).
    folders = [run_dir / "save" / "tokenizer", Path(hparams.get("tokenizer_folder") or "")]
    tokenizers = [model for folder in folders for model in sorted(folder.glob("*.model"))]
    normalizer = checkpoint / "normalizer.ckpt"
    return {
        "modules": modules.eval(),
        "arch": arch,
        "base_widths": base_widths,
        "hparams": hparams,
        "checkpoint": checkpoint,
        "run_dir": run_dir,
        "tokenizer": tokenizers[0] if tokenizers else None,
        "normalizer": normalizer if normalizer.exists() else None,
    }


def decode_opts_from(hparams):
    """Decoding options from the training YAML's names (see hparams/*.yaml)."""
    names = {
        "sample_rate": "sample_rate",
        "n_fft": "n_fft",
        "bos_index": "bos_index",
        "eos_index": "eos_index",
        "blank_index": "blank_index",
        "beam_size": "test_beam_size",
        "ctc_weight": "ctc_weight_decode",
        "max_decode_ratio": "max_decode_ratio",
        "lm_weight": "lm_weight",
    }
    return {opt: hparams[key] for opt, key in names.items() if hparams.get(key) is not None}


def _parts(counts):
    return {part: counts[part] for part in ("total", "encoder", "decoder", "ctc")}


def shrink_run(path, out_dir, threshold=None):
    """Shrinks a run's gated checkpoint into an inference folder; returns the report."""
    run = load_gated_run(path)
    modules = run["modules"]
    if threshold is not None:
        set_threshold(modules, threshold)
    before = _parts(count_params(param_state(modules)))
    widths = shrink_modules(modules, every_module=True)
    if run["base_widths"] is not None:  # trained compact: the shrink had nothing to remove
        widths = run["base_widths"]
    if run["tokenizer"] and run["normalizer"]:
        export_inference_folder(
            out_dir,
            modules,
            run["arch"],
            widths,
            run["tokenizer"],
            run["normalizer"],
            decode_opts_from(run["hparams"]),
            run["hparams"].get("lm_folder"),
        )
    else:
        print(f"note: no tokenizer or normalizer in {run['run_dir']}: compact model only")
        save_compact(out_dir, modules, run["arch"], widths)
    report = {
        "checkpoint": str(run["checkpoint"]),
        "threshold": threshold if threshold is not None else run["hparams"].get("gate_threshold"),
        "params": {"before": before, "after": _parts(count_params(param_state(modules)))},
        "widths": widths,
        "bytes": storage_bytes(modules, Path(out_dir) / WEIGHTS_FILE),
    }
    with open(Path(out_dir) / "shrink_report.json", "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    return report


def storage_bytes(modules, weights_file):
    """{"model_ckpt": bytes of the written model.ckpt, "dense_tensors": bytes its tensors take
    stored dense, "nonzero_values": bytes of their non-zero entries alone}."""
    tensors = list(modules.state_dict().values())
    return {
        "model_ckpt": Path(weights_file).stat().st_size,
        "dense_tensors": sum(t.numel() * t.element_size() for t in tensors),
        "nonzero_values": sum(int(torch.count_nonzero(t)) * t.element_size() for t in tensors),
    }


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "shrink",
        help="remove pruned units of a gated checkpoint; write a compact inference folder",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("run_or_ckpt", help="results/<name>/<seed>/ or a save/CKPT+... folder")
    parser.add_argument("--out", required=True, help="the compact model folder to write")
    parser.add_argument(
        "--threshold", type=float, default=None,
        help="keep a unit iff its retention >= this (default: the run's gate_threshold)",
    )
    parser.set_defaults(func=run)
    return parser


def run(args):
    report = shrink_run(args.run_or_ckpt, args.out, args.threshold)
    before, after = report["params"]["before"], report["params"]["after"]
    for part in before:
        print(f"{part}: {before[part]} -> {after[part]} parameters")
    sizes = report["bytes"]
    print(f"model.ckpt: {sizes['model_ckpt']:,} bytes (tensors stored dense: "
          f"{sizes['dense_tensors']:,}; their non-zero values alone: {sizes['nonzero_values']:,})")
    print(f"wrote {args.out}")
    return 0
