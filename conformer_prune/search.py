"""Joint CTC/attention beam search with a key/value cache in the attention decoder.

SpeechBrain's S2STransformerBeamSearcher runs `TransformerASR.decode` on the whole prefix at
every step, and projects the encoder states to keys and values again in every step and layer:
for 16 test-clean utterances of the mini model that is 84% of decoding, whatever the encoder's
size (benchmarks/decode_profile.py, docs/SPEED.md). SpeechBrain has a cache only for Whisper,
so this subclass keeps, per decoder layer, the self-attention keys and values of the prefix and
the cross-attention keys and values of the encoder states, and runs each step on the new position
only. The decoder is causal, so earlier positions' outputs do not change as the prefix grows:
the cached step computes the same function as the full pass (equal up to float rounding;
tests/test_search.py compares both searchers' hypotheses and scores).

Only post-norm and pre-norm SpeechBrain TransformerDecoderLayers over torch's
nn.MultiheadAttention (the decoder of TransformerASR with RelPosMHAXL encoder attention) are
supported; another decoder layout stops the search with NotImplementedError (`cacheable`).
"""

import torch
import torch.nn.functional as F
from speechbrain.decoders.seq2seq import S2STransformerBeamSearcher
from speechbrain.lobes.models.transformer.Transformer import TransformerDecoderLayer


class CachedTransformerBeamSearcher(S2STransformerBeamSearcher):
    """S2STransformerBeamSearcher whose decoder step reuses the previous steps' work; same
    arguments. `memory` between steps is a DecoderCache instead of the token prefix."""

    def permute_mem(self, memory, index):
        return memory.select_beams(index)

    def forward_step(self, inp_tokens, memory, enc_states, enc_lens):
        if memory is None:
            memory = DecoderCache(self.model, enc_states, enc_lens)
        hidden = memory.step(inp_tokens)
        log_probs = self.softmax(self.fc(hidden) / self.temperature)
        return log_probs, memory, None


def cacheable(model):
    """Whether `model` (a TransformerASR) has the decoder layout DecoderCache reproduces."""
    layers = getattr(getattr(model, "decoder", None), "layers", [])
    return bool(layers) and all(
        isinstance(layer, TransformerDecoderLayer)
        and isinstance(getattr(layer.self_attn, "att", None), torch.nn.MultiheadAttention)
        and isinstance(getattr(layer.multihead_attn, "att", None), torch.nn.MultiheadAttention)
        for layer in layers
    ) and getattr(model, "attention_type", "") in ("RelPosMHAXL", "regularMHA")


class DecoderCache:
    """Per-layer keys and values of a TransformerASR decoder for a batch of growing prefixes."""

    def __init__(self, model, enc_states, enc_lens):
        if not cacheable(model):
            raise NotImplementedError("DecoderCache: unsupported decoder layout")
        self.model = model
        self.position = 0
        self.self_kv = [None] * len(model.decoder.layers)
        # Encoder frames past each utterance's length are masked in the cross-attention, as
        # TransformerASR.decode masks them (length_to_mask of enc_lens).
        frames = torch.arange(enc_states.shape[1], device=enc_states.device)
        self.memory_mask = (frames[None, :] < enc_lens.float().round()[:, None]).view(
            enc_states.shape[0], 1, 1, -1)
        self.cross_kv = [self._project_memory(layer.multihead_attn.att, enc_states)
                         for layer in model.decoder.layers]

    def select_beams(self, index):
        """The cache of the hypotheses the beam search kept, in its new order."""
        self.self_kv = [(k.index_select(0, index), v.index_select(0, index))
                        for k, v in self.self_kv]
        # The cross-attention cache is the same for every beam of an utterance, and beams
        # are only ever reordered within their utterance: it stays as it is.
        return self

    def step(self, tokens):
        """Decoder output (batch, d_model) at the next position, given its input tokens."""
        model = self.model
        x = model.custom_tgt_module(tokens.unsqueeze(1))
        if model.attention_type == "RelPosMHAXL":
            pe = model.positional_encoding_decoder.pe
        else:
            pe = model.positional_encoding.pe
        x = x + pe[:, self.position: self.position + 1].to(x.dtype)
        for i, layer in enumerate(model.decoder.layers):
            x = self._layer_step(i, layer, x)
        self.position += 1
        return model.decoder.norm(x).squeeze(1)

    def _layer_step(self, i, layer, x):
        pre = layer.normalize_before
        h = layer.norm1(x) if pre else x
        att = layer.self_attn.att
        q, k, v = F.linear(h, att.in_proj_weight, att.in_proj_bias).chunk(3, dim=-1)
        k, v = _heads(k, att.num_heads), _heads(v, att.num_heads)
        if self.self_kv[i] is not None:
            k = torch.cat([self.self_kv[i][0], k], dim=2)
            v = torch.cat([self.self_kv[i][1], v], dim=2)
        self.self_kv[i] = (k, v)
        x = x + _attend(att, q, k, v, None)
        if not pre:
            x = layer.norm1(x)

        h = layer.norm2(x) if pre else x
        att = layer.multihead_attn.att
        dim = att.embed_dim
        q = F.linear(h, att.in_proj_weight[:dim], att.in_proj_bias[:dim])
        x = x + _attend(att, q, *self.cross_kv[i], self.memory_mask)
        if not pre:
            x = layer.norm2(x)

        h = layer.norm3(x) if pre else x
        x = x + layer.pos_ffn(h)
        return x if pre else layer.norm3(x)

    @staticmethod
    def _project_memory(att, enc_states):
        dim = att.embed_dim
        k = F.linear(enc_states, att.in_proj_weight[dim: 2 * dim], att.in_proj_bias[dim: 2 * dim])
        v = F.linear(enc_states, att.in_proj_weight[2 * dim:], att.in_proj_bias[2 * dim:])
        return _heads(k, att.num_heads), _heads(v, att.num_heads)


def _heads(x, heads):
    """(batch, time, heads * width) -> (batch, heads, time, width)."""
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def _attend(att, q, k, v, mask):
    """torch.nn.MultiheadAttention's attention and output projection for queries
    (batch, 1, embed_dim) against per-head keys and values; `mask` True where a key counts."""
    context = F.scaled_dot_product_attention(_heads(q, att.num_heads), k, v, attn_mask=mask)
    return att.out_proj(context.transpose(1, 2).reshape(q.shape[0], 1, -1))
