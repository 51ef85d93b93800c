"""The ASR model: SpeechBrain's CNN front end, Conformer encoder and Transformer decoder.

One function builds it from plain values (`build_asr_modules`), so that the same call serves the
training YAML (through `!apply:`) and the compact checkpoint, which stores those values in
`arch.json` and rebuilds the model without the training configuration.
"""

import numpy as np
import torch
from speechbrain.lobes.models.convolution import ConvolutionFrontEnd
from speechbrain.lobes.models.transformer.TransformerASR import TransformerASR
from speechbrain.nnet.linear import Linear

ACTIVATIONS = {"gelu": torch.nn.GELU, "relu": torch.nn.ReLU}


def inter_ctc_problem(layers, num_layers):
    """What is wrong with a list of intermediate CTC layers (1 = the first encoder layer) for an
    encoder of `num_layers` layers, or None."""
    for number in layers:
        if not isinstance(number, int) or not 1 <= number <= num_layers:
            return f"inter_ctc_layers: {number!r} is not an encoder layer (1 to {num_layers})"
    return None


def build_asr_modules(
    vocab_size,
    n_mels=80,
    d_model=144,
    nhead=4,
    num_encoder_layers=12,
    num_decoder_layers=4,
    d_ffn=1024,
    kernel_size=31,
    dropout=0.1,
    activation="gelu",
    cnn_channels=(64, 32),
):
    """Builds the modules of a Conformer CTC/attention model (SpeechBrain conformer_small layout).

    Returns a ConformerASR (a ModuleDict) with the keys a SpeechBrain recipe uses: CNN, Transformer, ctc_lin,
    seq_lin. Every argument is a plain value so that the call can be written to JSON.
    """
    # One stride-2 block per entry of cnn_channels: two (SpeechBrain's default) give 40 ms
    # frames, three give 80 ms frames, which a small-vocabulary CPU model trains much faster on.
    blocks = len(cnn_channels)
    cnn = ConvolutionFrontEnd(
        input_shape=(8, 10, n_mels),
        num_blocks=blocks,
        num_layers_per_block=1,
        out_channels=tuple(cnn_channels),
        kernel_sizes=(3,) * blocks,
        strides=(2,) * blocks,
        residuals=(False,) * blocks,
    )
    # Each block halves the mel axis (rounding up); the last block's channels are flattened in.
    mel_bins = n_mels
    for _ in range(blocks):
        mel_bins = (mel_bins + 1) // 2
    cnn_out = cnn_channels[-1] * mel_bins
    transformer = TransformerASR(
        input_size=cnn_out,
        tgt_vocab=vocab_size,
        d_model=d_model,
        nhead=nhead,
        num_encoder_layers=num_encoder_layers,
        num_decoder_layers=num_decoder_layers,
        d_ffn=d_ffn,
        kernel_size=kernel_size,
        dropout=dropout,
        activation=ACTIVATIONS[activation],
        encoder_module="conformer",
        attention_type="RelPosMHAXL",
        normalize_before=True,
        causal=False,
    )
    return ConformerASR(
        {
            "CNN": cnn,
            "Transformer": transformer,
            "ctc_lin": Linear(input_size=d_model, n_neurons=vocab_size),
            "seq_lin": Linear(input_size=d_model, n_neurons=vocab_size),
        }
    )


class ConformerASR(torch.nn.ModuleDict):
    """The four parts of a SpeechBrain CTC/attention recipe, with one forward through all.

    Why a forward of its own: under DDP (torchrun) SpeechBrain wraps each entry of the Brain's
    `modules` in DistributedDataParallel, and DDP only averages the gradients of a forward
    that goes through the wrapper; calling `asr.CNN`, `asr.Transformer`... part by part would
    bypass it (and a DDP wrapper has no `.CNN`). As a ModuleDict its state_dict keys stay
    `CNN.*`, `Transformer.*`, `ctc_lin.*`, `seq_lin.*`.
    """

    def __init__(self, modules=None):
        super().__init__(modules)
        # Accept the bitmask-sparse tensors of a saved model (encode_sparse) wherever a state
        # dict is loaded, SpeechBrain's Pretrainer included.
        self._register_load_state_dict_pre_hook(_dense_entries)

    def forward(self, feats, tokens_bos, wav_lens, pad_idx=0, inter_ctc_layers=()):
        """Encoder output, CTC logits and decoder logits (teacher forcing on tokens_bos).

        With `inter_ctc_layers` (encoder layer numbers, 1 = the first), a fourth value: the CTC
        logits of each of those layers' outputs, through the encoder's final LayerNorm and the
        shared CTC head (Intermediate CTC, Lee and Watanabe 2021; ESPnet does the same). The
        layers' outputs are caught with forward hooks, inside this one call, so DDP sees them.
        """
        encoder = self["Transformer"].encoder
        problem = inter_ctc_problem(inter_ctc_layers, len(encoder.layers))
        if problem:
            raise ValueError(problem)
        caught = []
        hooks = [encoder.layers[number - 1].register_forward_hook(
                     lambda module, args, output: caught.append(output[0]))
                 for number in inter_ctc_layers]
        try:
            enc_out, dec_out = self["Transformer"](self["CNN"](feats), tokens_bos, wav_lens,
                                                   pad_idx=pad_idx)
        finally:
            for hook in hooks:
                hook.remove()
        outputs = (enc_out, self["ctc_lin"](enc_out), self["seq_lin"](dec_out))
        if not inter_ctc_layers:
            return outputs
        return outputs + ([self["ctc_lin"](encoder.norm(hidden)) for hidden in caught],)


def build_from_arch(arch):
    """`build_asr_modules(**arch)`, callable from YAML with the `arch` mapping as one argument."""
    return build_asr_modules(**arch)


# Which part of the model each state_dict key belongs to, by its leading module names.
_PARTS = (
    ("encoder", ("CNN.", "Transformer.encoder.", "Transformer.custom_src_module.")),
    ("decoder", ("Transformer.decoder.", "Transformer.custom_tgt_module.", "seq_lin.")),
    ("ctc", ("ctc_lin.",)),
)
GATE_KEY_MARK = "gate.logits"


def count_params(state_dict):
    """Counts parameters per model part from saved tensors (a state_dict of the ModuleDict).

    Gate logits are training-time tensors, not model weights: they are counted apart under
    `gate_logits`. `nonzero` and `encoder_nonzero` count the entries that are not exactly zero
    (all model parts, and the encoder's). Buffers that are not weights (positional tables, BatchNorm statistics)
    are not parameters and are skipped by the caller passing only parameters, or here by name.
    """
    counts = {"total": 0, "encoder": 0, "decoder": 0, "ctc": 0, "gate_logits": 0,
              "nonzero": 0, "encoder_nonzero": 0}
    for key, tensor in state_dict.items():
        if _is_buffer_key(key):
            continue
        if GATE_KEY_MARK in key:
            counts["gate_logits"] += tensor.numel()
            continue
        part = next((name for name, prefixes in _PARTS if key.startswith(prefixes)), None)
        if part is None:
            raise ValueError(f"count_params: no model part for tensor {key!r}")
        counts[part] += tensor.numel()
        counts["total"] += tensor.numel()
        # Unstructured methods leave zeros in full-size tensors: what they really keep.
        nonzero = int(torch.count_nonzero(tensor))
        counts["nonzero"] += nonzero
        if part == "encoder":
            counts["encoder_nonzero"] += nonzero
    return counts


def _is_buffer_key(key):
    """Positional-encoding tables and normalisation running statistics are not parameters."""
    return "positional_encoding" in key or key.endswith(
        ("running_mean", "running_var", "num_batches_tracked")
    )


def param_state(modules):
    """The parameters (no buffers) of a module, as a name -> tensor mapping."""
    return dict(modules.named_parameters())


# ----- sparse storage ------------------------------------------------------------------------
# Why by hand: torch's sparse layouts store an int64 index per non-zero (COO: one per dimension,
# CSR: one per entry), 8-16 bytes on top of each 4-byte value, so they only save space above
# 67-80% zeros; a bitmask costs 1 bit per entry and saves space from about 3% zeros.

SPARSE_FORMAT = "bitmask"


def encode_sparse(state, min_zero_fraction=0.1):
    """A state dict whose tensors with at least `min_zero_fraction` exact zeros are stored as
    {"format": "bitmask", "shape", "bits" (packed non-zero mask), "values" (the non-zeros)}."""
    encoded = {}
    for key, tensor in state.items():
        zeros = tensor.numel() - int(torch.count_nonzero(tensor)) if tensor.numel() else 0
        if tensor.is_floating_point() and tensor.numel() and zeros / tensor.numel() >= \
                min_zero_fraction:
            mask = (tensor != 0).flatten()
            encoded[key] = {
                "format": SPARSE_FORMAT,
                "shape": list(tensor.shape),
                "bits": torch.from_numpy(np.packbits(mask.numpy())),
                "values": tensor.flatten()[mask].clone(),
            }
        else:
            encoded[key] = tensor
    return encoded


def decode_sparse(state):
    """The plain state dict of `encode_sparse`'s output (tensors pass through)."""
    return {key: _dense(value) if _is_sparse(value) else value for key, value in state.items()}


def load_weights(path):
    """A saved model's state dict (model.ckpt), sparse entries made dense."""
    return decode_sparse(torch.load(path, map_location="cpu"))


def _is_sparse(value):
    return isinstance(value, dict) and value.get("format") == SPARSE_FORMAT


def _dense(entry):
    numel = int(np.prod(entry["shape"])) if entry["shape"] else 1
    mask = torch.from_numpy(np.unpackbits(entry["bits"].numpy(), count=numel).astype(bool))
    dense = torch.zeros(numel, dtype=entry["values"].dtype)
    dense[mask] = entry["values"]
    return dense.view(entry["shape"])


def _dense_entries(state_dict, prefix, *args):
    for key in [k for k in state_dict if k.startswith(prefix) and _is_sparse(state_dict[k])]:
        state_dict[key] = _dense(state_dict[key])
