"""Adaptive dropout gates inside SpeechBrain's Conformer encoder layers.

`insert_gates` turns the FFN, attention and convolution modules of every encoder layer into
gated subclasses of SpeechBrain's own classes (same parameters, same state_dict keys, plus the
gate logits), so the encoder itself is not forked. `gate_keep` hands the gates' decision over
as keep masks, the form every pruning method uses, which shrink.py removes and
`params_if_shrunk` counts; what a unit costs comes from the site registry (sites.py) and is
written to each gate's `unit_cost` for the cost-weighted regulariser.

The formulas and the LayerNorm handling of the convolution module are in docs/PRUNING.md.
"""

import torch
from speechbrain.lobes.models.transformer.Conformer import ConvolutionModule
from speechbrain.nnet.attention import PositionalwiseFeedForward, RelPosMHAXL
from torch.nn import functional as F

from conformer_prune.gates import AdaptiveDropout
from conformer_prune.model import count_params, param_state
from conformer_prune.sites import (
    encoder_layers,
    module_unit_cost,
    params_removed_by,
)

# The gate sites a YAML names: "ffn" gates both macaron FFNs (sites ffn1 and ffn2).
SITES = ("ffn", "query", "value", "conv")


def _become(module, gated_class, **gates):
    """Turns a SpeechBrain module into its gated subclass in place.

    The module keeps its Parameters (same tensors, device and state_dict keys), so nothing needs
    copying and an optimiser built afterwards sees the usual weights plus the gate logits.
    """
    if isinstance(module, GATED_CLASSES):
        raise ValueError(f"insert_gates: {type(module).__name__} is already gated")
    device = next(module.parameters()).device
    module.__class__ = gated_class
    for name, gate in gates.items():
        setattr(module, name, None if gate is None else gate.to(device))
    return module


# --------------------------------------------------------------------------------------- FFN


class GatedPositionalwiseFeedForward(PositionalwiseFeedForward):
    """Feed-forward module with a gate on its hidden units, after the activation."""

    def forward(self, x):
        # Linear layers act on the last dimension, so SpeechBrain's (time, batch) permutation is
        # not needed, and the batch stays first for per-example gate samples.
        linear1, activation, dropout, linear2 = self.ffn
        return linear2(dropout(self.gate(activation(linear1(x)))))



def gate_ffn(ffn, **gate_args):
    gate = AdaptiveDropout(ffn.ffn[0].out_features, **gate_args)
    module = _become(ffn, GatedPositionalwiseFeedForward, gate=gate)
    gate.unit_cost = module_unit_cost(module, "ffn1")
    return module


# --------------------------------------------------------------------------------- attention


def attention_mask_4d(attn_mask, num_heads, qlen, klen):
    """SpeechBrain's 2D (L, S) or 3D (N * heads, L, S) attention mask, as 4D
    (N or 1, heads or 1, L, S)."""
    if attn_mask is None:
        return None
    if attn_mask.dim() == 2:
        return attn_mask.view(1, 1, qlen, klen)
    return attn_mask.view(-1, num_heads, qlen, klen)


def relpos_attention(mha, q_u, q_v, k, p_k, v, key_padding_mask=None, attn_mask=None):
    """The score, softmax and context steps of SpeechBrain's RelPosMHAXL, for any set of heads.

    q_u, q_v (queries plus pos_bias_u / pos_bias_v), k, v: (batch, heads, time, dim);
    p_k: (1, heads, 2 * time - 1, dim); attn_mask: 4D as from `attention_mask_4d`.
    Returns the context (batch, heads, time, value dim) and the attention weights.
    """
    matrix_ac = torch.matmul(q_u * mha.scale, k.transpose(-1, -2))
    matrix_bd = mha.rel_shift(torch.matmul(q_v * mha.scale, p_k.transpose(-1, -2)))
    attn_score = matrix_ac + matrix_bd
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            attn_score = attn_score.masked_fill(attn_mask, mha.attn_fill_value)
        else:
            attn_score = attn_score + attn_mask
    if key_padding_mask is not None:
        padding = key_padding_mask.view(key_padding_mask.shape[0], 1, 1, -1)
        attn_score = attn_score.masked_fill(padding, mha.attn_fill_value)
    attn_score = F.softmax(attn_score, dim=-1, dtype=torch.float32)
    attn_score = mha.dropout_att(attn_score)
    # As SpeechBrain: fully masked rows would be NaN, reset them to 0 after the softmax.
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_score = attn_score.masked_fill(attn_mask, 0.0)
    if key_padding_mask is not None:
        attn_score = attn_score.masked_fill(padding, 0.0)
    return torch.matmul(attn_score, v), attn_score


class GatedRelPosMHAXL(RelPosMHAXL):
    """Relative-position self-attention with gates on query and on value dimensions.

    Both gates have num_heads * head_dim units, numbered head by head (unit h * head_dim + j is
    dimension j of head h). The query gate multiplies the queries AFTER pos_bias_u and pos_bias_v
    are added, so a closed query dimension drops out of both the content and the position score
    and takes with it its Wq and Wk rows, its pos_bias_u / pos_bias_v entries and its linear_pos
    row. The value gate multiplies the value vectors: a closed value dimension takes its Wv row
    and its out_proj column. Either gate may be None (site not gated).
    """

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
        bsz, qlen, klen = query.shape[0], query.shape[1], key.shape[1]
        heads, dim = self.num_heads, self.head_dim
        q, k, v = self._project(query, key, value)
        p_k = self.linear_pos(pos_embs).view(1, -1, heads, dim)
        bias_u = self.pos_bias_u.view(1, 1, heads, dim)
        bias_v = self.pos_bias_v.view(1, 1, heads, dim)
        if self.query_gate is not None:
            # (q + b) * m = q * m + b * m: one full-size product instead of two.
            q_mask = self.query_gate.mask(bsz).view(-1, 1, heads, dim)
            q, bias_u, bias_v = q * q_mask, bias_u * q_mask, bias_v * q_mask
        q_u, q_v = q + bias_u, q + bias_v
        if self.value_gate is not None:
            v = v * self.value_gate.mask(bsz).view(-1, 1, heads, dim)
        context, attn = relpos_attention(
            self,
            q_u.transpose(1, 2),
            q_v.transpose(1, 2),
            k.transpose(1, 2),
            p_k.transpose(1, 2),
            v.transpose(1, 2),
            key_padding_mask,
            attention_mask_4d(attn_mask, heads, qlen, klen),
        )
        out = self.out_proj(context.transpose(1, 2).reshape(bsz, qlen, heads * dim))
        return (out, attn) if return_attn_weights else out

    def _project(self, query, key, value):
        """Queries, keys and values as (batch, time, heads, head_dim), like RelPosMHAXL."""
        if not is_self_attention(query, key, value):
            # SpeechBrain's cross-attention path reads in_proj_weight in another row layout
            # (q, k, v blocks) than its self-attention path; the Conformer encoder never uses it.
            raise NotImplementedError("GatedRelPosMHAXL: self-attention only")
        # The fused weight is laid out head by head: [q_h; k_h; v_h] for h = 0, 1, ...
        qkv = F.linear(query, self.in_proj_weight)
        return qkv.view(query.shape[0], -1, self.num_heads, 3 * self.head_dim).chunk(3, dim=-1)


def is_self_attention(query, key, value):
    """Whether an attention call attends a sequence to itself (the only case the gated and
    compact attention modules support)."""
    return all(a is b or torch.equal(a, b) for a, b in ((query, key), (key, value)))


def gate_attention(mha, query, value, **gate_args):
    if not isinstance(mha, RelPosMHAXL) or not mha._qkv_same_embed_dim or mha.vbias is not None:
        raise ValueError(
            "insert_gates: query/value gates need RelPosMHAXL with a fused in_proj_weight and no "
            f"value bias (SpeechBrain's Conformer default), got {type(mha).__name__}"
        )
    units = mha.num_heads * mha.head_dim
    module = _become(
        mha,
        GatedRelPosMHAXL,
        query_gate=AdaptiveDropout(units, **gate_args) if query else None,
        value_gate=AdaptiveDropout(units, **gate_args) if value else None,
    )
    if module.query_gate is not None:
        module.query_gate.unit_cost = module_unit_cost(module, "query")
    if module.value_gate is not None:
        module.value_gate.unit_cost = module_unit_cost(module, "value")
    return module


# ------------------------------------------------------------------------------ convolution


class GatedConvolutionModule(ConvolutionModule):
    """Convolution module with a gate on the channels entering the depthwise convolution.

    The gate proper scales the channels after the GLU, where they enter the depthwise
    convolution: a closed channel's depthwise output is then its bias, a constant, whose only
    remaining effect is on the LayerNorm statistics of the open channels (the compact model keeps
    it there as a "phantom" constant). A second, 0/1 factor after the Swish, before the last
    pointwise Linear, cuts a closed channel off from the output so that its Linear column can go:
    it is 0 exactly where the mask is 0 (evaluation's closed units, or a hard training sample)
    and 1 elsewhere, so a relaxed training mask m scales a channel once, by m, not by m * m.
    """

    def forward(self, x, mask=None, dynchunktrain_config=None):
        if dynchunktrain_config is not None:
            raise NotImplementedError("GatedConvolutionModule: no Dynamic Chunk Convolution")
        channels = self.conv.in_channels
        gate_mask = self.gate.mask(x.shape[0])
        out = self.bottleneck(self.layer_norm(x).transpose(1, 2))
        out = self.conv(out * gate_mask.view(-1, channels, 1))
        if self.causal:
            out = out[..., : -self.padding]
        norm, activation, linear, dropout = self.after_conv
        closed_off = (gate_mask != 0).to(out.dtype)  # no gradient: the gate acts above
        out = activation(norm(out.transpose(1, 2))) * closed_off.view(-1, 1, channels)
        out = dropout(linear(out))
        if mask is not None:
            out = out.masked_fill(mask, 0.0)
        return out



def gate_conv(conv, **gate_args):
    if conv.conv.bias is None or conv.bottleneck[0].bias is None:
        raise ValueError("insert_gates: the convolution module needs biases (bias=True)")
    gate = AdaptiveDropout(conv.conv.in_channels, **gate_args)
    module = _become(conv, GatedConvolutionModule, gate=gate)
    gate.unit_cost = module_unit_cost(module, "conv")
    return module


# ------------------------------------------------------------------------------ the model


def insert_gates(
    modules_or_transformer,
    sites=SITES,
    init_retention=0.95,
    temperature=0.5,
    hard=False,
    threshold=0.5,
):
    """Puts adaptive dropout gates into every Conformer encoder layer, in place.

    Arguments
    ---------
    modules_or_transformer : torch.nn.Module
        The ModuleDict of `build_asr_modules`, or a TransformerASR (anything containing one).
    sites : sequence of str
        Any of "ffn" (both macaron FFNs), "query", "value", "conv". Sites left out get no gate
        and no parameter.
    init_retention, temperature, hard, threshold :
        AdaptiveDropout arguments shared by all gates.

    Returns the same object, so that it can be used with HyperPyYAML's `!apply:`.
    """
    unknown = set(sites) - set(SITES)
    if unknown:
        raise ValueError(f"insert_gates: unknown sites {sorted(unknown)}, expected {SITES}")
    gate_args = dict(
        init_retention=init_retention, temperature=temperature, hard=hard, threshold=threshold
    )
    for layer in encoder_layers(modules_or_transformer):
        if "ffn" in sites:
            gate_ffn(layer.ffn_module1[1], **gate_args)
            gate_ffn(layer.ffn_module2[1], **gate_args)
        if "query" in sites or "value" in sites:
            gate_attention(layer.mha_layer, "query" in sites, "value" in sites, **gate_args)
        if "conv" in sites:
            gate_conv(layer.convolution_module, **gate_args)
    return modules_or_transformer


def site_gates(layer):
    """(site name, gate) of each gate in one encoder layer, in report order."""
    candidates = (
        ("ffn1", getattr(layer.ffn_module1[1], "gate", None)),
        ("ffn2", getattr(layer.ffn_module2[1], "gate", None)),
        ("query", getattr(layer.mha_layer, "query_gate", None)),
        ("value", getattr(layer.mha_layer, "value_gate", None)),
        ("conv", getattr(layer.convolution_module, "gate", None)),
    )
    return [(site, gate) for site, gate in candidates if gate is not None]


GATED_CLASSES = (GatedPositionalwiseFeedForward, GatedRelPosMHAXL, GatedConvolutionModule)


def set_threshold(model, threshold):
    """Overrides the evaluation threshold of every gate."""
    for layer in encoder_layers(model):
        for _, gate in site_gates(layer):
            gate.threshold = threshold


def gate_summary(model):
    """One dict per gate: layer, site, units, kept, below_threshold, mean_retention."""
    rows = []
    for i, layer in enumerate(encoder_layers(model)):
        for site, gate in site_gates(layer):
            kept = int(gate.keep_mask().sum())
            rows.append(
                {
                    "layer": i,
                    "site": site,
                    "units": gate.units,
                    "kept": kept,
                    "below_threshold": gate.units - kept,
                    "mean_retention": float(gate.retention().detach().mean()),
                }
            )
    return rows


def gate_keep(model):
    """The gates' decision as keep masks {(layer, site): bool mask} (sites.py's site names;
    attention masks (heads, head_dim)), for the shrink and the parameter counts."""
    keep = {}
    for i, layer in enumerate(encoder_layers(model)):
        for site, gate in site_gates(layer):
            mask = gate.keep_mask()
            if site in ("query", "value"):
                mha = layer.mha_layer
                mask = mask.view(mha.num_heads, mha.head_dim)
            keep[(i, site)] = mask
    return keep


def masked_model(model, keep, logit=10.0):
    """The model that a method's keep masks describe: gates with fixed logits (+-`logit`) at
    every site in `keep`, in place. In eval mode it computes the pruned network exactly, so
    that the shrink of any method's masks can be checked against it."""
    sites = {"ffn" if site in ("ffn1", "ffn2") else site for _, site in keep}
    insert_gates(model, sites=sorted(sites))
    with torch.no_grad():
        for i, layer in enumerate(encoder_layers(model)):
            for site, gate in site_gates(layer):
                mask = keep.get((i, site))
                open_units = torch.ones(gate.units, dtype=torch.bool) if mask is None \
                    else mask.flatten().to(gate.logits.device)
                gate.logits.copy_(torch.where(open_units, logit, -logit))
    return model


def params_if_shrunk(modules):
    """Exact parameter counts {total, encoder, decoder, ctc} of the model shrunk now.

    `modules` is the ModuleDict of `build_asr_modules` (count_params needs its key names).
    Only encoder layers are gated, so only the encoder count changes.
    """
    counts = count_params(param_state(modules))
    removed = params_removed_by(modules, gate_keep(modules))
    counts["encoder"] -= removed
    counts["total"] -= removed
    return {part: counts[part] for part in ("total", "encoder", "decoder", "ctc")}
