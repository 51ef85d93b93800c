"""The tiny model architecture the unit tests share (build_asr_modules arguments)."""

TINY_ARCH = dict(
    vocab_size=12,
    n_mels=16,
    d_model=16,
    nhead=2,
    num_encoder_layers=2,
    num_decoder_layers=1,
    d_ffn=24,
    kernel_size=3,
    cnn_channels=[4, 4],
)


def char_tokenizer(tmp_path):
    """A SentencePiece character model of a few pangrams: (model file, processor)."""
    import sentencepiece as spm

    text = tmp_path / "text.txt"
    text.write_text(
        "\n".join(
            [
                "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG",
                "PACK MY BOX WITH FIVE DOZEN LIQUOR JUGS",
                "HOW VEXINGLY QUICK DAFT ZEBRAS JUMP",
                "SPHINX OF BLACK QUARTZ JUDGE MY VOW",
            ]
        )
    )
    # SpeechBrain's token convention: 0 = unk (also the CTC blank), 1 = bos, 2 = eos.
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(tmp_path / "tok"),
        vocab_size=30,
        model_type="char",
        hard_vocab_limit=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    model = tmp_path / "tok.model"
    return model, spm.SentencePieceProcessor(model_file=str(model))
