#!/usr/bin/env python3
"""Trains and tests a Conformer CTC/attention recogniser, dense or with adaptive dropout gates.

    python train.py hparams/conformer_dense.yaml --data_folder /path/to/LibriSpeech
    python train.py hparams/conformer_adrop.yaml --data_folder /path/to/LibriSpeech
    python train.py hparams/mini/conformer_adrop.yaml --data_folder corpus   # embedded corpus
    python train.py <yaml> --test_only ...    # decode the run's last checkpoint again
    torchrun --nproc_per_node=2 train.py <yaml> ...   # DDP: same batches and steps as one process

The YAML declares everything (model, gates, regulariser, data, decoding); this file only wires
SpeechBrain's stages together: prepare -> tokenizer -> fit -> test -> results.json.
A killed run started again with the same command resumes from its last checkpoint, exactly
(docs/RELIABILITY.md); bad input stops it with one `error:` line naming the item.
"""

import sys
from pathlib import Path

import speechbrain as sb
import torch
from hyperpyyaml import load_hyperpyyaml
from speechbrain.utils.distributed import if_main_process, run_on_main

from conformer_prune.asr_brain import (
    ASRBrain,
    attach_method,
    data_summary,
    dataio_prepare,
    evaluate_splits,
    init_progress_clock,
    load_tokenizer,
    train_tokenizer,
)
from conformer_prune.checkpoints import FREE_ON_RESUME, check_same_hparams
from conformer_prune.errors import InputError, print_input_error
from conformer_prune.lm import attach_lm, check_run_lm, run_lm
from conformer_prune.model import count_params, inter_ctc_problem
from conformer_prune.prepare import prepare_librispeech
from conformer_prune.ranks import compare_ranks
from conformer_prune.scoring import git_commit, hparams_sha256, write_results
from conformer_prune.sites import encoder_layers


def main(argv):
    if not sys.stderr.isatty() and "--noprogressbar" not in argv:
        # In a log file tqdm's redrawn bar is one endless line; ASRBrain writes a plain
        # progress line now and then instead.
        argv = [*argv, "--noprogressbar"]
    if not any(arg.startswith("--distributed_backend") for arg in argv) \
            and not torch.cuda.is_available():
        # SpeechBrain's default backend (nccl) needs GPUs; on CPU, torchrun runs with gloo.
        argv = [*argv, "--distributed_backend=gloo"]
    hparams_file, run_opts, overrides = sb.parse_arguments(argv)
    # torchrun: one process per device; a no-op for a plain `python train.py`.
    sb.utils.distributed.ddp_init_group(run_opts)
    with open(hparams_file, encoding="utf-8") as fin:
        hparams = load_hyperpyyaml(fin, overrides)
    torch.set_num_threads(hparams.get("num_threads") or torch.get_num_threads())
    check_inter_ctc(hparams, hparams_file)  # a bad layer stops the run now, not at its first step
    saved_hparams = Path(hparams["output_folder"]) / "hyperparams.yaml"
    test_only = run_opts.get("test_only")
    if not test_only:
        # Resuming a folder with other settings would mix two runs in one result (more epochs
        # may be asked for); --test_only may change the decoding settings, which is its use.
        check_same_hparams(hparams["output_folder"], hparams_file, overrides, FREE_ON_RESUME)
    sb.create_experiment_directory(
        experiment_directory=hparams["output_folder"],
        # --test_only keeps the record of how the run was trained (SpeechBrain would rewrite it)
        hyperparams_to_save=None if test_only and saved_hparams.exists() else hparams_file,
        overrides=overrides,
    )

    run_on_main(
        prepare_librispeech,
        kwargs={
            "data_folder": hparams["data_folder"],
            "save_folder": hparams["prepare_folder"],
            "splits": hparams["train_splits"] + hparams["dev_splits"] + hparams["test_splits"],
            "max_duration": hparams.get("max_prepare_duration"),
        },
    )
    run_on_main(train_tokenizer, kwargs={"hparams": hparams})
    tokenizer = load_tokenizer(hparams)
    check_run_lm(hparams, tokenizer)  # a missing LM stops the run now, not after training
    train_data, valid_data, test_datasets = dataio_prepare(hparams, tokenizer)

    attach_method(hparams)
    brain = ASRBrain(
        modules=hparams["modules"],
        opt_class=hparams["optimizer"],
        hparams=hparams,
        run_opts=run_opts,
        checkpointer=hparams["checkpointer"],
    )
    brain.tokenizer = tokenizer
    init_progress_clock(brain, train_data, hparams)

    if not run_opts.get("test_only"):
        brain.fit(
            brain.hparams.epoch_counter,
            train_data,
            valid_data,
            train_loader_kwargs=hparams["train_dataloader_opts"],
            valid_loader_kwargs=hparams["valid_dataloader_opts"],
        )

    ranks = None
    if not run_opts.get("test_only"):
        ranks = compare_ranks(brain.plain_modules, brain.method)  # None without torchrun
    lm = run_lm(hparams, tokenizer)  # loaded only now: training is the same with or without
    if lm is not None:
        attach_lm(hparams["test_search"], lm, hparams["lm_weight"])
    splits, decode = evaluate_splits(brain, test_datasets, hparams)
    if if_main_process():
        datasets = {Path(hparams["train_csv"]).stem: train_data,
                    Path(hparams["valid_csv"]).stem: valid_data, **test_datasets}
        write_run_results(hparams, brain, splits, decode, data_summary(hparams, datasets),
                          ranks)


def check_inter_ctc(hparams, hparams_file):
    """Refuses intermediate CTC layers that the model's encoder does not have."""
    if not hparams.get("inter_ctc_weight"):
        return
    layers = hparams.get("inter_ctc_layers") or []
    problem = inter_ctc_problem(layers, len(encoder_layers(hparams["modules"]["asr"])))
    if problem:
        raise InputError(f"{hparams_file}: {problem}")


def params_of_saved_model(brain):
    """Parameter counts from the tensors of the checkpoint that was decoded."""
    checkpoint = brain.checkpointer.find_checkpoint()
    return count_params(torch.load(checkpoint.paramfiles["model"], map_location="cpu"))


def write_run_results(hparams, brain, splits, decode, data, ranks=None):
    """results.json of the run (docs/FORMATS.md): counts from the tensors of the decoded model."""
    method = brain.method
    results = {
        "name": hparams["experiment_name"],
        "method": method.name,
        "method_detail": method.describe(),
        "seed": hparams["seed"],
        "model_kind": method.model_kind,
        "git_commit": git_commit(),
        "hparams_sha256": hparams_sha256(Path(hparams["output_folder"]) / "hyperparams.yaml"),
        "params": params_of_saved_model(brain),
        "decode": decode,
        "splits": splits,
        "epochs": brain.hparams.epoch_counter.current,
        "data": data,
        **method.results_summary(brain.plain_modules),
    }
    if ranks is not None:
        results["ranks"] = ranks
    write_results(Path(hparams["output_folder"]) / "results.json", results)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except InputError as err:
        # Bad input (docs/RELIABILITY.md): one line naming the item, not a traceback.
        sys.exit(print_input_error(err))
