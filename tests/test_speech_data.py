"""Speech Commands layout loader (speech.data) and the espeak-ng generator (speech.synth)."""

from __future__ import annotations

import hashlib
import json
import struct
import wave
from pathlib import Path

import numpy as np
import pytest
from scipy.io import wavfile

from speech import synth
from speech.data import (
    BACKGROUND_DIR,
    SILENCE,
    UNKNOWN,
    DataError,
    build_index,
    class_names,
    load_items,
    load_wav,
    read_wav,
    split_item,
)
from strlowrank.method.cache import cache_root

SPEAKERS = ("aaaa0001", "bbbb0002", "cccc0003", "dddd0004")
WORDS = ("yes", "no", "up", "cat", "dog")  # three keywords, two unknown words


def write_clip(path: Path, seconds: float = 1.0, rate: int = 16000, seed: int = 0) -> None:
    """A short int16 noise burst standing in for an utterance."""
    path.parent.mkdir(parents=True, exist_ok=True)
    x = np.random.default_rng(seed).normal(0, 3000, int(seconds * rate))
    wavfile.write(path, rate, x.astype(np.int16))


def make_tree(root: Path) -> Path:
    """Tiny Speech Commands tree: 5 words x 4 speakers, 2 background files, split lists
    (speaker b -> validation, speaker c -> testing)."""
    for i, word in enumerate(WORDS):
        for j, spk in enumerate(SPEAKERS):
            write_clip(root / word / f"{spk}_nohash_0.wav", 0.6 + 0.1 * j, seed=10 * i + j)
    for k, name in enumerate(("white_noise", "pink_noise")):
        write_clip(root / BACKGROUND_DIR / f"{name}.wav", 3.0, seed=100 + k)
    for list_name, speaker in (("validation", "bbbb0002"), ("testing", "cccc0003")):
        text = "".join(f"{w}/{speaker}_nohash_0.wav\n" for w in WORDS)
        (root / f"{list_name}_list.txt").write_text(text)
    return root


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "sc")


def test_google12_classes_and_labels(tree: Path) -> None:
    names = class_names("google12")
    assert names[:2] == [SILENCE, UNKNOWN] and len(names) == 12 and names[2] == "yes"
    index = build_index(tree, "google12", silence_fraction=0.5, unknown_fraction=None)
    train = index["train"]
    assert len(train) == 5 * 2 + round(0.5 * 3 * 2)  # 2 train speakers; silence = half of 6
    for item, label in train:
        path, start = split_item(item)
        word = Path(path).parent.name
        if start is not None:
            assert word == BACKGROUND_DIR and label == names.index(SILENCE)
            assert 0 <= start <= 3 * 16000 - 16000
        elif word in ("cat", "dog"):
            assert label == names.index(UNKNOWN)
        else:
            assert names[label] == word


def test_splits_follow_lists(tree: Path) -> None:
    index = build_index(tree, silence_fraction=0.0, unknown_fraction=None)
    speakers = {s: {Path(item).name.split("_")[0] for item, _ in v} for s, v in index.items()}
    assert speakers["train"] == {"aaaa0001", "dddd0004"}
    assert speakers["val"] == {"bbbb0002"} and speakers["test"] == {"cccc0003"}


def test_unknown_fraction_subsamples(tree: Path) -> None:
    index = build_index(tree, silence_fraction=0.0, unknown_fraction=0.5, seed=3)
    unknown = class_names().index(UNKNOWN)
    assert sum(1 for _, y in index["train"] if y == unknown) == 3  # round(0.5 * 6 keywords)
    assert index == build_index(tree, silence_fraction=0.0, unknown_fraction=0.5, seed=3)


def test_all35_uses_word_labels(tree: Path) -> None:
    index = build_index(tree, "all35")
    names = class_names("all35")
    assert len(names) == 35
    assert {names[y] for _, y in index["train"]} == set(WORDS)


def test_split_list_errors(tree: Path) -> None:
    (tree / "testing_list.txt").unlink()
    with pytest.raises(DataError, match="testing_list.txt"):
        build_index(tree)
    (tree / "testing_list.txt").write_text("not a path\n")
    with pytest.raises(DataError, match="testing_list.txt:1"):
        build_index(tree)
    (tree / "testing_list.txt").unlink()
    (tree / "validation_list.txt").unlink()
    with pytest.raises(DataError, match="allow_no_split"):
        build_index(tree)
    index = build_index(tree, silence_fraction=0.0, unknown_fraction=None, allow_no_split=True)
    assert len(index["train"]) == 20 and not index["val"] and not index["test"]


def test_missing_and_empty_warn(tree: Path) -> None:
    with (tree / "testing_list.txt").open("a") as f:
        f.write("yes/gone0000_nohash_0.wav\n")
    (tree / "empty_word").mkdir()
    with pytest.warns(UserWarning) as record:
        build_index(tree)
    messages = " ".join(str(w.message) for w in record)
    assert "1 listed file(s) not found" in messages and "empty_word" in messages
    with pytest.raises(DataError, match="nowhere"):
        build_index(tree / "nowhere")


def test_bad_files_raise_or_skip(tree: Path) -> None:
    bad = tree / "yes" / "eeee0005_nohash_0.wav"
    bad.write_bytes(b"RIFF garbage")
    with pytest.raises(DataError, match="eeee0005"):
        load_wav(bad)
    good = tree / "no" / "aaaa0001_nohash_0.wav"
    truncated = tree / "no" / "ffff0006_nohash_0.wav"
    truncated.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(DataError, match="ffff0006"):
        read_wav(truncated)
    empty = tree / "no" / "gggg0007_nohash_0.wav"
    wavfile.write(empty, 16000, np.zeros(0, np.int16))
    with pytest.raises(DataError, match="no samples"):
        read_wav(empty)
    with pytest.warns(UserWarning, match="skipped 3 unreadable"):
        waves, kept = load_items([str(good), str(bad), str(truncated), str(empty)])
    assert waves.shape == (1, 16000) and kept == [0]
    with pytest.raises(DataError):
        load_items([str(bad)], on_error="raise")


def write_pcm24(path: Path, x: np.ndarray, rate: int) -> None:
    """24-bit PCM WAV (which scipy cannot write) from float samples in [-1, 1]."""
    ints = np.round(x * (2**23 - 1)).astype("<i4")
    raw = b"".join(struct.pack("<i", int(v))[:3] for v in ints)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(3)
        w.setframerate(rate)
        w.writeframes(raw)


def peak_hz(x: np.ndarray) -> float:
    return float(np.argmax(np.abs(np.fft.rfft(x))) * 16000 / len(x))


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_resampling_keeps_frequency(tmp_path: Path, rate: int) -> None:
    t = np.arange(rate) / rate
    wavfile.write(tmp_path / "a.wav", rate, (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32))
    x = load_wav(tmp_path / "a.wav")
    assert x.shape == (16000,) and x.dtype == np.float32
    assert abs(peak_hz(x) - 440) <= 2 and abs(np.abs(x).max() - 0.5) < 0.02


def test_formats_and_length(tmp_path: Path) -> None:
    t = np.arange(8000) / 16000
    sine = 0.5 * np.sin(2 * np.pi * 1000 * t)
    stereo = np.stack([sine, np.zeros_like(sine)], axis=1)
    wavfile.write(tmp_path / "st.wav", 16000, (stereo * 32767).astype(np.int16))
    x = load_wav(tmp_path / "st.wav")
    assert x.shape == (16000,) and np.allclose(x[:8000], sine / 2, atol=1e-3)
    assert np.all(x[8000:] == 0)  # half a second padded with zeros at the end
    wavfile.write(tmp_path / "i32.wav", 16000, (sine * 2**31).astype(np.int32))
    assert np.allclose(load_wav(tmp_path / "i32.wav")[:8000], sine, atol=1e-6)
    write_pcm24(tmp_path / "p24.wav", sine, 16000)
    assert np.allclose(load_wav(tmp_path / "p24.wav")[:8000], sine, atol=1e-6)
    long = np.linspace(-1, 1, 24000).astype(np.float32)
    wavfile.write(tmp_path / "long.wav", 16000, long)
    assert np.array_equal(load_wav(tmp_path / "long.wav"), long[:16000])


def test_cache_root_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("STRLOWRANK_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    assert synth.default_data_dir() == tmp_path / synth.DATA_VERSION


def test_synth_tiny_tree(tmp_path: Path) -> None:
    pytest.importorskip("espeakng_loader")
    from speech.synth import MARKER, SynthConfig, generate_dataset, is_complete

    cfg = SynthConfig(
        n_speakers=3,
        keywords_per_speaker=3,
        others_per_speaker=1,
        repeat_prob=0.0,
        noise_seconds=2.0,
        workers=2,
    )
    root = generate_dataset(tmp_path / "synth", cfg, progress=False)
    clips = sorted(root.glob("*/*_nohash_*.wav"))
    assert len(clips) == 12
    for clip in clips:
        rate, x = wavfile.read(clip)
        assert rate == 16000 and x.dtype == np.int16 and x.shape == (16000,)
    noise = sorted(p.stem for p in (root / BACKGROUND_DIR).glob("*.wav"))
    assert noise == sorted(["white_noise", "pink_noise", "brown_noise", "babble", "hum"])
    assert wavfile.read(root / BACKGROUND_DIR / "babble.wav")[1].shape == (32000,)
    lists = {n: (root / f"{n}_list.txt").read_text().split() for n in ("validation", "testing")}
    speakers = {n: {Path(p).name.split("_")[0] for p in v} for n, v in lists.items()}
    assert all(len(s) == 1 for s in speakers.values())  # one speaker each, disjoint
    assert speakers["validation"] != speakers["testing"]
    assert all(len(v) == 4 for v in lists.values())
    assert json.loads((root / MARKER).read_text())["config"]["n_speakers"] == 3
    assert is_complete(root, cfg) and not is_complete(root)
    index = build_index(root, silence_fraction=1.0, unknown_fraction=None)
    assert [len(index[s]) for s in ("train", "val", "test")] == [4 + 3, 4 + 3, 4 + 3]
    assert sum(1 for _, y in index["train"] if y == class_names().index(UNKNOWN)) == 1


def test_espeak_repeats_exactly() -> None:
    """The same word, voice and parameters give the same samples, whatever was spoken before
    (espeak-ng's own state, and libc rand() for the "klatt 6" variants, are reset per call)."""
    pytest.importorskip("espeakng_loader")
    from speech.synth import _engine

    engine = _engine()
    for voice in ("en-us", "en-gb-x-rp+caleb", "en+klatt"):
        takes = []
        for other in ("stop", "marvin", "go"):
            takes.append(engine.say("seven", voice, 200.0, 60.0, 40.0).tobytes())
            engine.say(other, "en-029+Reed", 300.0, 90.0, 90.0)
        assert takes[0] == takes[1] == takes[2]


def _file_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file of a synthetic tree but the marker (it records timing and workers)."""
    from speech.synth import MARKER

    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MARKER
    }


def test_synth_tree_is_byte_reproducible(tmp_path: Path) -> None:
    """Generating the same config twice, in spawned workers or in this process, gives
    byte-identical WAV files and split lists."""
    pytest.importorskip("espeakng_loader")
    from speech.synth import SynthConfig, generate_dataset

    cfg = dict(
        n_speakers=4,
        keywords_per_speaker=2,
        others_per_speaker=1,
        repeat_prob=0.3,
        noise_mix=(0.2, 0.6, 0.2),
        noise_prob=0.5,
        reverb_prob=0.5,
        bandlimit_prob=0.5,
        variant_prob=0.5,
        noise_seconds=1.0,
    )
    hashes = [
        _file_hashes(generate_dataset(tmp_path / f"t{i}", SynthConfig(**cfg, workers=w), False))
        for i, w in enumerate((2, 1, 1))
    ]
    wavs = [name for name in hashes[0] if name.endswith(".wav")]
    assert len(wavs) >= 4 * 3 + 5 and "testing_list.txt" in hashes[0]
    assert hashes[0] == hashes[1] == hashes[2]


def test_synth_refuses_foreign_folder(tree: Path) -> None:
    pytest.importorskip("espeakng_loader")
    from speech.synth import SynthConfig, generate_dataset

    with pytest.raises(FileExistsError, match="refusing"):
        generate_dataset(tree, SynthConfig(n_speakers=3), progress=False)
    assert (tree / "yes" / "aaaa0001_nohash_0.wav").exists()
