"""The training recipe's parts: the Brain subclass, the data pipelines and the tokenizer.

They live in the package rather than in train.py so that `conformer-prune decode` evaluates a
compact model with exactly the code that evaluated the run. Model transforms (gates, shrink) do
not import this module.
"""

import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import speechbrain as sb
import torch
from speechbrain.core import INTRA_EPOCH_CKPT_FLAG
from speechbrain.dataio.sampler import DynamicBatchSampler
from speechbrain.decoders.ctc import ctc_greedy_decode
from speechbrain.nnet.schedulers import WarmCoolDecayLRSchedule
from speechbrain.tokenizers.SentencePiece import SentencePiece
from speechbrain.utils.distributed import if_main_process

from conformer_prune.errors import InputError
from conformer_prune.methods import Dense
from conformer_prune.progress import LineProgress
from conformer_prune.scoring import error_rates, write_alignments

logger = logging.getLogger(__name__)
_PARALLEL_WRAPPERS = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)


class EpochSamplerBrain(sb.core.Brain):
    """A Brain that tells a batch sampler handed to it (dynamic batching) which epoch it is.
    SpeechBrain does so only for the samplers it made itself; without it a DynamicBatchSampler
    draws its batches from seed + 0 every epoch, the same batches in the same order."""

    def _train_loader_specifics(self, dataset, loader_kwargs):
        loader_kwargs = super()._train_loader_specifics(dataset, loader_kwargs)
        batch_sampler = loader_kwargs.get("batch_sampler")
        if self.train_sampler is None and hasattr(batch_sampler, "set_epoch"):
            self.train_sampler = batch_sampler
        return loader_kwargs


@sb.utils.checkpoints.register_checkpoint_hooks  # its own _save/_recover below
class ASRBrain(EpochSamplerBrain):
    """Conformer CTC/attention training with the YAML's pruning method (`method`, see
    conformer_prune/methods/base.py for the hooks it calls), and decoding that records timing
    for results.json."""

    # Set by init_progress_clock (train.py) and updated in training; defaults for decoding.
    total_train_steps = 0
    batches_per_epoch = 0
    regulariser_sum, regulariser_batches = 0.0, 0

    @property
    def method(self):
        """The YAML's pruning method; plain training when it declares none (decoding)."""
        method = getattr(self.hparams, "method", None)
        if method is None:
            method = self.hparams.method = Dense()
        return method

    @property
    def plain_modules(self):
        """The Brain's modules without their DDP wrappers: what the method's hooks inspect and
        change (gate logits, masks). The wrapped ones share the same parameters."""
        return torch.nn.ModuleDict({name: getattr(module, "module", module)
                                    if isinstance(module, _PARALLEL_WRAPPERS) else module
                                    for name, module in self.modules.items()})

    def compute_forward(self, batch, stage):
        batch = batch.to(self.device)
        wavs, wav_lens = batch.sig
        tokens_bos, _ = batch.tokens_bos
        wav_augment, fea_augment = self._augmenters(stage)
        if wav_augment is not None:
            wavs, wav_lens = wav_augment(wavs, wav_lens)
            tokens_bos = wav_augment.replicate_labels(tokens_bos)

        feats = self.hparams.compute_features(wavs)
        feats = self.modules.normalize(feats, wav_lens, epoch=self.hparams.epoch_counter.current)
        if fea_augment is not None:
            feats, wav_lens = fea_augment(feats, wav_lens)
            tokens_bos = fea_augment.replicate_labels(tokens_bos)

        # One call through the model (and its DDP wrapper under torchrun): see ConformerASR.
        inter_layers = self._inter_ctc_layers(stage)
        enc_out, ctc_logits, seq_logits, *inter_logits = self.modules.asr(
            feats, tokens_bos, wav_lens, pad_idx=self.hparams.pad_index,
            inter_ctc_layers=inter_layers)
        p_ctc = self.hparams.log_softmax(ctc_logits)
        p_seq = self.hparams.log_softmax(seq_logits)
        p_inter = [self.hparams.log_softmax(logits) for logits in inter_logits[0]] \
            if inter_logits else []

        hyps = None
        if stage == sb.Stage.TEST:
            hyps, _, _, _ = self.hparams.test_search(enc_out.detach(), wav_lens)
        return p_ctc, p_seq, wav_lens, hyps, p_inter

    def _inter_ctc_layers(self, stage):
        """The encoder layers whose outputs get a CTC loss of their own in training
        (`inter_ctc_layers` of the YAML; none when it declares none). Only the training loss
        uses them, so evaluation does not compute them."""
        if stage != sb.Stage.TRAIN or not getattr(self.hparams, "inter_ctc_weight", 0):
            return ()
        return tuple(getattr(self.hparams, "inter_ctc_layers", None) or ())

    def _ctc_loss(self, p_ctc, p_inter, tokens, wav_lens, tokens_lens):
        """The CTC loss of the encoder output, mixed with the mean of the intermediate layers'
        CTC losses by `inter_ctc_weight` when there are any (ESPnet's interctc_weight)."""
        loss = self.hparams.ctc_cost(p_ctc, tokens, wav_lens, tokens_lens).sum()
        if not p_inter:
            return loss
        inter = sum(self.hparams.ctc_cost(p, tokens, wav_lens, tokens_lens).sum()
                    for p in p_inter) / len(p_inter)
        weight = self.hparams.inter_ctc_weight
        return (1 - weight) * loss + weight * inter

    def compute_objectives(self, predictions, batch, stage):
        p_ctc, p_seq, wav_lens, hyps, p_inter = predictions
        tokens_eos, tokens_eos_lens = batch.tokens_eos
        tokens, tokens_lens = batch.tokens
        # Augmenters that add copies of the batch need the labels copied to match.
        for augment in self._augmenters(stage):
            if augment is not None:
                tokens_eos = augment.replicate_labels(tokens_eos)
                tokens_eos_lens = augment.replicate_labels(tokens_eos_lens)
                tokens = augment.replicate_labels(tokens)
                tokens_lens = augment.replicate_labels(tokens_lens)

        loss_seq = self.hparams.seq_cost(p_seq, tokens_eos, length=tokens_eos_lens).sum()
        loss_ctc = self._ctc_loss(p_ctc, p_inter, tokens, wav_lens, tokens_lens)
        loss = self.hparams.ctc_weight * loss_ctc + (1 - self.hparams.ctc_weight) * loss_seq

        if stage == sb.Stage.TRAIN:
            penalty = self.method.penalty(self.plain_modules, self.training_progress())
            if penalty is None:
                return loss
            self.regulariser_sum += penalty.detach().item()
            self.regulariser_batches += 1
            return loss + penalty

        if stage != sb.Stage.TRAIN:
            greedy = ctc_greedy_decode(p_ctc, wav_lens, blank_id=self.hparams.blank_index)
            self.greedy_hyps.extend(self._detokenize(greedy))
            self.references.extend(batch.wrd)
            self.ids.extend(batch.id)
            if hyps is not None:
                self.beam_hyps.extend(self._detokenize(hyps))
        return loss

    def init_optimizers(self):
        """The model's optimizer over every parameter that the method's own optimizers
        (`method.optimizers`, e.g. the gate logits') do not take; each is checkpointed."""
        extra = self.method.optimizers(self.plain_modules)
        if not extra:
            super().init_optimizers()
            self._hook_method_after_optimizer_step()
            return
        owned = {id(p) for opt in extra.values() for group in opt.param_groups
                 for p in group["params"]}
        model_params = [p for p in self.modules.parameters() if id(p) not in owned]
        self.optimizer = self.opt_class(model_params)
        self.optimizers_dict = {"model": self.optimizer, **extra}
        if self.checkpointer is not None:
            self.checkpointer.add_recoverable("optimizer", self.optimizer)
            for name, optimizer in extra.items():
                self.checkpointer.add_recoverable(name, optimizer)
        self._hook_method_after_optimizer_step()

    def _hook_method_after_optimizer_step(self):
        """Calls the method's `after_optimizer_step` after each step of the model optimiser,
        before SpeechBrain clears the gradients (PyTorch's optimiser step hook)."""
        def hook(optimizer, args, kwargs):
            # The step being finished counts: progress as it is once optimizer_step is updated.
            progress = min(1.0, (self.optimizer_step + 1) / max(1, self.total_train_steps))
            self.method.after_optimizer_step(self.plain_modules, progress)

        if getattr(self, "_after_step_hook", None) is not None:
            self._after_step_hook.remove()
        self._after_step_hook = self.optimizer.register_step_post_hook(hook)

    def _train_loader_specifics(self, dataset, loader_kwargs):
        """Under torchrun with a batch sampler (dynamic batching), every rank takes its share of
        each of the single-process run's batches (SplitBatchesAcrossRanks), so that N processes
        train on the same global batches, with the same number of steps, as one process.
        SpeechBrain's own wrapper would instead hand whole batches to the ranks in turn: each
        step then averages N different batches and there are N times fewer steps per epoch."""
        batch_sampler = loader_kwargs.get("batch_sampler")
        if not self.distributed_launch or batch_sampler is None:
            return super()._train_loader_specifics(dataset, loader_kwargs)  # EpochSamplerBrain
        self.train_sampler = SplitBatchesAcrossRanks(
            batch_sampler, torch.distributed.get_rank(), torch.distributed.get_world_size())
        loader_kwargs["batch_sampler"] = self.train_sampler
        return loader_kwargs

    # ----- checkpointed state ---------------------------------------------------------------

    @sb.utils.checkpoints.mark_as_saver
    def _save(self, path):
        """SpeechBrain's step counters and running loss, plus what a resume inside an epoch
        needs to go on exactly: the schedule clock's length and the regulariser's running sum."""
        state = {
            "step": self.step,
            "avg_train_loss": self.avg_train_loss,
            "optimizer_step": self.optimizer_step,
            "total_train_steps": self.total_train_steps,
            "regulariser_sum": self.regulariser_sum,
            "regulariser_batches": self.regulariser_batches,
        }
        Path(path).write_text(json.dumps(state), encoding="utf-8")

    @sb.utils.checkpoints.mark_as_loader
    def _recover(self, path, end_of_epoch):
        text = Path(path).read_text(encoding="utf-8")
        try:
            state = json.loads(text)
        except json.JSONDecodeError:
            # A checkpoint written by SpeechBrain's own Brain._save (YAML).
            return super()._recover(path, end_of_epoch)
        self.step, self.avg_train_loss = state["step"], state["avg_train_loss"]
        self.optimizer_step = state["optimizer_step"]
        self.regulariser_sum = state.get("regulariser_sum", 0.0)
        self.regulariser_batches = state.get("regulariser_batches", 0)
        saved_total = state.get("total_train_steps")
        if saved_total and saved_total != self.total_train_steps:
            # The schedules (gate target, budget) run on this clock: a resume with another
            # number_of_epochs must not move them.
            logger.warning(
                "%s: the run was started with %d optimiser steps in all; this start computes "
                "%d (another number_of_epochs or batch setting?). The schedules keep the "
                "checkpoint's %d.", path, saved_total, self.total_train_steps, saved_total)
            self.total_train_steps = saved_total

    # ----- helpers -----------------------------------------------------------------------

    def _augmenters(self, stage):
        """The waveform and feature augmenters for this stage (None when off or not training,
        or before the epoch `augment_from_epoch`: on a small corpus augmentation from the
        start holds the model on the blank plateau, docs/TRAINING.md)."""
        first_epoch = getattr(self.hparams, "augment_from_epoch", 1)
        if stage != sb.Stage.TRAIN or self.hparams.epoch_counter.current < first_epoch:
            return None, None
        return (getattr(self.hparams, "wav_augment", None),
                getattr(self.hparams, "fea_augment", None))

    def training_progress(self):
        """Fraction of all optimiser steps done: the clock of the regulariser's target c(t)."""
        return min(1.0, self.optimizer_step / max(1, self.total_train_steps))

    def _detokenize(self, token_seqs):
        """Token ids to upper-case words. Ids past the tokenizer's last piece are dropped: with
        characters the model has more outputs (`output_neurons`) than the corpus has symbols,
        those outputs are never targets, and only an untrained model emits them."""
        pieces = self.tokenizer.get_piece_size()
        return [self.tokenizer.decode_ids([int(t) for t in seq if int(t) < pieces]).upper()
                for seq in token_seqs]

    # ----- stage hooks ---------------------------------------------------------------------

    def on_stage_start(self, stage, epoch=None):
        self.ids, self.references, self.greedy_hyps, self.beam_hyps = [], [], [], []
        if stage != sb.Stage.TRAIN or self.step == 0:
            # (self.step > 0 here: resumed inside an epoch, the sums came from the checkpoint)
            self.regulariser_sum, self.regulariser_batches = 0.0, 0
        self.stage_started = time.perf_counter()
        self.progress_lines = None
        if stage == sb.Stage.TRAIN and self.noprogressbar and if_main_process():
            # No tqdm bar (stderr is a log file): a plain line every minute or 10% instead.
            self.progress_lines = LineProgress(
                getattr(self, "batches_per_epoch", 0), f"epoch {epoch} train", "batch",
                sys.stderr, every_seconds=60.0, every_percent=10.0)

    def on_stage_end(self, stage, stage_loss, epoch=None):
        if stage == sb.Stage.TRAIN:
            if self.progress_lines is not None:
                self.progress_lines.close()
            self.train_stats = {"loss": stage_loss}
            if self.regulariser_batches:
                self.train_stats["regulariser"] = self.regulariser_sum / self.regulariser_batches
            return
        if stage == sb.Stage.VALID:
            self._end_valid_epoch(stage_loss, epoch)
        else:
            self._end_test(stage_loss)

    def _end_valid_epoch(self, stage_loss, epoch):
        rates = error_rates(self.references, self.greedy_hyps)
        self.method.after_validation(self.plain_modules, self.training_progress(), rates)
        valid_stats = {"loss": stage_loss, "WER": rates["wer"], "CER": rates["cer"]}
        lr = self.optimizer.param_groups[0]["lr"]
        entry = {
            "epoch": epoch,
            "lr": lr,
            "train_loss": self.train_stats["loss"],
            "valid_loss": stage_loss,
            "valid_wer": rates["wer"],
            "valid_cer": rates["cer"],
            "epoch_seconds": time.perf_counter() - self.epoch_started,
        }
        entry.update(self._gate_entry())
        # log_stats is SpeechBrain's main_process_only: it broadcasts, so every rank calls it.
        self.hparams.train_logger.log_stats(
            stats_meta={"epoch": epoch, "lr": lr, "steps": self.optimizer_step},
            train_stats=self.train_stats,
            valid_stats=valid_stats,
        )
        if if_main_process():
            self._log_gates(entry)
            # Before the checkpoint: a run killed between the two trains the epoch again and
            # replaces this line (write_history_entry); after it, the line would be lost.
            write_history_entry(self.hparams.history_file, entry)
        self.checkpointer.save_and_keep_only(
            meta={"WER": rates["wer"], "epoch": epoch},
            num_to_keep=self.hparams.keep_checkpoints,
            ckpt_predicate=lambda ckpt: INTRA_EPOCH_CKPT_FLAG not in ckpt.meta,
        )
        # The epoch's own checkpoint supersedes the ones taken inside it.
        self.checkpointer.delete_checkpoints(
            num_to_keep=0, ckpt_predicate=lambda ckpt: INTRA_EPOCH_CKPT_FLAG in ckpt.meta)

    def _gate_entry(self):
        """The method's per-epoch fields (docs/FORMATS.md, history.jsonl), with the mean loss
        term it added in training."""
        summary = self.method.epoch_summary(self.plain_modules, self.training_progress())
        if not summary:
            return {}
        return {"regulariser": self.train_stats.get("regulariser"), **summary}

    def _log_gates(self, entry):
        if "gates" not in entry:
            return
        lines = [
            f"gates epoch {entry['epoch']}: regulariser={entry['regulariser']:.4g} "
            f"target={entry['regulariser_target']:.3f} "
            f"params_if_shrunk={entry['params_if_shrunk']}",
            _retention_line(entry["retentions"]),
        ]
        for gate in entry["gates"]:
            lines.append(
                f"  layer {gate['layer']:2d} {gate['site']:5s} kept {gate['kept']:4d}/"
                f"{gate['units']:<4d} below_threshold {gate['below_threshold']:4d} "
                f"mean_retention {gate['mean_retention']:.3f}"
            )
        text = "\n".join(lines)
        logger.info(text)
        with open(self.hparams.train_log, "a", encoding="utf-8") as log:
            log.write(text + "\n")

    def on_fit_batch_start(self, batch, should_step):
        if self.step == 1 or not hasattr(self, "epoch_started"):
            self.epoch_started = time.perf_counter()

    def on_fit_batch_end(self, batch, outputs, loss, should_step):
        if should_step:
            self._anneal_lr()
            self.method.after_step(self.plain_modules, self.training_progress())
        if self.progress_lines is not None:
            self.progress_lines.postfix = (f"train loss {self.avg_train_loss:.3f} "
                                           f"(step {self.optimizer_step})")
            self.progress_lines.update()

    def _anneal_lr(self):
        """Noam keeps its own update count; SpeechBrain's schedules with a cool-down
        (WarmCoolDecayLRSchedule) are told the number of updates done, at most their total:
        past it (a run resumed with more epochs keeps its checkpoint's total) SpeechBrain's
        line would go below 0, and a negative rate climbs the loss. At the last update its
        `base - (base / n) * n` can round to -2e-19, so the rate is held at 0 or above."""
        schedule = self.hparams.lr_annealing
        if isinstance(schedule, WarmCoolDecayLRSchedule):
            schedule(self.optimizer, min(self.optimizer_step, schedule.total_steps))
            for group in self.optimizer.param_groups:
                group["lr"] = max(0.0, group["lr"])
        else:
            schedule(self.optimizer)

    def _end_test(self, stage_loss):
        rates = error_rates(self.references, self.beam_hyps)
        greedy = error_rates(self.references, self.greedy_hyps)
        self.test_result = {
            "wer": rates["wer"],
            "cer": rates["cer"],
            "ctc_greedy_wer": greedy["wer"],
            "ctc_greedy_cer": greedy["cer"],
            "utterances": len(self.ids),
            "decode_seconds": time.perf_counter() - self.stage_started,
        }
        self.hparams.train_logger.log_stats(  # every rank: see _end_valid_epoch
            stats_meta={"test split": self.test_split}, test_stats=self.test_result
        )
        if if_main_process():
            out_dir = Path(self.hparams.output_folder)
            write_alignments(
                out_dir / f"wer_{self.test_split}.txt", self.ids, self.references, self.beam_hyps
            )


class SplitBatchesAcrossRanks:
    """A batch sampler for one DDP rank: rank r of N takes items r, r + N, ... of every batch of
    the wrapped batch sampler (the single-process run's batches, same order, same epochs).

    DDP averages the ranks' gradients, each the mean over its share, so a step sees the whole
    batch (weighted by share where a batch does not divide evenly). A batch with fewer items
    than ranks gives the ranks that would get nothing its last item again: every rank must take
    part in every step, or DDP waits for ever.
    """

    def __init__(self, batch_sampler, rank, world_size):
        self.batch_sampler, self.rank, self.world_size = batch_sampler, rank, world_size

    def __iter__(self):
        for batch in self.batch_sampler:
            share = batch[self.rank::self.world_size]
            yield share if share else batch[-1:]

    def __len__(self):
        return len(self.batch_sampler)

    def set_epoch(self, epoch):
        if hasattr(self.batch_sampler, "set_epoch"):
            self.batch_sampler.set_epoch(epoch)


def write_history_entry(history_file, entry):
    """Adds the epoch's line to history.jsonl, replacing a line of the same epoch: a run killed
    after writing it but before its checkpoint was complete trains that epoch again."""
    path = Path(history_file)
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    kept = [line for line in lines
            if line.strip() and json.loads(line).get("epoch") != entry["epoch"]]
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(line + "\n" for line in [*kept, json.dumps(entry)]),
                       encoding="utf-8")
    partial.replace(path)


def _retention_line(retentions):
    """One log line: the polarised share and the retention histogram, e.g. '0.0-0.1:812'."""
    bins, margin = retentions["bins"], retentions["margin"]
    cells = " ".join(f"{i / bins:.1f}-{(i + 1) / bins:.1f}:{count}"
                     for i, count in enumerate(retentions["counts"]))
    return (f"  retentions polarised (p<{margin:g} or p>{1 - margin:g}) "
            f"{100 * retentions['polarised_fraction']:.1f}%; histogram {cells}")


def attach_method(hparams):
    """Lets the YAML's pruning method change the model (gates, a pruned source, compact widths)
    before the Brain and the checkpointer see it, and saves its state in every checkpoint."""
    method = hparams["method"]
    method.attach(hparams["modules"])
    hparams["checkpointer"].add_recoverable("method", method)
    widths = getattr(method, "widths", None)
    if widths is not None and if_main_process():
        # A model trained at compact widths: `conformer-prune shrink` rebuilds it from this.
        arch_file = Path(hparams["output_folder"]) / "arch.json"
        arch_file.write_text(json.dumps({"arch": hparams["arch"], "widths": widths}, indent=1),
                             encoding="utf-8")
    return method


def init_progress_clock(brain, train_data, hparams):
    """Tells the Brain how many optimiser steps the whole training has (regulariser clock)."""
    loader_opts = hparams["train_dataloader_opts"]
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if "batch_sampler" in loader_opts:
        # Under torchrun every rank takes a share of every batch (SplitBatchesAcrossRanks):
        # as many steps as one process.
        batches = len(loader_opts["batch_sampler"])
    else:
        # SpeechBrain's DistributedSampler gives each rank 1/world_size of the utterances
        # (padded to equal shares): the clock counts one rank's steps.
        per_rank = math.ceil(len(train_data) / world_size)
        batches = math.ceil(per_rank / loader_opts.get("batch_size", 1))
    brain.batches_per_epoch = batches
    brain.total_train_steps = hparams["number_of_epochs"] * max(
        1, batches // hparams.get("grad_accumulation_factor", 1)
    )
    schedule = hparams["lr_annealing"]
    if isinstance(schedule, WarmCoolDecayLRSchedule):
        # SpeechBrain's schedule counts updates; the YAML gives its cool-down as a fraction of
        # the run (`lr_cooldown`), so it follows number_of_epochs and the corpus. A resumed
        # run gets the checkpoint's counts back from the schedule's own loader.
        # The cool-down never starts inside the warm-up: SpeechBrain's schedule would jump
        # from the warm-up's small rate to the cool-down's large one (a run of few updates).
        total = brain.total_train_steps
        schedule.total_steps = total
        schedule.cooldown = min(round(hparams["lr_cooldown"] * total),
                                max(0, total - schedule.warmup))


# ----- data --------------------------------------------------------------------------------


def train_tokenizer(hparams):
    """Trains (once) the SentencePiece model on the train CSV with SpeechBrain's wrapper."""
    SentencePiece(
        model_dir=hparams["tokenizer_folder"],
        vocab_size=hparams["output_neurons"],
        annotation_train=hparams["train_csv"],
        annotation_read="wrd",
        model_type=hparams["token_type"],
        character_coverage=1.0,
        bos_id=hparams["bos_index"],
        eos_id=hparams["eos_index"],
    )


def tokenizer_model_path(hparams):
    return Path(hparams["tokenizer_folder"]) / (
        f"{hparams['output_neurons']}_{hparams['token_type']}.model"
    )


def load_tokenizer(hparams):
    """The trained SentencePiece model; its pieces must fit the model's `output_neurons`.

    With `token_type: char` SentencePiece keeps every character of the train text, however
    many, so a corpus with more symbols than `output_neurons` would give targets the output
    layer cannot score (a CTC error deep in training); say so before training starts.
    """
    path = tokenizer_model_path(hparams)
    tokenizer = hparams["tokenizer"]
    tokenizer.load(str(path))
    pieces = tokenizer.get_piece_size()
    if pieces > hparams["output_neurons"]:
        raise ValueError(
            f"{path}: the tokenizer has {pieces} pieces but the model has output_neurons: "
            f"{hparams['output_neurons']}; set output_neurons to at least {pieces} "
            f"(YAML or --output_neurons {pieces})"
        )
    return tokenizer


def csv_dataset(csv_path, max_duration=None):
    """A dataset sorted by duration; utterances over max_duration are skipped, counted, listed."""
    data = sb.dataio.dataset.DynamicItemDataset.from_csv(csv_path=str(csv_path))
    if not max_duration:
        return data.filtered_sorted(sort_key="duration")
    too_long = {uid: ex["duration"] for uid, ex in data.data.items()
                if float(ex["duration"]) > max_duration}
    if too_long:
        listing = ", ".join(f"{uid} ({float(d):.1f}s)" for uid, d in sorted(too_long.items()))
        logger.info(
            "%s: skipping %d of %d utterances longer than %.1f s: %s",
            csv_path, len(too_long), len(data.data), max_duration, listing,
        )
    return data.filtered_sorted(sort_key="duration", key_max_value={"duration": max_duration})


def data_summary(hparams, datasets):
    """Utterances used and skipped per split, for results.json: what a run trained and was
    tested on, so that runs compared side by side can be seen to have seen the same data.

    `datasets`: {split: dataset from csv_dataset}. Skipped for length: by preparation (listed
    in <split>_skipped.txt beside the split's CSV) and by csv_dataset's max_duration (the rows
    of the CSV that the filtered dataset leaves out).
    """
    csv_paths = {Path(path).stem: Path(path)
                 for path in [hparams["train_csv"], hparams["valid_csv"], *hparams["test_csv"]]}
    summary = {}
    for split, dataset in datasets.items():
        skipped_file = csv_paths[split].with_name(f"{split}_skipped.txt")
        prepare_skipped = (len(skipped_file.read_text(encoding="utf-8").splitlines())
                           if skipped_file.exists() else 0)
        summary[split] = {
            "utterances": len(dataset),
            "skipped_too_long": prepare_skipped + len(dataset.data) - len(dataset),
        }
    return summary


def dataio_prepare(hparams, tokenizer):
    """Builds the train, valid and test datasets with their audio and text pipelines."""
    train_data = csv_dataset(hparams["train_csv"], hparams.get("max_train_duration"))
    valid_data = csv_dataset(hparams["valid_csv"])
    test_datasets = {Path(p).stem: csv_dataset(p) for p in hparams["test_csv"]}
    datasets = [train_data, valid_data, *test_datasets.values()]
    add_pipelines(datasets, tokenizer, hparams["bos_index"], hparams["eos_index"])
    # The train loader seeds its (unused without workers) worker base seed from a generator of
    # its own, not the global one: otherwise each epoch's loader draws from the global generator
    # when it starts, and a run resumed inside an epoch (which starts a loader again) would
    # then see other dropout and gate noise than the run that was not stopped.
    hparams["train_dataloader_opts"].setdefault(
        "generator", torch.Generator().manual_seed(hparams["seed"]))
    if "dynamic_batching" in hparams:
        # Batches of similar length up to a total duration: little padding, steady memory.
        hparams["train_dataloader_opts"]["batch_sampler"] = LengthBatchSampler(
            train_data,
            length_func=lambda example: float(example["duration"]),
            ascending_epochs=hparams.get("ascending_epochs", 0),
            **hparams["dynamic_batching"],
        )
    return train_data, valid_data, test_datasets


class LengthBatchSampler(DynamicBatchSampler):
    """SpeechBrain's DynamicBatchSampler whose first `ascending_epochs` epochs (counted from 1,
    as the epoch counter does) take their batches shortest first, its `batch_ordering` after.

    Why: the curriculum of Deep Speech 2 ("SortaGrad"): short utterances first give a CTC model
    easy alignments while it learns to leave the all-blank plateau. On the mini recipe one
    ascending epoch slowed the start instead (docs/TRAINING.md), so the YAMLs keep 0. The
    batches themselves are the parent's: only their order changes.
    """

    def __init__(self, *args, ascending_epochs=0, **kwargs):
        self.ascending_epochs = int(ascending_epochs)  # the parent's __init__ orders batches
        super().__init__(*args, **kwargs)

    def _permute_batches(self):
        if not 1 <= self._epoch <= self.ascending_epochs:
            return super()._permute_batches()
        ordering, self._batch_ordering = self._batch_ordering, "ascending"
        try:
            super()._permute_batches()
        finally:
            self._batch_ordering = ordering


def text_pipeline(tokenizer, bos_index, eos_index):
    """The `wrd` column's dynamic items: wrd, tokens_bos (<bos> + ids), tokens_eos
    (ids + <eos>) and tokens; the recognisers' and the LM's (train_lm.py) alike."""
    @sb.utils.data_pipeline.takes("wrd")
    @sb.utils.data_pipeline.provides("wrd", "tokens_bos", "tokens_eos", "tokens")
    def pipeline(wrd):
        yield wrd
        tokens = tokenizer.encode_as_ids(wrd)
        yield torch.LongTensor([bos_index] + tokens)
        yield torch.LongTensor(tokens + [eos_index])
        yield torch.LongTensor(tokens)

    return pipeline


def add_pipelines(datasets, tokenizer, bos_index, eos_index):
    @sb.utils.data_pipeline.takes("wav")
    @sb.utils.data_pipeline.provides("sig")
    def audio_pipeline(wav):
        try:
            return sb.dataio.dataio.read_audio(wav)
        except Exception as err:  # soundfile's and torchaudio's errors have no common base
            # Preparation read the header and the end; a file changed or damaged since then
            # would otherwise stop training with a traceback from inside the DataLoader.
            raise InputError(f"{wav}: cannot read audio ({err}); it changed since the CSVs "
                             "were prepared: fix it, or delete the run's prepare_opts.json "
                             "to prepare again") from None

    sb.dataio.dataset.add_dynamic_item(datasets, audio_pipeline)
    sb.dataio.dataset.add_dynamic_item(datasets, text_pipeline(tokenizer, bos_index, eos_index))
    sb.dataio.dataset.set_output_keys(
        datasets, ["id", "sig", "wrd", "tokens_bos", "tokens_eos", "tokens", "duration"]
    )


def evaluate_splits(brain, test_datasets, hparams):
    """Decodes every test split; returns the `splits` and `decode` parts of results.json."""
    splits = {}
    for split, dataset in test_datasets.items():
        brain.test_split = split
        brain.evaluate(
            dataset,
            max_key=None,
            min_key=hparams.get("test_min_key"),
            test_loader_kwargs=hparams["test_dataloader_opts"],
        )
        audio_seconds = sum(float(d["duration"]) for d in dataset)
        result = dict(brain.test_result)
        result["audio_seconds"] = audio_seconds
        result["rtf"] = result["decode_seconds"] / max(audio_seconds, 1e-9)
        splits[split] = result
    wall = sum(s["decode_seconds"] for s in splits.values())
    audio = sum(s["audio_seconds"] for s in splits.values())
    decode = {
        "searcher": "ctc_attention_beam",
        "beam_size": hparams["test_beam_size"],
        "ctc_weight": hparams["ctc_weight_decode"],
        "lm_weight": hparams.get("lm_weight") or 0.0,
        "lm_folder": hparams.get("lm_folder") if hparams.get("lm_weight") else None,
        "wall_seconds": wall,
        "audio_seconds": audio,
        "rtf": wall / max(audio, 1e-9),
        "threads": torch.get_num_threads(),
        "device": str(brain.device),
    }
    return splits, decode
