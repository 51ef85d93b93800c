"""The one registry of prunable sites of a Conformer encoder layer.

A site is a set of units that can be removed together with the tensors each unit owns:

| site  | module (in the layer) | unit                        | tensors one unit owns                  |
| ----- | --------------------- | --------------------------- | -------------------------------------- |
| ffn1  | ffn_module1.1         | hidden unit of macaron FFN 1 | row + bias of linear 1, column of linear 2 |
| ffn2  | ffn_module2.1         | hidden unit of macaron FFN 2 | same                                  |
| query | mha_layer             | query dimension of a head    | Wq row, Wk row, linear_pos row, pos_bias_u/v entries |
| value | mha_layer             | value dimension of a head    | Wv row, out_proj column               |
| conv  | convolution_module    | depthwise channel            | both GLU rows + biases, depthwise filter, LayerNorm entries, last Linear column |

Gates, shrink, parameter counts, the pruning methods and the dashboard all read this module, so
a site is named and costed in one place. A method hands over its decision as keep masks,
`{(layer, site): bool tensor}` (attention masks shaped (heads, head_dim)); `effective_keep`
applies the structural rules that follow from the others (a head without value dimensions has
no use for its query dimensions) and `params_removed_by` counts what the shrink will leave.
Everything here reads plain SpeechBrain modules (the gated subclasses too) and imports no
training code.
"""

import torch
from speechbrain.lobes.models.transformer.Conformer import ConformerEncoderLayer
from speechbrain.lobes.models.transformer.TransformerASR import TransformerASR

from conformer_prune.model import GATE_KEY_MARK

SITES = ("ffn1", "ffn2", "query", "value", "conv")
# The modules the shrink replaces, under the names that shrink widths use, and their sites.
MODULE_PATHS = {
    "ffn1": "ffn_module1.1",
    "ffn2": "ffn_module2.1",
    "attention": "mha_layer",
    "conv": "convolution_module",
}
MODULE_SITES = {"ffn1": ("ffn1",), "ffn2": ("ffn2",), "attention": ("query", "value"),
                "conv": ("conv",)}
# Where each site's module sits in a ConformerEncoderLayer.
SITE_MODULE = {site: MODULE_PATHS[name] for name, sites in MODULE_SITES.items() for site in sites}

# ------------------------------------------------------------------------------ the model


def find_transformer(model):
    """The TransformerASR inside a ModuleDict / ModuleList / wrapper (or the model itself)."""
    for module in model.modules():
        if isinstance(module, TransformerASR):
            return module
    raise ValueError("no TransformerASR found in the model")


def encoder_layers(model):
    layers = find_transformer(model).encoder.layers
    for i, layer in enumerate(layers):
        if not isinstance(layer, ConformerEncoderLayer):
            raise ValueError(f"encoder layer {i} is a {type(layer).__name__}, not Conformer's")
    return layers


def site_module(layer, site):
    return layer.get_submodule(SITE_MODULE[site])


# ------------------------------------------------------------------------- per-site facts


def site_shape(layer, site):
    """Shape of the site's keep mask: (units,), or (heads, head_dim) for query and value."""
    return module_site_shape(site_module(layer, site), site)


def module_site_shape(module, site):
    if site in ("ffn1", "ffn2"):
        return (module.ffn[0].out_features,)
    if site in ("query", "value"):
        return (module.num_heads, module.head_dim)
    return (module.conv.in_channels,)


def unit_cost(layer, site):
    """Parameters one unit of the site owns (what removing it takes away)."""
    return module_unit_cost(site_module(layer, site), site)


def module_unit_cost(module, site):
    if site in ("ffn1", "ffn2"):
        linear1, linear2 = module.ffn[0], module.ffn[3]
        return linear1.in_features + 1 + linear2.out_features
    if site == "query":
        return 3 * module.embed_dim + 2  # Wq, Wk, linear_pos rows; pos_bias_u, pos_bias_v
    if site == "value":
        return 2 * module.embed_dim  # Wv row, out_proj column
    # Two pointwise rows with biases (GLU value and gate), the depthwise filter, the LayerNorm
    # weight and bias, a column of the last Linear. The depthwise bias stays (the compact
    # module keeps it as a "phantom" LayerNorm constant), so it is not counted.
    d_model, kernel = module.after_conv[2].out_features, module.conv.kernel_size[0]
    return 2 * (d_model + 1) + kernel + 2 + d_model


@torch.no_grad()
def unit_weights(layer, site):
    """The weights each unit owns, one row per unit (units, owned), for magnitude criteria.

    Rows follow the keep mask's flat order (head by head for query and value)."""
    module = site_module(layer, site)
    if site in ("ffn1", "ffn2"):
        linear1, linear2 = module.ffn[0], module.ffn[3]
        return torch.cat([linear1.weight, linear1.bias[:, None], linear2.weight.t()], dim=1)
    if site in ("query", "value"):
        heads, dim = module.num_heads, module.head_dim
        # in_proj_weight is laid out head by head, [q_h; k_h; v_h] (see shrink_attention).
        blocks = module.in_proj_weight.view(heads, 3, dim, -1)
        if site == "query":
            return torch.cat([blocks[:, 0].reshape(heads * dim, -1),
                              blocks[:, 1].reshape(heads * dim, -1),
                              module.linear_pos.weight], dim=1)
        return torch.cat([blocks[:, 2].reshape(heads * dim, -1), module.out_proj.weight.t()],
                         dim=1)
    channels = module.conv.in_channels
    pointwise = module.bottleneck[0]
    return torch.cat([pointwise.weight[:channels].flatten(1),
                      pointwise.weight[channels:].flatten(1), module.conv.weight.flatten(1),
                      module.after_conv[2].weight.t()], dim=1)


# ---------------------------------------------------------------------------- keep masks


def full_keep(model):
    """Every unit of every site kept: {(layer, site): all-True mask}."""
    keep = {}
    for i, layer in enumerate(encoder_layers(model)):
        for site in SITES:
            device = next(site_module(layer, site).parameters()).device
            keep[(i, site)] = torch.ones(site_shape(layer, site), dtype=torch.bool, device=device)
    return keep


def check_keep(model, keep):
    """Refuses masks that do not fit the model, naming the (layer, site)."""
    layers = encoder_layers(model)
    for (i, site), mask in keep.items():
        if site not in SITES:
            raise ValueError(f"keep mask for unknown site {site!r}; sites are {SITES}")
        if not 0 <= i < len(layers):
            raise ValueError(f"keep mask for layer {i}; the encoder has {len(layers)} layers")
        shape = site_shape(layers[i], site)
        if tuple(mask.shape) != shape or mask.dtype != torch.bool:
            raise ValueError(f"keep mask ({i}, {site}): expected a bool tensor of shape {shape}, "
                             f"got {mask.dtype} {tuple(mask.shape)}")


def effective_keep(query_keep, value_keep):
    """The attention rule: a head whose value dimensions are all closed outputs nothing, so its
    query (and key) dimensions go too. A head with only its queries closed stays (it attends
    uniformly over the unpadded keys). Masks are (heads, head_dim)."""
    return query_keep & value_keep.any(dim=1, keepdim=True), value_keep


def module_keep(keep, i, name, layer, every_module=False):
    """The keep masks of one shrinkable module (MODULE_PATHS name) of layer i, or None if no
    site of that module is pruned (with `every_module`, masks that keep every unit). Sites
    absent from `keep` keep every unit."""
    sites = MODULE_SITES[name]
    pruned = [keep[(i, site)] for site in sites if (i, site) in keep]
    if not pruned and not every_module:
        return None
    device = pruned[0].device if pruned else next(layer.parameters()).device
    masks = []
    for site in sites:
        mask = keep.get((i, site))
        if mask is None:
            mask = torch.ones(site_shape(layer, site), dtype=torch.bool, device=device)
        masks.append(mask)
    if name == "attention":
        return effective_keep(*masks)
    return masks[0]


def params_removed_by(model, keep):
    """Encoder parameters the shrink removes for these keep masks (an int)."""
    removed = 0
    for i, layer in enumerate(encoder_layers(model)):
        for name in MODULE_PATHS:
            masks = module_keep(keep, i, name, layer)
            if masks is not None:
                removed += _removed_params(layer, name, masks)
    return removed


def _removed_params(layer, name, masks):
    if name == "attention":
        query, value = masks
        return (int((~query).sum()) * unit_cost(layer, "query")
                + int((~value).sum()) * unit_cost(layer, "value"))
    site = MODULE_SITES[name][0]
    closed = int((~masks).sum())
    if name == "conv" and not masks.any():
        # Nothing left: the compact module keeps only the bias of its last Linear.
        module = site_module(layer, "conv")
        own = sum(p.numel() for n, p in module.named_parameters() if GATE_KEY_MARK not in n)
        return own - module.after_conv[2].out_features
    return closed * unit_cost(layer, site)


def widths_of(keep, model):
    """Per-layer widths that the shrink of these masks produces (the `widths` of arch.json)."""
    layers = []
    for i, layer in enumerate(encoder_layers(model)):
        widths = {}
        for name in MODULE_PATHS:
            masks = module_keep(keep, i, name, layer)
            if masks is None:
                continue
            if name == "attention":
                widths[name] = {"query": masks[0].sum(1).tolist(),
                                "value": masks[1].sum(1).tolist()}
            else:
                widths[name] = int(masks.sum())
        layers.append(widths)
    return {"layers": layers}
