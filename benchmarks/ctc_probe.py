"""How fast does a CTC model leave the all-blank plateau on a corpus? A diagnostic, not a recipe.

Trains a CTC-only model (the mini Conformer encoder, or a small BiGRU for reference) on fbank
features cached once in memory, with no decoder, no augmentation and no SpeechBrain Brain, so a
configuration can be tried in minutes on one core. Every `--every` updates it prints the greedy
CER/WER on 150 training utterances and on dev-clean (held-out voices, unseen sentences).

    python benchmarks/ctc_probe.py --corpus corpus --model conformer --tokens char
    python benchmarks/ctc_probe.py --corpus corpus --model bigru --tokens 128

docs/TRAINING.md gives what it measured and what the mini recipe took from it.
"""

import argparse
import random
import time
from pathlib import Path

import sentencepiece as spm
import torch
from speechbrain.augment.freq_domain import SpectrogramDrop, Warping
from speechbrain.dataio.dataio import read_audio
from speechbrain.decoders.ctc import ctc_greedy_decode
from speechbrain.lobes.features import Fbank
from speechbrain.nnet.losses import ctc_loss

from conformer_prune.model import build_asr_modules
from conformer_prune.prepare import read_transcript
from conformer_prune.scoring import error_rates


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", required=True, help="folder holding LibriSpeech/")
    parser.add_argument("--model", choices=["conformer", "bigru"], default="conformer")
    parser.add_argument("--tokens", default="char", help="'char' or a unigram vocabulary size")
    parser.add_argument("--cnn", default="16,32", help="front-end channels, one stride-2 block each")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak of the Noam schedule")
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16, help="utterances per update")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--specaug", action="store_true",
                        help="SpecAugment as the first mini recipe had it (2+2 masks, warping)")
    return parser.parse_args()


def load_split(corpus, split, fbank):
    """[(utterance id, fbank features, transcript)] of one split, in transcript order."""
    rows = []
    for trans in sorted((Path(corpus) / "LibriSpeech" / split).rglob("*.trans.txt")):
        speaker, chapter = trans.parent.parent.name, trans.parent.name
        for uid, (text, _) in read_transcript(trans, speaker, chapter).items():
            wav = read_audio(str(trans.parent / f"{uid}.flac"))
            rows.append((uid, fbank(wav[None])[0], text))
    return rows


def load_features(corpus):
    """Train and dev features, normalised with the train set's global mean and deviation;
    cached beside the corpus because computing them takes longer than 250 updates."""
    cache = Path(corpus) / "ctc_probe_fbank80.pt"
    if cache.exists():
        return torch.load(cache)
    fbank = Fbank(n_mels=80)
    data = {split: load_split(corpus, split, fbank) for split in ("train-clean-100", "dev-clean")}
    frames = torch.cat([feats for _, feats, _ in data["train-clean-100"]])
    mean, std = frames.mean(0), frames.std(0)
    data = {split: [(u, (f - mean) / std, t) for u, f, t in rows] for split, rows in data.items()}
    torch.save(data, cache)
    return data


def make_tokenizer(tokens, train, workdir):
    """(encode, decode, vocabulary size with the blank at 0)."""
    if tokens == "char":
        chars = sorted({c for _, _, text in train for c in text})
        return (lambda text: [chars.index(c) + 1 for c in text],
                lambda ids: "".join(chars[i - 1] for i in ids), len(chars) + 1)
    text_file = Path(workdir) / "ctc_probe_text.txt"
    text_file.write_text("\n".join(text for _, _, text in train))
    prefix = Path(workdir) / f"ctc_probe_unigram{tokens}"
    spm.SentencePieceTrainer.train(input=str(text_file), model_prefix=str(prefix),
                                   vocab_size=int(tokens), model_type="unigram", pad_id=0,
                                   unk_id=1, bos_id=-1, eos_id=-1, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=f"{prefix}.model")
    return sp.encode_as_ids, lambda ids: sp.decode_ids(list(ids)), int(tokens)


class BiGRU(torch.nn.Module):
    """The reference: two stride-2 convolutions (40 ms frames) and a 2-layer BiGRU of 192."""

    def __init__(self, vocab):
        super().__init__()
        self.conv = torch.nn.Sequential(
            torch.nn.Conv1d(80, 192, 5, 2, 2), torch.nn.ReLU(),
            torch.nn.Conv1d(192, 192, 5, 2, 2), torch.nn.ReLU())
        self.rnn = torch.nn.GRU(192, 192, 2, batch_first=True, bidirectional=True)
        self.out = torch.nn.Linear(384, vocab)

    def forward(self, feats, lengths):
        hidden = self.conv(feats.transpose(1, 2)).transpose(1, 2)
        return self.out(self.rnn(hidden)[0]).log_softmax(-1)


class ConformerCTC(torch.nn.Module):
    """The mini recipe's front end and Conformer encoder with its CTC head."""

    def __init__(self, vocab, cnn_channels, layers):
        super().__init__()
        self.asr = build_asr_modules(vocab, d_model=144, nhead=4, num_encoder_layers=layers,
                                     num_decoder_layers=1, d_ffn=576, kernel_size=15,
                                     cnn_channels=cnn_channels)

    def forward(self, feats, lengths):
        encoded = self.asr.Transformer.encode(self.asr.CNN(feats), lengths)
        return self.asr.ctc_lin(encoded).log_softmax(-1)


def spec_augment():
    """Two time masks and two frequency masks of 5-15 frames or bins, then time warping."""
    masks = dict(drop_length_low=5, drop_length_high=15, drop_count_low=2, drop_count_high=2,
                 replace="zeros")
    steps = [SpectrogramDrop(**masks), SpectrogramDrop(**masks, dim=2), Warping()]
    def augment(feats):
        for step in steps:
            feats = step(feats)
        return feats
    return augment


def batchify(items, encode):
    feats = torch.nn.utils.rnn.pad_sequence([f for _, f, _ in items], batch_first=True)
    lengths = torch.tensor([len(f) for _, f, _ in items], dtype=torch.float) / feats.shape[1]
    targets = [torch.tensor(encode(text)) for _, _, text in items]
    padded = torch.nn.utils.rnn.pad_sequence(targets, batch_first=True)
    target_lengths = torch.tensor([len(t) for t in targets], dtype=torch.float) / padded.shape[1]
    return feats, lengths, padded, target_lengths


def greedy_error_rates(model, items, encode, decode):
    """CER and WER (percent) of greedy CTC decoding over `items`."""
    model.eval()
    refs, hyps = [], []
    with torch.no_grad():
        for start in range(0, len(items), 32):
            chunk = items[start:start + 32]
            feats, lengths, _, _ = batchify(chunk, encode)
            for hyp in ctc_greedy_decode(model(feats, lengths), lengths, blank_id=0):
                hyps.append(decode([int(t) for t in hyp]) or "-")
            refs += [text for _, _, text in chunk]
    model.train()
    rates = error_rates(refs, hyps)
    return rates["cer"], rates["wer"]


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = random.Random(0)
    data = load_features(args.corpus)
    train, dev = data["train-clean-100"], data["dev-clean"]
    encode, decode, vocab = make_tokenizer(args.tokens, train, args.corpus)
    if args.model == "conformer":
        cnn = tuple(int(c) for c in args.cnn.split(","))
        model = ConformerCTC(vocab, cnn, args.layers)
    else:
        model = BiGRU(vocab)
    print(f"{args.model}, {args.tokens} tokens: {sum(p.numel() for p in model.parameters())} "
          f"parameters, {len(train)} train utterances", flush=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98),
                                  weight_decay=0.01)
    order = sorted(range(len(train)), key=lambda i: len(train[i][1]))
    batches = [order[i:i + args.batch] for i in range(0, len(order), args.batch)]
    probe = rng.sample(train, min(150, len(train)))
    augment = spec_augment() if args.specaug else (lambda feats: feats)
    step, losses, started = 0, [], time.perf_counter()
    while step < args.steps:
        rng.shuffle(batches)
        for batch in batches:
            step += 1
            feats, lengths, targets, target_lengths = batchify([train[i] for i in batch], encode)
            loss = ctc_loss(model(augment(feats), lengths), targets, lengths, target_lengths, blank_index=0)
            for group in optimizer.param_groups:  # Noam: linear warm-up, then 1/sqrt(step)
                group["lr"] = args.lr * min(step / args.warmup, (args.warmup / step) ** 0.5)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
            losses.append(loss.item())
            if step % args.every == 0 or step == args.steps:
                train_cer, train_wer = greedy_error_rates(model, probe, encode, decode)
                dev_cer, dev_wer = greedy_error_rates(model, dev, encode, decode)
                print(f"step {step} loss {sum(losses) / len(losses):.2f} | train CER "
                      f"{train_cer:.1f} WER {train_wer:.1f} | dev CER {dev_cer:.1f} WER "
                      f"{dev_wer:.1f} | {time.perf_counter() - started:.0f} s", flush=True)
                losses = []
            if step >= args.steps:
                break


if __name__ == "__main__":
    main()
