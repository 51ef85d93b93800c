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
