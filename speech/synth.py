"""Synthetic Speech Commands: the 30 v0.01 words spoken by espeak-ng, in the real dataset's layout.

No real keyword recordings can be downloaded here, so the default speech data is generated: many
synthetic "speakers" (English voice x voice variant x rate x pitch x pitch range x a resampling
warp of formants and tempo) say the words, and each clip gets what real recordings have: noise at
0-30 dB SNR on some clips (coloured, babble of other synthetic speech, mains hum), a random level, a
random position inside the 1 s clip, some reverberation and band-limiting. The tree matches
Speech Commands v0.01, so `speech.data` reads it like the real thing::

    <root>/<word>/<speaker hash>_nohash_<n>.wav   16-bit mono 16 kHz, 1 s
    <root>/_background_noise_/*.wav                60 s noise files (silence class)
    <root>/validation_list.txt, testing_list.txt   speaker-disjoint splits
    <root>/SYNTH_DONE.json                          config and counts

espeak-ng (GPL-3.0-or-later) comes from the `espeakng-loader` wheel and is only loaded at run
time, through its C API over ctypes, a fresh library instance per utterance (see `Espeak`). The
tree is byte-reproducible: the same SynthConfig gives the same files with any number of workers.
Accuracies on this data are synthetic-speech results, never Speech Commands results.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import multiprocessing
import os
import shutil
import time
import weakref
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy.io import wavfile
from scipy.signal import butter, fftconvolve, firwin, resample_poly, sosfilt

from speech.data import (
    BACKGROUND_DIR,
    GOOGLE12_KEYWORDS,
    SAMPLE_RATE,
    TESTING_LIST,
    V1_OTHER_WORDS,
    VALIDATION_LIST,
)
from strlowrank.method.cache import MARKER as BUILT
from strlowrank.method.cache import build_once, cache_root, is_built, write_atomic

DATA_VERSION = "speech_synth_v2"
MARKER = "SYNTH_DONE.json"
IN_PROGRESS = "SYNTH_IN_PROGRESS"
ENGLISH_VOICES = (
    "en-us",
    "en",
    "en-gb-x-rp",
    "en-gb-scotland",
    "en-029",
    "en-us-nyc",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
)
BABBLE_SENTENCES = (
    "the weather will change by tomorrow morning",
    "please pass me the salt and pepper",
    "we are meeting at the station later",
    "this is a very long queue for coffee",
    "my brother bought a new bicycle",
    "could you open the window a little",
    "the train was late again today",
    "they painted the kitchen bright yellow",
    "I think the film starts at eight thirty",
    "she is reading a book about gardens",
)
NOISE_FILES = ("white_noise", "pink_noise", "brown_noise", "babble", "hum")
_ESPEAK_RATE = 22050


@dataclass
class SynthConfig:
    """Everything that shapes the synthetic dataset (stored in SYNTH_DONE.json)."""

    # Splits: 405 train / 75 validation / 270 test speakers (5,844 / 1,082 / 3,875 clips, 10,801
    # in all). The test split is large so that one point of accuracy is about two standard errors.
    n_speakers: int = 750  # synthetic speakers; the default gives about 10,800 clips
    keywords_per_speaker: int = 10  # Google-12 keywords each speaker says (random subset of 10)
    others_per_speaker: int = 3  # other v0.01 words each speaker says (random subset of 20)
    repeat_prob: float = 0.1  # chance of a second take (<hash>_nohash_1.wav) of a word
    val_fraction: float = 0.1  # speakers in validation_list.txt
    test_fraction: float = 0.36  # speakers in testing_list.txt
    seed: int = 0  # fixes speakers, words and every clip's random parameters
    workers: int = 2  # synthesis processes; <= 1 synthesizes in this process
    # speaker voice: espeak voice x variant x rate (words/min) x pitch x pitch range (0-100).
    # The difficulty defaults below were tuned for a GRU-128 (docs/SPEECH_DATA.md); wider voice
    # ranges, more noise and freer positions all make the task markedly harder.
    variant_prob: float = 0.3  # chance a speaker uses one of espeak's ~100 voice variants
    rate_range: tuple[float, float] = (130.0, 260.0)
    pitch_range: tuple[float, float] = (15.0, 85.0)
    intonation_range: tuple[float, float] = (0.0, 100.0)
    warp_range: tuple[float, float] = (0.97, 1.03)  # resampling: tempo x warp, formants / warp
    clip_jitter: float = 0.05  # per-clip relative jitter of rate and pitch around the speaker's
    # per clip: noise, level, position, room, channel
    noise_prob: float = 0.25  # chance a clip gets additive noise at snr_db_range
    snr_db_range: tuple[float, float] = (0.0, 30.0)  # uniform SNR of speech over noise
    noise_mix: tuple[float, float, float] = (0.7, 0.15, 0.15)  # coloured, babble, hum weights
    babble_snr_offset_db: float = 6.0  # babble is other speech: keep it this much quieter
    gain_db_range: tuple[float, float] = (-30.0, -1.0)  # peak level of the final clip, dBFS
    max_overhang: float = 0.0  # fraction of a word that may fall outside the 1 s clip
    position_spread: float = 0.3  # word position: 0 centred, 1 uniform over the whole clip
    reverb_prob: float = 0.1  # chance of a synthetic room impulse response
    rt60_range: tuple[float, float] = (0.1, 0.4)  # reverberation time, seconds
    bandlimit_prob: float = 0.1  # chance of a telephone-like or muffled band-pass
    lowpass_hz_range: tuple[float, float] = (2500.0, 7000.0)
    noise_seconds: float = 60.0  # length of each _background_noise_ file
    skip_variants: tuple[str, ...] = field(default_factory=tuple)  # variant names to leave out

    def __post_init__(self) -> None:
        if self.n_speakers < 1 or not 0 <= self.val_fraction + self.test_fraction < 1:
            raise ValueError("need n_speakers >= 1 and val_fraction + test_fraction < 1")
        if not 0 <= self.keywords_per_speaker <= len(GOOGLE12_KEYWORDS):
            raise ValueError(f"keywords_per_speaker must be in [0, {len(GOOGLE12_KEYWORDS)}]")
        if not 0 <= self.others_per_speaker <= len(V1_OTHER_WORDS):
            raise ValueError(f"others_per_speaker must be in [0, {len(V1_OTHER_WORDS)}]")


@dataclass
class Speaker:
    """One synthetic speaker: an espeak voice setting and the takes it says."""

    index: int
    name: str  # 8 hex digits, the <speaker hash> of the file names
    voice: str  # "en-us" or "en-us+variant"
    rate: float
    pitch: float
    intonation: float
    warp: float
    takes: list[tuple[str, int]]  # (word, take number)


class Espeak:
    """espeak-ng's classic C API over ctypes, with a fresh library instance for every utterance.

    espeak-ng keeps synthesis state in static variables from one utterance to the next (among
    others the wave generator's phase, flutter index and gain control, and the noise generator
    used for breath and the Klatt voices), and no public call resets them: the same text, voice
    and parameters give different samples depending on what was spoken before. So `say` loads a
    private copy of the shared library, initializes it, speaks, terminates and unloads it: every
    utterance starts from the state right after espeak_Initialize, and the audio depends only on
    its arguments. This costs about 2.5 ms per utterance (loading the phoneme data again); the
    constructor checks that unloading really resets the library.
    """

    def __init__(self) -> None:
        import espeakng_loader  # GPL-3.0-or-later espeak-ng, loaded only at run time

        self._library = self._private_copy(espeakng_loader.get_library_path())
        self._data_parent = str(Path(espeakng_loader.get_data_path()).parent).encode()
        self._chunks: list[np.ndarray] = []
        proto = ctypes.CFUNCTYPE(
            ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
        )
        self._callback = proto(self._collect)  # keep a reference: C holds the pointer
        # The "klatt 6" variants' noise comes from the C library's rand(), seeded before each
        # utterance (the process-wide libc is not part of the unloaded copy).
        self._libc = ctypes.CDLL(None) if os.name == "posix" else None
        probe = [self.say("seven", "en-us", 200.0, 60.0, 50.0) for _ in range(2)]
        if probe[0].tobytes() != probe[1].tobytes():
            raise RuntimeError(
                "espeak-ng keeps its state after unloading; audio would not be reproducible"
            )

    def _private_copy(self, source: str) -> str:
        """A path to load the library from that no other code in this process uses, so that
        dlclose really unloads it: an in-memory copy on Linux (memfd), else the file itself."""
        if not hasattr(os, "memfd_create"):
            return source
        fd = os.memfd_create(Path(source).name)
        weakref.finalize(self, os.close, fd)
        with open(source, "rb") as src, open(fd, "wb", closefd=False) as dst:
            shutil.copyfileobj(src, dst)
        return f"/proc/self/fd/{fd}"

    def _load(self) -> ctypes.CDLL:
        """A freshly loaded and initialized library instance (synchronous output, 22,050 Hz)."""
        lib = ctypes.CDLL(self._library, mode=os.RTLD_LOCAL if hasattr(os, "RTLD_LOCAL") else 0)
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p]
        lib.espeak_Initialize.argtypes += [ctypes.c_int]
        if lib.espeak_Initialize(2, 0, self._data_parent, 0) != _ESPEAK_RATE:  # 2 = synchronous
            _unload(lib)
            raise RuntimeError("espeak_Initialize failed")
        if hasattr(lib, "espeak_ng_SetRandSeed"):  # newer versions seed from the clock
            lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
            lib.espeak_ng_SetRandSeed(1)
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint]
        lib.espeak_Synth.argtypes += [ctypes.c_int, ctypes.c_uint, ctypes.c_uint]
        lib.espeak_Synth.argtypes += [ctypes.c_void_p, ctypes.c_void_p]
        lib.espeak_SetSynthCallback(self._callback)
        return lib

    def _collect(self, wav, n: int, events) -> int:
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0

    def say(
        self, text: str, voice: str, rate: float, pitch: float, intonation: float
    ) -> np.ndarray:
        """Speak text -> float32 waveform [L] at 22,050 Hz in [-1, 1]; the same arguments always
        give the same samples."""
        lib = self._load()
        try:
            if lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise ValueError(f"espeak-ng has no voice {voice!r}")
            for param, value in ((1, rate), (3, pitch), (4, intonation)):  # RATE, PITCH, RANGE
                lib.espeak_SetParameter(param, int(round(value)), 0)
            data = text.encode()
            self._chunks = []
            if self._libc is not None:
                self._libc.srand(1)
            lib.espeak_Synth(data, len(data) + 1, 0, 1, 0, 1, None, None)  # POS_CHARACTER, UTF8
            lib.espeak_Synchronize()
        finally:
            lib.espeak_Terminate()
            _unload(lib)
        if not self._chunks:
            return np.zeros(0, np.float32)
        return np.concatenate(self._chunks).astype(np.float32) / 32768.0


def _unload(lib: ctypes.CDLL) -> None:
    """dlclose (FreeLibrary on Windows) a library loaded with ctypes; lib must not be used after."""
    import _ctypes  # ctypes has no public unload

    close = getattr(_ctypes, "dlclose", None) or _ctypes.FreeLibrary
    close(lib._handle)


@lru_cache(maxsize=1)
def _engine() -> Espeak:
    """This process's espeak-ng wrapper, created on first use."""
    return Espeak()


def voice_variants(skip: tuple[str, ...] = ()) -> list[str]:
    """Names of espeak-ng's voice variants (espeak-ng-data/voices/!v), without names with spaces."""
    import espeakng_loader

    folder = Path(espeakng_loader.get_data_path()) / "voices" / "!v"
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    return [n for n in names if " " not in n and n not in skip]


def default_data_dir() -> Path:
    """``$STRLOWRANK_CACHE/<DATA_VERSION>``, else ``~/.cache/strlowrank/<DATA_VERSION>``."""
    return cache_root() / DATA_VERSION


def make_speakers(cfg: SynthConfig) -> list[Speaker]:
    """The cfg.n_speakers synthetic speakers with their voices and takes (fixed by cfg.seed)."""
    rng = np.random.default_rng([cfg.seed, 1])
    variants = voice_variants(cfg.skip_variants)
    speakers = []
    for i in range(cfg.n_speakers):
        voice = str(rng.choice(ENGLISH_VOICES))
        if variants and rng.random() < cfg.variant_prob:
            voice += "+" + str(rng.choice(variants))
        words = list(rng.choice(GOOGLE12_KEYWORDS, cfg.keywords_per_speaker, replace=False))
        words += list(rng.choice(V1_OTHER_WORDS, cfg.others_per_speaker, replace=False))
        takes = [(str(w), 0) for w in words]
        takes += [(str(w), 1) for w in words if rng.random() < cfg.repeat_prob]
        name = hashlib.sha1(f"{DATA_VERSION}:{cfg.seed}:{i}".encode()).hexdigest()[:8]
        speakers.append(
            Speaker(
                index=i,
                name=name,
                voice=voice,
                rate=rng.uniform(*cfg.rate_range),
                pitch=rng.uniform(*cfg.pitch_range),
                intonation=rng.uniform(*cfg.intonation_range),
                warp=rng.uniform(*cfg.warp_range),
                takes=takes,
            )
        )
    return speakers


def split_speakers(cfg: SynthConfig) -> tuple[set[int], set[int]]:
    """Speaker indices of the validation and test splits (disjoint; at least one each when
    n_speakers >= 3 and the fractions are positive)."""
    order = np.random.default_rng([cfg.seed, 2]).permutation(cfg.n_speakers)
    counts = []
    for fraction in (cfg.val_fraction, cfg.test_fraction):
        n = round(fraction * cfg.n_speakers)
        counts.append(max(n, 1) if fraction > 0 and cfg.n_speakers >= 3 else n)
    n_val, n_test = counts
    return set(order[:n_val].tolist()), set(order[n_val : n_val + n_test].tolist())


@lru_cache(maxsize=256)
def _lowpass(up: int, down: int) -> np.ndarray:
    """The anti-aliasing FIR filter resample_poly would design for up/down (cached: it is the
    slowest part of resampling one word)."""
    max_rate = max(up, down)
    return firwin(10 * max_rate + 1, 1.0 / max_rate, window=("kaiser", 5.0))


def _to_16k(x: np.ndarray, warp: float = 1.0) -> np.ndarray:
    """espeak output at 22,050 Hz -> 16 kHz; warp > 1 slows down and lowers pitch and formants
    (the warp is quantized to steps of 1/320)."""
    up = max(1, round(320 * warp))
    y = resample_poly(x.astype(np.float64), up, 441, window=_lowpass(up, 441))
    return y.astype(np.float32)


def _trim(x: np.ndarray, rel: float = 0.02, margin: int = 160) -> np.ndarray:
    """Cut leading and trailing near-silence (below rel x peak), keeping `margin` samples."""
    loud = np.flatnonzero(np.abs(x) > rel * (np.abs(x).max() + 1e-9))
    if len(loud) == 0:
        return x
    return x[max(0, loud[0] - margin) : loud[-1] + margin]


def colored_noise(n: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise with power spectrum ~ 1/f^alpha (0 white, 1 pink, 2 brown), unit RMS: [n]."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, d=1.0 / SAMPLE_RATE)
    spec *= np.maximum(f, 20.0) ** (-alpha / 2.0)
    x = np.fft.irfft(spec, n)
    return (x / (x.std() + 1e-12)).astype(np.float32)


def hum(n: int, rng: np.random.Generator) -> np.ndarray:
    """Mains hum (50 or 60 Hz and harmonics) over a little fan-like noise, unit RMS: [n]."""
    t = np.arange(n) / SAMPLE_RATE
    base = 50.0 if rng.random() < 0.5 else 60.0
    x = sum(
        rng.uniform(0.1, 1.0) / k * np.sin(2 * np.pi * base * k * t + rng.uniform(0, 6.3))
        for k in range(1, 8)
    )
    x = x + 0.3 * colored_noise(n, 1.5, rng)
    return (x / (x.std() + 1e-12)).astype(np.float32)


def babble(n: int, rng: np.random.Generator, streams: int = 5) -> np.ndarray:
    """Several synthetic talkers reading sentences over each other (no keywords), unit RMS: [n]."""
    engine, variants = _engine(), voice_variants()
    out = np.zeros(n, np.float32)
    for _ in range(streams):
        pos = int(rng.integers(0, SAMPLE_RATE))
        voice = str(rng.choice(ENGLISH_VOICES)) + "+" + str(rng.choice(variants))
        while pos < n:
            text = str(rng.choice(BABBLE_SENTENCES))
            y = engine.say(text, voice, rng.uniform(130, 260), rng.uniform(10, 90), 60)
            y = _to_16k(y, rng.uniform(0.9, 1.1))[: n - pos]
            out[pos : pos + len(y)] += y / (np.abs(y).max() + 1e-9)
            pos += len(y) + int(rng.integers(0, SAMPLE_RATE // 4))
    return out / (out.std() + 1e-12)


@lru_cache(maxsize=2)
def _babble_pool(seed: int) -> np.ndarray:
    """20 s of babble shared by the clips synthesized in this process: [320000]."""
    return babble(20 * SAMPLE_RATE, np.random.default_rng([seed, 3]))


def clip_noise(n: int, rng: np.random.Generator, cfg: SynthConfig) -> tuple[np.ndarray, str]:
    """Noise for one clip, unit RMS, drawn by cfg.noise_mix: ([n], "colored"|"babble"|"hum")."""
    weights = np.asarray(cfg.noise_mix, dtype=float)
    kind = str(rng.choice(("colored", "babble", "hum"), p=weights / weights.sum()))
    if kind == "colored":
        return colored_noise(n, rng.uniform(0.0, 2.0), rng), kind
    if kind == "babble":
        pool = _babble_pool(cfg.seed)
        start = int(rng.integers(0, len(pool) - n))
        return pool[start : start + n].copy(), kind
    return hum(n, rng), kind


def _room(x: np.ndarray, rng: np.random.Generator, cfg: SynthConfig) -> np.ndarray:
    """Maybe convolve with a synthetic room response: direct path + exponentially decaying noise
    tail of reverberation time rt60 at a direct-to-reverberant ratio of -3..10 dB: [L] -> [L']."""
    if rng.random() >= cfg.reverb_prob:
        return x
    rt60 = rng.uniform(*cfg.rt60_range)
    t = np.arange(1, int(rt60 * SAMPLE_RATE)) / SAMPLE_RATE
    tail = rng.standard_normal(len(t)) * np.exp(-6.91 * t / rt60)
    tail *= 10 ** (-rng.uniform(-3.0, 10.0) / 20) / (np.sqrt(np.sum(tail**2)) + 1e-12)
    y = fftconvolve(x, np.concatenate([[1.0], tail]))
    return y[: len(x) + len(t) // 3].astype(np.float32)


def _channel(x: np.ndarray, rng: np.random.Generator, cfg: SynthConfig) -> np.ndarray:
    """Maybe band-limit like a cheap microphone or phone line (4th-order Butterworth band-pass)."""
    if rng.random() >= cfg.bandlimit_prob:
        return x
    low, high = rng.uniform(50.0, 400.0), rng.uniform(*cfg.lowpass_hz_range)
    return sosfilt(_bandpass(round(low, -1), round(high, -2)), x).astype(np.float32)


@lru_cache(maxsize=1024)
def _bandpass(low: float, high: float) -> np.ndarray:
    """Second-order sections of a 4th-order Butterworth band-pass (cached by rounded edges)."""
    return butter(4, [low, high], "bandpass", fs=SAMPLE_RATE, output="sos")


def _place(x: np.ndarray, rng: np.random.Generator, cfg: SynthConfig) -> tuple[np.ndarray, slice]:
    """Put the word at a random position in a 1 s clip (uniform over the central position_spread
    of the possible starts); up to max_overhang of it may fall outside.
    Returns (clip [16000], slice of the clip the word occupies)."""
    m, n = len(x), SAMPLE_RATE
    over = int(cfg.max_overhang * m)
    lo, hi = -over, n - m + over
    half = max(hi - lo, 0) / 2 * cfg.position_spread
    start = round((lo + hi) / 2 + rng.uniform(-half, half)) if hi >= lo else (n - m) // 2
    clip = np.zeros(n, np.float32)
    a, b = max(start, 0), min(start + m, n)
    clip[a:b] = x[a - start : b - start]
    return clip, slice(a, b)


def _mix(clip: np.ndarray, word: slice, rng: np.random.Generator, cfg: SynthConfig) -> np.ndarray:
    """Add noise at the drawn SNR (speech power measured over the word) and set the peak level:
    [16000] float -> [16000] int16. Clips without drawn noise still get a 30-50 dB noise floor."""
    power = float(np.mean(clip[word] ** 2)) + 1e-12
    noisy = rng.random() < cfg.noise_prob
    snr = rng.uniform(*cfg.snr_db_range) if noisy else rng.uniform(30.0, 50.0)
    noise, kind = clip_noise(len(clip), rng, cfg)
    snr += cfg.babble_snr_offset_db if kind == "babble" else 0.0
    y = clip + noise * np.sqrt(power / 10 ** (snr / 10))
    y *= 10 ** (rng.uniform(*cfg.gain_db_range) / 20) / (np.abs(y).max() + 1e-12)
    return np.clip(np.round(y * 32767), -32768, 32767).astype(np.int16)


def render_clip(
    speaker: Speaker, word: str, rng: np.random.Generator, cfg: SynthConfig
) -> np.ndarray:
    """One recording of `word` by `speaker`: synthesize, warp, room, channel, place, noise, level.
    Returns int16 samples [16000] at 16 kHz."""
    jitter = 1.0 + rng.uniform(-cfg.clip_jitter, cfg.clip_jitter, size=2)
    pitch = float(np.clip(speaker.pitch * jitter[1], 0, 100))
    x = _engine().say(word, speaker.voice, speaker.rate * jitter[0], pitch, speaker.intonation)
    x = _to_16k(_trim(x), speaker.warp)
    x = _channel(_room(x, rng, cfg), rng, cfg)
    clip, span = _place(x / (np.abs(x).max() + 1e-9), rng, cfg)
    return _mix(clip, span, rng, cfg)


def _noise_file(name: str, cfg: SynthConfig) -> np.ndarray:
    """One _background_noise_ recording, int16 [noise_seconds * 16000] at -35..-18 dBFS RMS."""
    rng = np.random.default_rng([cfg.seed, 5, NOISE_FILES.index(name)])
    n = int(cfg.noise_seconds * SAMPLE_RATE)
    alphas = {"white_noise": 0.0, "pink_noise": 1.0, "brown_noise": 2.0}
    if name in alphas:
        x = colored_noise(n, alphas[name], rng)
    else:
        x = babble(n, rng, streams=6) if name == "babble" else hum(n, rng)
    x = x * 10 ** (rng.uniform(-35.0, -18.0) / 20)
    return np.clip(np.round(x * 32767), -32768, 32767).astype(np.int16)


def _run_job(job: tuple) -> tuple[int, list[str]]:
    """Worker entry: ("noise", name, cfg, root) or ("speaker", speaker, cfg, root).
    Writes the WAV files and returns (speaker index or -1, relative paths of the clips)."""
    kind, what, cfg, root = job
    if kind == "noise":
        path = Path(root) / BACKGROUND_DIR / f"{what}.wav"
        wavfile.write(path, SAMPLE_RATE, _noise_file(what, cfg))
        return -1, []
    rng = np.random.default_rng([cfg.seed, 4, what.index])
    rels = []
    for word, take in what.takes:
        rel = f"{word}/{what.name}_nohash_{take}.wav"
        wavfile.write(Path(root) / rel, SAMPLE_RATE, render_clip(what, word, rng, cfg))
        rels.append(rel)
    return what.index, rels


def _prepare_root(root: Path) -> None:
    """Refuse a non-empty root that is not a synthetic tree (complete, or left by a killed
    generation), so that replacing it never deletes real data."""
    if root.is_dir() and any(root.iterdir()):
        if not any((root / name).exists() for name in (BUILT, MARKER, IN_PROGRESS)):
            raise FileExistsError(f"{root}: not empty and not a synthetic speech tree; refusing")


def _run_jobs(jobs: list[tuple], workers: int, total: int, progress: bool) -> dict[int, list[str]]:
    """Run jobs in `workers` spawned processes (or here when workers <= 1) with a progress bar.
    Returns speaker index -> relative clip paths."""
    from tqdm.auto import tqdm

    done: dict[int, list[str]] = {}
    with contextlib.ExitStack() as stack:
        if workers > 1:
            pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(workers))
            results = pool.imap(_run_job, jobs, chunksize=2)
        else:
            results = map(_run_job, jobs)
        bar = stack.enter_context(
            tqdm(total=total, unit="clip", desc="synthesizing speech", disable=not progress)
        )
        for index, rels in results:
            if index >= 0:
                done[index] = rels
                bar.update(len(rels))
    return done


def _tree_key(cfg: SynthConfig) -> str:
    """The completion key of a tree (`strlowrank.method.cache.build_once`): data version and config,
    less the worker count (the bytes do not depend on it)."""
    config = {k: v for k, v in asdict(cfg).items() if k != "workers"}
    return json.dumps({"version": DATA_VERSION, "config": config}, sort_keys=True)


def generate_dataset(
    root: str | Path, cfg: SynthConfig | None = None, progress: bool = True
) -> Path:
    """Write a synthetic Speech Commands v0.01 tree under root (see the module docstring).

    Split lists are speaker-disjoint. The tree is built once (`strlowrank.method.cache.build_once`:
    in a temporary sibling renamed into place under an inter-process lock), so concurrent calls
    generate it once; a complete tree with the same cfg is reused, an incomplete one or one
    with another cfg is replaced. Returns root."""
    cfg = cfg or SynthConfig()
    root = Path(root)
    _prepare_root(root)
    return build_once(root, lambda tmp: _write_tree(tmp, cfg, progress), key=_tree_key(cfg))


def _write_tree(root: Path, cfg: SynthConfig, progress: bool) -> None:
    """Synthesize every clip, the noise files, the split lists and SYNTH_DONE.json into root."""
    start = time.perf_counter()
    speakers = make_speakers(cfg)
    val, test = split_speakers(cfg)
    for name in {word for s in speakers for word, _ in s.takes} | {BACKGROUND_DIR}:
        (root / name).mkdir()
    jobs = [("noise", name, cfg, str(root)) for name in NOISE_FILES]
    jobs += [("speaker", s, cfg, str(root)) for s in speakers]
    total = sum(len(s.takes) for s in speakers)
    done = _run_jobs(jobs, cfg.workers, total, progress)
    for list_name, members in ((VALIDATION_LIST, val), (TESTING_LIST, test)):
        rels = sorted(rel for i in members for rel in done[i])
        write_atomic(root / list_name, "".join(f"{rel}\n" for rel in rels))
    marker = {
        "version": DATA_VERSION,
        "config": asdict(cfg),
        "n_clips": total,
        "n_speakers": {
            "train": cfg.n_speakers - len(val) - len(test),
            "val": len(val),
            "test": len(test),
        },
        "seconds": round(time.perf_counter() - start, 2),
        "synthesizer": "espeak-ng (GPL-3.0-or-later) via espeakng-loader, loaded at run time",
    }
    write_atomic(root / MARKER, json.dumps(marker, indent=2))


def is_complete(root: str | Path, cfg: SynthConfig | None = None) -> bool:
    """True when root holds a finished tree generated with cfg (default SynthConfig())."""
    return is_built(root, _tree_key(cfg or SynthConfig()))


def ensure_default_data(progress: bool = True) -> Path:
    """The default synthetic tree in `default_data_dir()`, generated first if it is missing,
    incomplete or made with other defaults. Returns its path."""
    root = default_data_dir()
    if not is_complete(root):
        generate_dataset(root, SynthConfig(), progress=progress)
    return root
