"""`conformer-prune decode`: decode and score a compact (shrunk) model folder.

The folder written by `conformer-prune shrink` is a SpeechBrain inference folder; decoding goes
through SpeechBrain's inference interface on it (`inference.CompactASR`, an EncoderDecoderASR),
with the searcher settings the run was trained with (beam size, CTC weight; stored in the
folder's hyperparams.yaml) unless overridden on the command line. Batches are padded as the
training recipe's test stage pads them (16 utterances in CSV order), so the shrunk model's joint
search gives the gated model's hypotheses.
"""

import json
import logging
import time
import warnings
from pathlib import Path

import torch
from speechbrain.dataio.dataloader import make_dataloader
from speechbrain.dataio.dataset import FilteredSortedDynamicItemDataset

from conformer_prune.asr_brain import add_pipelines, csv_dataset
from conformer_prune.errors import InputError
from conformer_prune.inference import SEARCHES, load_compact_asr
from conformer_prune.model import count_params, load_weights
from conformer_prune.prepare import prepare_librispeech
from conformer_prune.scoring import (error_rates, git_commit, hparams_sha256, read_results,
                                     write_alignments, write_results)
from conformer_prune.shrink import INFERENCE_FILES, _require_files

logger = logging.getLogger(__name__)
DEFAULT_SPLITS = ("test-clean", "test-other")
# results.json's name of each search (`ctc_attention_beam` is what training's test stage runs).
SEARCHER_NAMES = {"joint": "ctc_attention_beam", "rescore": "ctc_prefix_beam_attention_rescore",
                  "greedy": "ctc_greedy"}


def load_inference_folder(model_dir, search="joint", device="cpu", overrides=None, int8=False,
                          lm_weight=None, lm_folder=None):
    """CompactASR of a compact folder, a missing file named before SpeechBrain trips on it."""
    model_dir = Path(model_dir).resolve()
    hparams_file = model_dir / "hyperparams.yaml"
    if not hparams_file.exists():
        raise InputError(
            f"{hparams_file}: missing; expected a folder written by `conformer-prune shrink`"
        )
    _require_files(model_dir, INFERENCE_FILES)
    return load_compact_asr(model_dir, search=search, device=device, overrides=overrides,
                            int8=int8, lm_weight=lm_weight, lm_folder=lm_folder)


class FolderDecoder:
    """A compact model folder loaded once, scored on any number of datasets; the model's
    weights may be swapped between calls (`model.load_state_dict`), as the delta sweep does.

    `output_folder` gets wer_<split>.txt (wer_<split>_<search>.txt for a search other than
    joint; default: the model folder). `overrides` replace the folder's hyperparams.yaml values
    (beam_size, ctc_weight).
    """

    def __init__(self, model_dir, batch_size=16, threads=None, overrides=None,
                 output_folder=None, search="joint", device="cpu", int8=False, lm_weight=None,
                 lm_folder=None):
        self.model_dir = Path(model_dir).resolve()
        if threads:
            torch.set_num_threads(threads)
        # SpeechBrain's decoder passes a bool padding mask with a float causal mask to torch's
        # attention, which warns on every batch: one line per batch of a long sweep's log.
        warnings.filterwarnings("ignore", message="Support for mismatched key_padding_mask")
        self.asr = load_inference_folder(self.model_dir, search, device, overrides, int8,
                                         lm_weight, lm_folder)
        self.int8 = int8
        self.lm_folder = lm_folder
        self.variant = f"{search}_int8" if int8 else search
        self.batch_size = batch_size
        self.output_folder = Path(output_folder or self.model_dir)
        self.output_folder.mkdir(parents=True, exist_ok=True)

    @property
    def model(self):
        """The ConformerASR being scored."""
        return self.asr.model

    def datasets(self, data_folder, splits, prepare_dir=None, every=1):
        """{split: dataset} of a LibriSpeech-layout folder, CSVs prepared under `prepare_dir`
        (default: the model folder's data/); `every` > 1 keeps every n-th utterance."""
        csvs = prepare_librispeech(data_folder, Path(prepare_dir or self.model_dir / "data"),
                                   splits=tuple(splits))
        datasets = {split: csv_dataset(csvs[split]) for split in splits}
        if every > 1:
            datasets = {split: FilteredSortedDynamicItemDataset(data, data.data_ids[::every])
                        for split, data in datasets.items()}
        hparams = self.asr.hparams
        add_pipelines(list(datasets.values()), self.asr.tokenizer, hparams.bos_index,
                      hparams.eos_index)
        return datasets

    def score(self, datasets):
        """`splits` and `decode` parts of results.json for the model as it is now."""
        self.asr.mods.eval()
        splits = {split: self.score_split(split, data) for split, data in datasets.items()}
        wall = sum(s["decode_seconds"] for s in splits.values())
        audio = sum(s["audio_seconds"] for s in splits.values())
        decode = {
            "searcher": SEARCHER_NAMES[self.asr.search],
            "int8": self.int8,
            "beam_size": self.asr.hparams.beam_size,
            "ctc_weight": self.asr.hparams.ctc_weight,
            "lm_weight": self.asr.lm_weight,
            "lm_folder": str(self.lm_folder or self.model_dir) if self.asr.lm_weight else None,
            "wall_seconds": wall,
            "audio_seconds": audio,
            "rtf": wall / max(audio, 1e-9),
            "threads": torch.get_num_threads(),
            "device": str(self.asr.device),
        }
        return splits, decode

    def score_split(self, split, dataset):
        """WER/CER of the search and of the CTC best path on one split; writes wer_<split>.txt."""
        ids, references, hyps, greedy = [], [], [], []
        started = time.perf_counter()
        for batch in make_dataloader(dataset, batch_size=self.batch_size):
            wavs, wav_lens = batch.sig
            tokens, best_path = self.asr.transcribe_with_greedy(wavs, wav_lens)
            hyps.extend(self.asr.detokenize(tokens))
            greedy.extend(self.asr.detokenize(best_path))
            ids.extend(batch.id)
            references.extend(batch.wrd)
        seconds = time.perf_counter() - started
        suffix = "" if self.variant == "joint" else f"_{self.variant}"
        write_alignments(self.output_folder / f"wer_{split}{suffix}.txt", ids, references, hyps)
        rates, greedy_rates = error_rates(references, hyps), error_rates(references, greedy)
        audio = sum(float(d["duration"]) for d in dataset)
        logger.info("%s: WER %.2f, %d utterances in %.1f s", split, rates["wer"], len(ids),
                    seconds)
        return {"wer": rates["wer"], "cer": rates["cer"], "ctc_greedy_wer": greedy_rates["wer"],
                "ctc_greedy_cer": greedy_rates["cer"], "utterances": len(ids),
                "decode_seconds": seconds, "audio_seconds": audio,
                "rtf": seconds / max(audio, 1e-9)}


def decode_folder(model_dir, data_folder, splits=DEFAULT_SPLITS, batch_size=16, threads=None,
                  overrides=None, search="joint", device="cpu", int8=False, lm_weight=None,
                  lm_folder=None):
    """Decodes `splits` of a LibriSpeech-layout folder; writes wer_<split>.txt and results.json
    (results_<search>[_int8].json for another search than the run's joint one, or int8)."""
    decoder = FolderDecoder(model_dir, batch_size, threads, overrides, search=search,
                            device=device, int8=int8, lm_weight=lm_weight, lm_folder=lm_folder)
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
    name = "results.json" if decoder.variant == "joint" else f"results_{decoder.variant}.json"
    write_results(model_dir / name, results)
    return results


def origin_of(model_dir):
    """Name, method and seed of the run the compact model was shrunk from (shrink_report.json)."""
    report_file = model_dir / "shrink_report.json"
    if not report_file.exists():
        return {"name": model_dir.name, "method": "unknown"}
    report = json.loads(report_file.read_text(encoding="utf-8"))
    run_results = read_results(Path(report["checkpoint"]).parent.parent / "results.json",
                               missing_ok=True)
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
    parser.add_argument("--search", choices=SEARCHES, default="joint",
                        help="joint: the run's joint CTC/attention beam search; rescore: CTC "
                        "prefix beam search, n-best rescored by the attention decoder in one "
                        "pass; greedy: CTC best path (default: %(default)s)")
    parser.add_argument("--beam-size", type=int, default=None,
                        help="override the run's beam size (stored in the folder)")
    parser.add_argument("--ctc-weight", type=float, default=None,
                        help="override the run's CTC weight of joint and rescore search")
    parser.add_argument("--lm-weight", type=float, default=None,
                        help="override the folder's LM weight in joint and rescore search "
                        "(0: no LM; "
                        "above 0 needs the folder's lm.ckpt, which shrink copies from the run)")
    parser.add_argument("--lm-folder", default=None,
                        help="decode with this LM folder (train_lm.py's) instead of the folder's "
                        "own; needs --lm-weight when the folder has none")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--int8", action="store_true",
                        help="quantise the encoder's and CTC head's Linear layers and the LM's "
                        "LSTM and Linear layers to int8 first (CPU; PyTorch dynamic "
                        "quantisation)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.set_defaults(func=run)
    return parser


def run(args):
    overrides = {key: value for key, value in (("beam_size", args.beam_size),
                                               ("ctc_weight", args.ctc_weight))
                 if value is not None}
    results = decode_folder(args.model_dir, args.data_folder, args.splits.split(","),
                            args.batch_size, args.threads, overrides, args.search, args.device,
                            args.int8, args.lm_weight, args.lm_folder)
    for split, scores in results["splits"].items():
        print(f"{split}: WER {scores['wer']:.2f}%  CER {scores['cer']:.2f}%  "
              f"RTF {scores['rtf']:.3f} ({args.search} search)")
    print(f"params: {results['params']}")
    return 0
