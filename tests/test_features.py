import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tympan.config import FeatureConfig
from tympan.features import LogMel, build_cache, open_cache, waveform_batch
from tympan.features.logmel import n_frames, n_samples

from audio_helpers import tone, write


def test_batch_equals_per_item():
    cfg = FeatureConfig()
    frontend = LogMel(cfg)
    batch = torch.stack(
        [
            torch.from_numpy(tone(f, 1.0, 16000, amp=a))
            for f, a in [(300, 0.9), (1200, 0.01), (3000, 0.3)]
        ]
    )
    together = frontend(batch)
    alone = torch.cat([frontend(batch[i : i + 1]) for i in range(3)])
    assert together.shape == (3, 1, cfg.n_mels, n_frames(cfg))
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-4)


def test_silence_gives_finite_values():
    out = LogMel(FeatureConfig())(torch.zeros(2, 16000))
    assert torch.isfinite(out).all()


def test_tone_energy_lands_in_the_right_mel_band():
    cfg = FeatureConfig()
    low, high = LogMel(cfg)(
        torch.stack([torch.from_numpy(tone(f, 1.0, 16000)) for f in (250, 4000)])
    )
    assert low[0].mean(-1).argmax() < high[0].mean(-1).argmax()


def _table(tmp_path, n=12):
    rows = []
    for i in range(n):
        path = write(
            tmp_path / f"c{i}.wav",
            tone(200 + 100 * i, 0.5 + 0.1 * i, 8000 if i % 2 else 22050),
            8000 if i % 2 else 22050,
        )
        rows.append(
            {
                "path": str(path),
                "label": "odd" if i % 2 else "even",
                "group": f"g{i}",
                "split": ["train", "train", "val", "test"][i % 4],
                "sha256": f"{i:064x}",
            }
        )
    return pd.DataFrame(rows)


def test_cache_is_one_array_per_set_with_train_only_stats(tmp_path):
    cfg = FeatureConfig(dtype="float32")
    table = _table(tmp_path / "audio")
    cache = build_cache(table, cfg, tmp_path / "cache")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        "index.csv",
        "meta.json",
        "sets",
        "stats.json",
    ]
    assert [p.name for p in (tmp_path / "cache" / "sets").iterdir()] == ["logmel.npy"]
    assert isinstance(cache.features.sets["logmel"], np.memmap)
    assert cache.features.shape == (12, 1, cfg.n_mels, n_frames(cfg))
    expected = np.asarray(waveform_batch(table["path"].tolist(), cfg))
    torch.testing.assert_close(
        torch.from_numpy(np.array(cache.features)), LogMel(cfg)(torch.from_numpy(expected))
    )
    train = np.asarray(cache.features[cache.rows("train")], dtype=np.float64)
    np.testing.assert_allclose(cache.mean, train.mean(axis=(0, 1, 3)), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(cache.std, train.std(axis=(0, 1, 3)), rtol=1e-3, atol=1e-3)

    # changing only val/test audio leaves the statistics untouched
    changed = table.copy()
    for i in changed.index[changed["split"] != "train"]:
        write(tmp_path / "other" / f"{i}.wav", tone(3500, 1.0, 8000, amp=0.9), 8000)
        changed.loc[i, "path"] = str(tmp_path / "other" / f"{i}.wav")
        changed.loc[i, "sha256"] = f"{i + 100:064x}"
    again = build_cache(changed, cfg, tmp_path / "cache2")
    np.testing.assert_allclose(again.mean, cache.mean, rtol=1e-6)
    assert again.meta["key"] != cache.meta["key"]


def test_cache_key_depends_on_params_not_on_row_order(tmp_path):
    from tympan.features.cache import cache_key

    shas = [f"{i:064x}" for i in range(5)]
    cfg = FeatureConfig()
    assert cache_key(shas, cfg) == cache_key(shas[::-1], cfg)
    assert cache_key(shas, cfg) != cache_key(shas, replace(cfg, n_mels=64))


def test_open_cache_reads_back(tmp_path):
    build_cache(_table(tmp_path / "audio"), FeatureConfig(), tmp_path / "cache")
    cache = open_cache(tmp_path / "cache")
    assert cache.labels == ["even", "odd"]
    assert cache.features.dtype == np.float16
    assert cache.targets().tolist() == [0, 1] * 6
    with pytest.raises(FileNotFoundError):
        open_cache(tmp_path / "missing")


def _stacked(**stack) -> FeatureConfig:
    from tympan.config import StackConfig

    return FeatureConfig(
        sample_rate=8000,
        seconds=0.5,
        n_fft=256,
        hop_length=128,
        f_max=4000.0,
        dtype="float32",
        stack=StackConfig(**{"kinds": ("logmel", "mfcc", "zcr"), "n_mfcc": 13, **stack}),
    )


def test_changing_one_feature_param_recomputes_only_that_set(tmp_path, capsys):
    """Sets are copied by key from the cache being replaced; only the changed one is computed,
    and the result equals a cache built from scratch."""
    table = _table(tmp_path / "audio")
    out = tmp_path / "cache"
    first = build_cache(table, _stacked(), out)
    logmel = np.array(first.features.sets["logmel"])
    assert "computing logmel, mfcc, zcr" in capsys.readouterr().out

    changed = build_cache(table, _stacked(n_mfcc=20), out)
    printed = capsys.readouterr().out
    assert "computing mfcc for 12 recordings" in printed
    assert "logmel reused from the previous" in printed and "zcr reused" in printed
    assert changed.features.shape[2] == 40 + 20 + 1
    np.testing.assert_array_equal(np.array(changed.features.sets["logmel"]), logmel)
    fresh = build_cache(table, _stacked(n_mfcc=20), tmp_path / "fresh")
    np.testing.assert_array_equal(changed.features[:], fresh.features[:])
    assert changed.meta["sets"] == fresh.meta["sets"]
    capsys.readouterr()

    # stacking order, image size and batch size change no set: nothing is computed
    fewer = replace(_stacked(n_mfcc=20, kinds=("zcr", "mfcc")), batch_size=3)
    reordered = build_cache(table, fewer, out)
    assert "computing" not in capsys.readouterr().out
    # a new split changes the statistics, not the sets
    resplit = table.assign(split=["train", "val", "test", "train"] * 3)
    moved = build_cache(resplit, fewer, out)
    assert "computing" not in capsys.readouterr().out
    assert not np.allclose(moved.mean, reordered.mean)
    # different audio is a different key
    build_cache(table.iloc[::-1], _stacked(), out)
    assert "computing logmel, mfcc, zcr" in capsys.readouterr().out


def test_a_failed_featurize_leaves_the_previous_cache(tmp_path):
    from tympan.features.cache import FeatureError

    table = _table(tmp_path / "audio")
    out = tmp_path / "cache"
    before = build_cache(table, _stacked(), out).meta
    broken = table.copy()
    Path(broken.loc[5, "path"]).write_bytes(b"not audio any more")
    with pytest.raises(FeatureError, match=r"c5\.wav"):
        build_cache(broken, _stacked(n_mfcc=20), out)
    assert open_cache(out).meta == before


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


@pytest.mark.parametrize("segmented", [False, True])
def test_featurize_refuses_non_finite_features_naming_the_file(tmp_path, segmented):
    """A file replaced after ingest by one at 1e20 (+400 dBFS) would overflow the spectra; the
    cache would get NaN statistics and training would die. Featurize refuses it when decoding,
    naming the file, and the previous cache stays as it was. (Rows that still come out
    non-finite are refused naming their files: test_a_damaged_reused_set_is_refused.)"""
    from tympan.config import SegmentConfig
    from tympan.features.cache import FeatureError

    segment = SegmentConfig(enabled=True, hop=0.25) if segmented else None
    table = _table(tmp_path / "audio")
    out = tmp_path / "cache"
    build_cache(table, _stacked(), out, segment)
    before = _snapshot(out)
    extreme = tone(500, 1.0, 8000, amp=1e20)  # c5.wav's rate and length: the same windows
    write(Path(table.loc[5, "path"]), extreme, 8000, subtype="FLOAT")
    with pytest.raises(  # a new n_mfcc: the mfcc set is computed again
        FeatureError, match=r"\S*/c5\.wav: extreme amplitude: peak \+400\.0 dBFS.*changed since"
    ):
        build_cache(table, _stacked(n_mfcc=20), out, segment)
    assert _snapshot(out) == before
    assert not (tmp_path / ".cache.partial").exists()


def test_a_damaged_reused_set_is_refused(tmp_path):
    """A set copied by key is checked like a computed one: non-finite rows name their files."""
    from tympan.features.cache import FeatureError

    table = _table(tmp_path / "audio")
    out = tmp_path / "cache"
    build_cache(table, _stacked(), out)
    damaged = np.load(out / "sets" / "mfcc.npy", mmap_mode="r+")
    damaged[3, 0, 0] = np.inf
    damaged.flush()
    del damaged
    resplit = table.assign(split=["train", "val", "test", "train"] * 3)  # the same sets, reused
    with pytest.raises(FeatureError, match=r"mfcc: .*c3\.wav \(row 3\).*reused from the previous"):
        build_cache(resplit, _stacked(), out)


def test_image_mode_is_read_from_the_native_sets(tmp_path):
    table = _table(tmp_path / "audio")
    cache = build_cache(table, _stacked(image=(32, 24), image_channels=3), tmp_path / "c")
    assert cache.features.shape == (12, 3, 32, 24)
    assert cache.features.sets["logmel"].shape[1:] == (40, n_frames(_stacked()))
    assert cache.features[[3, 1]].shape == (2, 3, 32, 24) and cache.features[0].shape == (3, 32, 24)
    assert cache.mean.shape == (32,)


@pytest.mark.parametrize(("n_fft", "hop"), [(512, 256), (401, 160), (256, 128), (255, 100)])
def test_n_frames_matches_the_front_end(n_fft, hop):
    cfg = FeatureConfig(sample_rate=16000, seconds=0.5, n_fft=n_fft, hop_length=hop)
    out = LogMel(cfg)(torch.zeros(1, n_samples(cfg)))
    assert out.shape[-1] == n_frames(cfg)


def test_stacked_features_cache_train_and_serve_alike(tmp_path):
    """A feature stack (S2-style) flows through cache, training and the served predictor."""
    from tympan.config import ModelConfig, StackConfig, TrainConfig
    from tympan.serving import Predictor
    from tympan.serving.bundle import save_bundle
    from tympan.training import fit

    cfg = FeatureConfig(
        sample_rate=8000,
        seconds=0.5,
        n_fft=256,
        hop_length=128,
        f_max=4000.0,
        dtype="float32",
        stack=StackConfig(kinds=("mfcc", "lpc", "zcr"), n_mfcc=13, lpc_order=8),
    )
    table = _table(tmp_path)
    cache = build_cache(table, cfg, tmp_path / "cache")
    assert cache.features.shape == (12, 1, 13 + 8 + 1, n_frames(cfg))
    assert np.isfinite(cache.features[:]).all() and cache.meta["feature"] == "mfcc+lpc+zcr"
    model_cfg = ModelConfig(channels=4, hidden=8, pool=2, kernel=3)
    result = fit(cache, model_cfg, TrainConfig(epochs=1, batch_size=4), 0, torch.device("cpu"))
    save_bundle(
        tmp_path / "bundle.pt",
        cfg,
        model_cfg,
        cache.labels,
        tuple(cache.features.shape[1:]),
        cache.mean,
        cache.std,
        {0: result.model.state_dict()},
    )
    predictor = Predictor.load(tmp_path / "bundle.pt")
    served = predictor.frontend(waveform_batch([table["path"][3]], cfg))
    np.testing.assert_allclose(served[0].numpy(), cache.features[3], rtol=1e-5, atol=1e-4)
    assert predictor.predict([table["path"][3]])[0]["windows"] == 1


def test_a_stack_that_does_not_fit_the_features_is_a_feature_error(tmp_path):
    from tympan.config import StackConfig
    from tympan.features.cache import FeatureError

    cfg = FeatureConfig(n_mels=20, stack=StackConfig(kinds=("mfcc",), n_mfcc=40))
    with pytest.raises(FeatureError, match=r"features.stack.n_mfcc must not exceed"):
        build_cache(_table(tmp_path), cfg, tmp_path / "cache")


@pytest.mark.parametrize(
    ("orig", "new", "frames"), [(44100, 16000, 44101), (22050, 8000, 999), (8000, 16000, 7)]
)
def test_resampled_length_matches_resample(orig, new, frames):
    from tympan.audio import resample
    from tympan.features.cache import resampled_length

    assert resampled_length(frames, orig, new) == resample(torch.zeros(frames), orig, new).shape[-1]


def test_segmented_cache_cuts_recordings_like_serving(tmp_path):
    from tympan.config import SegmentConfig
    from tympan.features import windows
    from tympan.features.cache import FeatureStack

    cfg = FeatureConfig(sample_rate=8000, seconds=0.5, n_fft=256, hop_length=128, dtype="float32")
    segment = SegmentConfig(enabled=True, hop=0.25, min_last=0.5)
    rows = []
    for i, (seconds, rate) in enumerate([(2.3, 8000), (0.4, 8000), (1.3, 22050), (0.6, 8000)]):
        path = write(tmp_path / f"r{i}.wav", tone(300 + 200 * i, seconds, rate), rate)
        rows.append(
            {
                "path": str(path),
                "label": "a" if i % 2 else "b",
                "group": f"g{i}",
                "split": ["train", "train", "val", "test"][i],
                "sha256": f"{i:064x}",
                "speaker": f"s{i}",
            }
        )
    cache = build_cache(pd.DataFrame(rows), cfg, tmp_path / "cache", segment)
    # 2.3 s: windows at 0, .25, ... 1.75 (8) + a tail of 0.3 s >= 0.25 s; 0.4 s and 0.6 s: one
    counts = cache.index.groupby("path", sort=False).size().tolist()
    assert counts == [9, 1, 5, 1]  # 1.3 s: 0, .25, .5, .75 and a tail at 1.0
    assert cache.index["window"].tolist()[:10] == [*range(9), 0]
    assert set(cache.index["speaker"][:9]) == {"s0"}  # windows keep the recording's attributes
    assert cache.meta["segment"]["hop"] == 0.25
    wave = waveform_batch([rows[0]["path"]], replace(cfg, seconds=2.3))[0]
    expected = FeatureStack(cfg, cfg.stack)(windows(wave, cfg, segment.hop, segment.min_last))
    np.testing.assert_allclose(cache.features[:9], expected.numpy(), rtol=1e-5, atol=1e-4)
    plain = build_cache(pd.DataFrame(rows), cfg, tmp_path / "plain")
    assert len(plain.index) == 4 and "window" not in plain.index.columns
    assert plain.meta["key"] != cache.meta["key"]


def test_worker_processes_give_the_same_cache(tmp_path):
    """`features.workers: 2` computes chunks in forked processes; rows land in order and equal
    the in-process result, segmented recordings and kept waveforms included."""
    from tympan.config import SegmentConfig

    table = _table(tmp_path / "audio")
    serial = build_cache(table, replace(_stacked(), workers=1), tmp_path / "one", keep_waves=True)
    parallel = build_cache(
        table, replace(_stacked(), workers=2, batch_size=4), tmp_path / "two", keep_waves=True
    )
    np.testing.assert_array_equal(parallel.features[:], serial.features[:])
    np.testing.assert_array_equal(np.asarray(parallel.waves), np.asarray(serial.waves))
    assert parallel.meta["key"] == serial.meta["key"]  # workers is not a feature param
    segment = SegmentConfig(enabled=True, hop=0.25)
    one = build_cache(table, replace(_stacked(), workers=1), tmp_path / "s1", segment)
    two = build_cache(table, replace(_stacked(), workers=2, batch_size=5), tmp_path / "s2", segment)
    assert len(one.index) > len(table)
    np.testing.assert_array_equal(two.features[:], one.features[:])
    pd.testing.assert_frame_equal(two.index, one.index)


def test_a_broken_file_in_a_worker_is_named(tmp_path):
    from tympan.features.cache import FeatureError

    table = _table(tmp_path / "audio")
    Path(table.loc[7, "path"]).write_bytes(b"RIFF junk")
    with pytest.raises(FeatureError, match=r"c7\.wav: .*passed ingest"):
        build_cache(table, replace(_stacked(), workers=2, batch_size=2), tmp_path / "cache")
    assert not (tmp_path / "cache").exists() and not (tmp_path / ".cache.partial").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_asking_for_a_missing_gpu_is_a_feature_error(tmp_path):
    from tympan.features.cache import FeatureError

    with pytest.raises(FeatureError, match=r"features\.device=cuda but no CUDA device"):
        build_cache(_table(tmp_path / "audio"), replace(_stacked(), device="cuda"), tmp_path / "c")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_featurize_matches_cpu(tmp_path):
    table = _table(tmp_path / "audio")
    cpu = build_cache(table, replace(_stacked(), device="cpu"), tmp_path / "cpu")
    gpu = build_cache(table, replace(_stacked(), device="cuda"), tmp_path / "gpu")
    np.testing.assert_allclose(gpu.features[:], cpu.features[:], atol=1e-2)


KILLED_FEATURIZE = """
import sys, time
from pathlib import Path
import pandas as pd
from tympan.config import FeatureConfig
from tympan.features import cache

table, out, mode = sys.argv[1:]
if mode == "thread":  # the portable fallback instead of the Linux parent-death signal
    from tympan import workers
    workers._arm_parent_death_signal = lambda: False
compute = cache._Job.__call__
cache._Job.__call__ = lambda job, *a: (time.sleep(120), compute(job, *a))[1]  # stay busy
cfg = FeatureConfig(
    sample_rate=8000, seconds=0.5, n_fft=256, hop_length=128, f_max=4000.0, workers=2
)
cache.build_cache(pd.read_csv(table, dtype=str), cfg, Path(out))
"""


def _children(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):  # a thread that just ended
            found |= {int(c) for c in (task / "children").read_text().split()}
    return found


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper is dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc")
@pytest.mark.parametrize("mode", ["prctl", "thread"])
def test_killed_featurize_takes_its_workers_and_leaves_the_previous_cache(tmp_path, mode):
    """SIGKILL of featurize (as `kill -9` or the OOM killer do) ends its worker processes too,
    with the Linux parent-death signal and with the portable watcher thread. The previous
    cache is untouched; the next run removes the killed one's partial folder."""
    table = _table(tmp_path / "audio")
    out = tmp_path / "cache"
    build_cache(table, _stacked(), out)
    before = _snapshot(out)
    table.to_csv(tmp_path / "table.csv", index=False)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}  # this tympan
    args = [sys.executable, "-c", KILLED_FEATURIZE, str(tmp_path / "table.csv"), str(out), mode]
    featurize = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL)
    workers: set[int] = set()
    try:
        assert _wait(lambda: len(_children(featurize.pid)) == 2, 120), "no workers started"
        workers = _children(featurize.pid)
        assert (tmp_path / ".cache.partial").is_dir()
        featurize.kill()
        featurize.wait()
        assert _wait(lambda: not any(_alive(w) for w in workers), 5), [
            w for w in workers if _alive(w)
        ]
    finally:
        for pid in [featurize.pid, *workers]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert _snapshot(out) == before
    build_cache(table, _stacked(n_mfcc=20), out)
    assert not (tmp_path / ".cache.partial").exists()
    assert open_cache(out).meta["params"]["stack"]["n_mfcc"] == 20
