"""Recognition with a compact model folder through SpeechBrain's inference interface.

`CompactASR` is SpeechBrain's `EncoderDecoderASR` loaded from a folder that
`conformer-prune shrink` wrote (its hyperparams.yaml builds the model, features and searcher),
with a choice of search, because where decode time goes depends on it:

- `joint`: the folder's joint CTC/attention beam search (SpeechBrain's
  S2STransformerBeamSearcher with a CTC prefix scorer), with the run's beam size and CTC
  weight: the search the training recipe scores with. It runs the attention decoder once per
  output character for every hypothesis, over the whole prefix each time.
- `rescore`: SpeechBrain's CTC prefix beam search gives an n-best list from the CTC head alone,
  then one batched, teacher-forced pass of the attention decoder scores every hypothesis, and
  the best of `ctc_weight * ctc + (1 - ctc_weight) * attention` (log probabilities) wins
  (attention rescoring, as in WeNet and ESPnet). One decoder pass instead of one per character.
- `greedy`: the CTC head's best path; no decoder at all.

With an `lm_weight` above 0 (the folder's, or load_compact_asr's argument) the joint search
adds the character LM's scores at every step (conformer_prune/lm.py) and the rescore search adds
`lm_weight * LM` to each hypothesis's score, from one teacher-forced pass of the LM.
"""

import torch
from speechbrain.decoders.ctc import CTCPrefixBeamSearcher, ctc_greedy_decode
from speechbrain.inference.ASR import EncoderDecoderASR

from conformer_prune.errors import InputError
from conformer_prune.lm import attach_lm, load_lm, quantize_lm_int8
from conformer_prune.shrink import RaggedRelPosMHAXL

SEARCHES = ("joint", "rescore", "greedy")


class CompactASR(EncoderDecoderASR):
    """EncoderDecoderASR for a compact folder; `search` is one of SEARCHES.

        asr = CompactASR.from_hparams(source=folder, savedir=folder, search="rescore",
                                      run_opts={"device": "cpu"}, overrides={"beam_size": 4})
        texts, tokens = asr.transcribe_batch(wavs, wav_lens)
    """

    def __init__(self, *args, search="joint", **kwargs):
        super().__init__(*args, **kwargs)
        if search not in SEARCHES:
            raise ValueError(f"search {search!r}: expected one of {', '.join(SEARCHES)}")
        self.search = search
        self.pieces = self.tokenizer.get_piece_size()
        self._prefix_searcher = None
        self.lm, self.lm_weight = None, 0.0  # load_compact_asr sets the folder's LM

    @property
    def model(self):
        """The ConformerASR whose weights the folder loaded."""
        return self.hparams.asr

    def transcribe_batch(self, wavs, wav_lens):
        """(texts, token id lists) of a padded batch; wav_lens relative, as in SpeechBrain."""
        tokens, _ = self.transcribe_with_greedy(wavs, wav_lens)
        return self.detokenize(tokens), tokens

    def transcribe_with_greedy(self, wavs, wav_lens):
        """(token ids of the chosen search, token ids of the CTC best path) of a batch: the
        second comes almost free with the first, and results.json reports both."""
        with torch.no_grad():
            wavs, wav_lens = wavs.to(self.device), wav_lens.to(self.device)
            encoded = self.encode_batch(wavs, wav_lens)
            log_probs = torch.log_softmax(self.hparams.ctc_lin(encoded), dim=-1)
            greedy = ctc_greedy_decode(log_probs, wav_lens, blank_id=self.hparams.blank_index)
            if self.search == "greedy":
                return greedy, greedy
            if self.search == "joint":
                hyps, _, _, _ = self.mods.decoder(encoded, wav_lens)
                return [list(map(int, hyp)) for hyp in hyps], greedy
            return self.rescore(encoded, wav_lens, self.ctc_nbest(log_probs, wav_lens)), greedy

    def detokenize(self, token_lists):
        """Texts of token id lists. An id the tokenizer does not have (the output layer may be
        wider than the character set) is dropped: SentencePiece would raise on it."""
        return [self.tokenizer.decode_ids([t for t in tokens if 0 <= t < self.pieces])
                for tokens in token_lists]

    # ------------------------------------------------------------------ rescore search

    def ctc_nbest(self, log_probs, wav_lens):
        """Per utterance, up to beam_size (CTC log probability, token ids) from SpeechBrain's
        CTC prefix beam search, best first."""
        if self._prefix_searcher is None:
            vocab = [self.tokenizer.id_to_piece(i) for i in range(self.pieces)]
            self._prefix_searcher = CTCPrefixBeamSearcher(
                blank_index=self.hparams.blank_index, vocab_list=vocab,
                beam_size=self.hparams.beam_size, topk=self.hparams.beam_size)
        hyps = self._prefix_searcher(log_probs[:, :, : self.pieces].float().cpu(), wav_lens.cpu())
        return [[(hyp.score, self.tokenizer.encode_as_ids(hyp.text)) for hyp in utterance]
                for utterance in hyps]

    def rescore(self, encoded, wav_lens, nbest):
        """The best hypothesis of each n-best list by CTC and attention score together; all
        hypotheses of the batch go through the decoder in one teacher-forced pass."""
        flat = [(i, ctc, ids) for i, hyps in enumerate(nbest) for ctc, ids in hyps]
        if not flat:
            return [[] for _ in nbest]
        attention = self.attention_scores(encoded, wav_lens, [i for i, _, _ in flat],
                                          [ids for _, _, ids in flat])
        token_lists = [ids for _, _, ids in flat]
        lm = (self.lm_scores(token_lists) if self.lm_weight > 0
              else torch.zeros(len(flat))).tolist()
        weight = self.hparams.ctc_weight
        best = [(-float("inf"), []) for _ in nbest]
        for (i, ctc, ids), att, lm_score in zip(flat, attention.tolist(), lm):
            score = weight * ctc + (1 - weight) * att + self.lm_weight * lm_score
            if score > best[i][0]:
                best[i] = (score, ids)
        return [ids for _, ids in best]

    def _teacher_forced(self, token_lists):
        """(inputs <bos> + ids, targets ids + <eos>, mask) of hypotheses, padded."""
        bos, eos = self.hparams.bos_index, self.hparams.eos_index
        longest = max(len(ids) for ids in token_lists) + 1
        inputs = torch.zeros(len(token_lists), longest, dtype=torch.long)
        targets = torch.zeros(len(token_lists), longest, dtype=torch.long)
        mask = torch.zeros(len(token_lists), longest)
        for j, ids in enumerate(token_lists):
            inputs[j, : len(ids) + 1] = torch.tensor([bos, *ids])
            targets[j, : len(ids) + 1] = torch.tensor([*ids, eos])
            mask[j, : len(ids) + 1] = 1
        return inputs, targets, mask

    def lm_scores(self, token_lists):
        """log P_LM(tokens + eos) of each hypothesis, in one pass of the LM."""
        inputs, targets, mask = self._teacher_forced(token_lists)
        with torch.no_grad():
            logits, _ = self.lm(inputs.to(self.device))
        log_probs = torch.log_softmax(logits, dim=-1).cpu()
        return (log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * mask).sum(dim=1)

    def attention_scores(self, encoded, wav_lens, utterance, token_lists):
        """log P_attention(tokens + eos | audio) of each hypothesis, in one decoder pass;
        `utterance[j]` is the batch row hypothesis j belongs to."""
        inputs, targets, mask = self._teacher_forced(token_lists)
        rows = torch.tensor(utterance, device=encoded.device)
        enc_lens = torch.round(wav_lens.index_select(0, rows) * encoded.shape[1]).int()
        # decode() masks frames past each length up to the longest length it is given: the
        # frames past that are padding of every row here, and would not be masked.
        memory = encoded.index_select(0, rows)[:, : int(enc_lens.max())]
        # Padding after a hypothesis cannot reach its own positions: the decoder is causal.
        decoded, _ = self.hparams.Transformer.decode(inputs.to(encoded.device), memory, enc_lens)
        log_probs = torch.log_softmax(self.hparams.seq_lin(decoded), dim=-1).cpu()
        picked = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return (picked * mask).sum(dim=1)


def load_compact_asr(model_dir, search="joint", device="cpu", overrides=None, int8=False,
                     lm_weight=None, lm_folder=None):
    """CompactASR of a folder written by `conformer-prune shrink`, weights loaded offline;
    `int8` quantises it (quantize_int8, and the LM: lm.quantize_lm_int8; CPU only). The joint
    search fuses the folder's LM (or `lm_folder`'s) with the folder's `lm_weight`, or with
    `lm_weight` when given (0: no LM)."""
    if int8 and not str(device).startswith("cpu"):
        raise InputError(f"int8 runs on the CPU only (PyTorch dynamic quantisation), not on "
                         f"device {device}")
    asr = CompactASR.from_hparams(source=str(model_dir), savedir=str(model_dir),
                                  run_opts={"device": device}, overrides=overrides or {},
                                  search=search)
    if int8:
        quantize_int8(asr.model)
    weight = getattr(asr.hparams, "lm_weight", 0.0) if lm_weight is None else lm_weight
    asr.lm_weight = float(weight or 0.0) if search != "greedy" else 0.0
    if asr.lm_weight > 0:
        asr.lm = load_lm(lm_folder or model_dir, asr.tokenizer).to(asr.device)
        if int8:
            quantize_lm_int8(asr.lm)
        if search == "joint":
            attach_lm(asr.mods.decoder, asr.lm, asr.lm_weight)
    return asr


def quantize_int8(model):
    """PyTorch's dynamic int8 quantisation of the encoder's and the CTC head's nn.Linear layers,
    in place: weights stored as int8, activations quantised per call at run time. That covers
    the encoder's FFNs and the convolution modules' output Linear. The attention projections
    stay float (the compact encoder reads its packed projections as weights), and so does the
    attention decoder: its steps run one position per hypothesis, where quantising the
    activations at every call cost more than it saved (docs/SPEED.md, the speed table)."""
    ragged = [name for name, module in model.named_modules()
              if isinstance(module, RaggedRelPosMHAXL)]
    names = {name for name, module in model.named_modules()
             if type(module) is torch.nn.Linear
             and name.startswith(("CNN.", "Transformer.encoder.", "ctc_lin."))
             and not any(name.startswith(prefix + ".") for prefix in ragged)}
    return torch.ao.quantization.quantize_dynamic(model, names, dtype=torch.qint8, inplace=True)
