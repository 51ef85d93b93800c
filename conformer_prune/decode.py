"""`conformer-prune decode`: decode and score a compact (shrunk) model folder.

The folder written by `conformer-prune shrink` is a SpeechBrain inference folder; its
hyperparams.yaml builds the compact model, features and beam searcher, and its Pretrainer loads
the weights, normaliser and tokenizer. Evaluation then runs through the same ASRBrain code as
the training recipe's test stage, so that the gated and the shrunk model are scored alike.
"""

import json
import logging
import sys
import warnings
from functools import partial
from pathlib import Path

import torch
from hyperpyyaml import load_hyperpyyaml
from speechbrain.dataio.dataset import FilteredSortedDynamicItemDataset
from speechbrain.nnet.losses import ctc_loss, kldiv_loss
from speechbrain.utils.epoch_loop import EpochCounter
from speechbrain.utils.train_logger import FileTrainLogger

from conformer_prune.asr_brain import ASRBrain, add_pipelines, csv_dataset, evaluate_splits
from conformer_prune.errors import InputError
from conformer_prune.model import count_params, load_weights
from conformer_prune.prepare import prepare_librispeech
from conformer_prune.scoring import git_commit, hparams_sha256, read_results, write_results
from conformer_prune.shrink import INFERENCE_FILES, _require_files

logger = logging.getLogger(__name__)
DEFAULT_SPLITS = ("test-clean", "test-other")


def load_inference_folder(model_dir, overrides=None):
    """The folder's hyperparams with weights, normaliser and tokenizer loaded (as from_hparams)."""
    model_dir = Path(model_dir).resolve()
    hparams_file = model_dir / "hyperparams.yaml"
    if not hparams_file.exists():
        raise InputError(
            f"{hparams_file}: missing; expected a folder written by `conformer-prune shrink`"
        )
    _require_files(model_dir, INFERENCE_FILES)
    with open(hparams_file, encoding="utf-8") as fin:
        hparams = load_hyperpyyaml(fin, overrides or {})
    pretrainer = hparams["pretrainer"]
    pretrainer.set_collect_in(model_dir)
    pretrainer.collect_files(default_source=model_dir)
    pretrainer.load_collected()
    return hparams


def decode_hparams(inference, output_folder, batch_size):
    """What ASRBrain's test stage reads, from the inference folder's objects."""
    return {
        **inference,
        "test_search": inference["decoder"],
        "log_softmax": torch.nn.LogSoftmax(dim=-1),
        # The test stage also reports the ASR loss; its weights do not change any hypothesis.
        "ctc_cost": partial(ctc_loss, blank_index=inference["blank_index"]),
        "seq_cost": partial(kldiv_loss, reduction="batchmean"),
        "ctc_weight": 0.3,
        "pad_index": 0,
        "epoch_counter": EpochCounter(limit=0),
        "output_folder": str(output_folder),
        "train_logger": FileTrainLogger(save_file=str(Path(output_folder) / "decode_log.txt")),
        "test_dataloader_opts": {"batch_size": batch_size},
        "test_beam_size": inference["beam_size"],
        "ctc_weight_decode": inference["ctc_weight"],
    }


class FolderDecoder:
    """A compact model folder loaded once, scored on any number of datasets; the model's
    weights may be swapped between calls (`model.load_state_dict`), as the delta sweep does.

    `output_folder` gets wer_<split>.txt and decode_log.txt (default: the model folder).
    """

    def __init__(self, model_dir, batch_size=16, threads=None, overrides=None,
                 output_folder=None):
        self.model_dir = Path(model_dir).resolve()
        if threads:
            torch.set_num_threads(threads)
        # SpeechBrain's decoder passes a bool padding mask with a float causal mask to torch's
        # attention, which warns on every batch: one line per batch of a long sweep's log.
        warnings.filterwarnings("ignore", message="Support for mismatched key_padding_mask")
        self.inference = load_inference_folder(self.model_dir, overrides)
        output_folder = Path(output_folder or self.model_dir)
        output_folder.mkdir(parents=True, exist_ok=True)
        self.hparams = decode_hparams(self.inference, output_folder, batch_size)
        modules = {"asr": self.inference["asr"], "normalize": self.inference["normalize"]}
        # No tqdm bar when stderr is a log file: its redraws would make one endless line.
        run_opts = {"device": "cpu", "noprogressbar": not sys.stderr.isatty()}
        self.brain = ASRBrain(modules=modules, hparams=self.hparams, run_opts=run_opts)
        self.brain.tokenizer = self.inference["tokenizer"]

    @property
    def model(self):
        """The ConformerASR being scored."""
        return self.inference["asr"]

    def datasets(self, data_folder, splits, prepare_dir=None, every=1):
        """{split: dataset} of a LibriSpeech-layout folder, CSVs prepared under `prepare_dir`
        (default: the model folder's data/); `every` > 1 keeps every n-th utterance."""
        csvs = prepare_librispeech(data_folder, Path(prepare_dir or self.model_dir / "data"),
                                   splits=tuple(splits))
        datasets = {split: csv_dataset(csvs[split]) for split in splits}
        if every > 1:
            datasets = {split: FilteredSortedDynamicItemDataset(data, data.data_ids[::every])
                        for split, data in datasets.items()}
        add_pipelines(list(datasets.values()), self.inference["tokenizer"],
                      self.inference["bos_index"], self.inference["eos_index"])
        return datasets

    def score(self, datasets):
        """`splits` and `decode` parts of results.json for the model as it is now."""
        return evaluate_splits(self.brain, datasets, self.hparams)


def decode_folder(model_dir, data_folder, splits=DEFAULT_SPLITS, batch_size=16, threads=None,
                  overrides=None):
    """Decodes `splits` of a LibriSpeech-layout folder; writes wer_<split>.txt and results.json."""
    decoder = FolderDecoder(model_dir, batch_size, threads, overrides)
    splits_result, decode = decoder.score(decoder.datasets(data_folder, splits))
    model_dir = decoder.model_dir
    results = {
        **origin_of(model_dir),
        "model_kind": "shrunk",
        "git_commit": git_commit(),
        "hparams_sha256": hparams_sha256(model_dir / "hyperparams.yaml"),
        "params": count_params(load_weights(model_dir / "model.ckpt")),
        "decode": decode,
        "splits": splits_result,
    }
    write_results(model_dir / "results.json", results)
    return results


def origin_of(model_dir):
    """Name, method and seed of the run the compact model was shrunk from (shrink_report.json)."""
    report_file = model_dir / "shrink_report.json"
    if not report_file.exists():
        return {"name": model_dir.name, "method": "unknown"}
    report = json.loads(report_file.read_text(encoding="utf-8"))
    run_results = read_results(Path(report["checkpoint"]).parent.parent / "results.json", missing_ok=True)
    origin = {
        "name": f"{run_results.get('name', model_dir.parent.name)}_shrunk",
        "method": run_results.get("method", "unknown"),
        "gates": {"threshold": report.get("threshold"), "shrunk_from": report["checkpoint"]},
    }
    if "seed" in run_results:
        origin["seed"] = run_results["seed"]
    return origin


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "decode",
        help="decode and score a compact model folder (results.json, wer_<split>.txt)",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("model_dir", help="a folder written by `conformer-prune shrink`")
    parser.add_argument("--data-folder", required=True, help="a LibriSpeech-layout folder")
    parser.add_argument("--splits", default=",".join(DEFAULT_SPLITS),
                        help="comma-separated splits to decode (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--beam-size", type=int, default=None,
                        help="override the folder's beam size")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.set_defaults(func=run)
    return parser


def run(args):
    overrides = {"beam_size": args.beam_size} if args.beam_size else None
    results = decode_folder(args.model_dir, args.data_folder, args.splits.split(","),
                            args.batch_size, args.threads, overrides)
    for split, scores in results["splits"].items():
        print(f"{split}: WER {scores['wer']:.2f}%  CER {scores['cer']:.2f}%  RTF {scores['rtf']:.3f}")
    print(f"params: {results['params']}")
    return 0
