#!/usr/bin/env python3
"""Trains the character language model that the recognisers' beam search fuses.

    python train_lm.py hparams/mini/lm_char.yaml --data_folder corpus

SpeechBrain's stages, as in its LibriSpeech LM recipe: prepare -> tokenizer (the recognisers'
settings, so the same ids) -> fit (next-character NLL on the LM text and the train transcripts,
dev-clean's transcripts for validation) -> the LM folder: lm.ckpt (the checkpoint with the
lowest dev loss), lm.json (its arch and how it was trained), tokenizer.ckpt
(conformer_prune/lm.py). Run again, it resumes, or with every epoch done only writes the folder
again; other settings in a finished folder stop it (docs/RELIABILITY.md).
"""

import csv
import json
import shutil
import sys
import time
from pathlib import Path

import speechbrain as sb
import torch
from hyperpyyaml import load_hyperpyyaml
from speechbrain.dataio.sampler import DynamicBatchSampler

from conformer_prune.asr_brain import (
    EpochSamplerBrain,
    load_tokenizer,
    text_pipeline,
    tokenizer_model_path,
    train_tokenizer,
)
from conformer_prune.checkpoints import FREE_ON_RESUME, check_same_hparams
from conformer_prune.errors import InputError, print_input_error
from conformer_prune.lm import LM_INFO, LM_TOKENIZER, LM_WEIGHTS, lm_sentences
from conformer_prune.prepare import prepare_librispeech


class LMBrain(EpochSamplerBrain):
    """Next-token prediction: tokens with <bos> in front predict tokens with <eos> after.
    EpochSamplerBrain: the length buckets are drawn anew every epoch, as the recognisers' are."""

    def compute_forward(self, batch, stage):
        batch = batch.to(self.device)
        tokens_bos, _ = batch.tokens_bos
        logits, _ = self.modules.lm(tokens_bos)  # (logits, hidden): built for the scorer
        return self.hparams.log_softmax(logits)

    def compute_objectives(self, predictions, batch, stage):
        tokens_eos, lengths = batch.tokens_eos
        return sb.nnet.losses.nll_loss(predictions, tokens_eos, length=lengths)

    def on_stage_end(self, stage, stage_loss, epoch=None):
        if stage == sb.Stage.TRAIN:
            self.train_loss = stage_loss
            return
        # nats per token: per character, word boundary and end of sentence
        stats = {"loss": stage_loss}
        self.hparams.train_logger.log_stats({"epoch": epoch}, train_stats={"loss": self.train_loss},
                                            valid_stats=stats)
        self.checkpointer.save_and_keep_only(meta=stats, min_keys=["loss"])


def transcripts(csv_path):
    """The `wrd` column of a prepared CSV."""
    with open(csv_path, newline="", encoding="utf-8") as f:
        return [row["wrd"] for row in csv.DictReader(f)]


def dataio_prepare(hparams, tokenizer):
    """(train, valid) datasets of token sequences, and how many LM sentences were skipped."""
    sentences, skipped = lm_sentences(transcripts(hparams["train_csv"]), hparams["lm_text"],
                                      tokenizer)
    train = sb.dataio.dataset.DynamicItemDataset(
        {f"lm{i:06d}": {"wrd": sentence} for i, sentence in enumerate(sentences)})
    valid = sb.dataio.dataset.DynamicItemDataset.from_csv(csv_path=hparams["valid_csv"])
    pipeline = text_pipeline(tokenizer, hparams["bos_index"], hparams["eos_index"])
    for data in (train, valid):
        data.add_dynamic_item(pipeline)
        data.set_output_keys(["id", "tokens_bos", "tokens_eos"])
    if "dynamic_batching" in hparams:
        # Sentences run from 3 to 40 words: batches of similar length pad far less.
        hparams["train_dataloader_opts"]["batch_sampler"] = DynamicBatchSampler(
            train, length_func=lambda sentence: len(sentence["wrd"]) + 1,
            **hparams["dynamic_batching"])
    return train, valid, len(sentences), skipped


def export_lm(hparams, brain, info):
    """The LM folder: the best checkpoint's weights, the tokenizer, lm.json (written last)."""
    out = Path(hparams["output_folder"])
    brain.checkpointer.recover_if_possible(min_key="loss")
    torch.save(brain.modules.lm.state_dict(), out / LM_WEIGHTS)
    shutil.copyfile(tokenizer_model_path(hparams), out / LM_TOKENIZER)
    with open(out / LM_INFO, "w", encoding="utf-8") as f:
        json.dump({"arch": hparams["lm_arch"], **info}, f, indent=1)


def main(argv):
    if not sys.stderr.isatty() and "--noprogressbar" not in argv:
        argv = [*argv, "--noprogressbar"]  # a log file gets no redrawn progress bar
    hparams_file, run_opts, overrides = sb.parse_arguments(argv)
    with open(hparams_file, encoding="utf-8") as fin:
        hparams = load_hyperpyyaml(fin, overrides)
    torch.set_num_threads(hparams.get("num_threads") or torch.get_num_threads())
    check_same_hparams(hparams["output_folder"], hparams_file, overrides, FREE_ON_RESUME)
    sb.create_experiment_directory(experiment_directory=hparams["output_folder"],
                                   hyperparams_to_save=hparams_file, overrides=overrides)
    prepare_librispeech(data_folder=hparams["data_folder"], save_folder=hparams["prepare_folder"],
                        splits=hparams["train_splits"] + hparams["dev_splits"])
    train_tokenizer(hparams)
    tokenizer = load_tokenizer(hparams)
    train, valid, sentences, skipped = dataio_prepare(hparams, tokenizer)
    print(f"LM text: {sentences} sentences ({skipped} skipped: characters the recognisers' "
          f"tokenizer does not have)", flush=True)

    brain = LMBrain(modules=hparams["modules"], opt_class=hparams["optimizer"], hparams=hparams,
                    run_opts=run_opts, checkpointer=hparams["checkpointer"])
    started = time.perf_counter()
    brain.fit(hparams["epoch_counter"], train, valid,
              train_loader_kwargs=hparams["train_dataloader_opts"],
              valid_loader_kwargs=hparams["valid_dataloader_opts"])
    best = brain.checkpointer.find_checkpoint(min_key="loss")
    export_lm(hparams, brain, {
        "epochs": hparams["epoch_counter"].current,
        "valid_loss_nats_per_token": best.meta["loss"] if best else None,
        "sentences": sentences, "skipped_sentences": skipped,
        "lm_text": hparams["lm_text"] and str(hparams["lm_text"]),
        "fit_seconds_this_call": time.perf_counter() - started,
    })
    print(f"wrote {hparams['output_folder']}: {LM_WEIGHTS}, {LM_INFO}, {LM_TOKENIZER}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except InputError as err:
        # Bad input (docs/RELIABILITY.md): one line naming the item, not a traceback.
        sys.exit(print_input_error(err))
