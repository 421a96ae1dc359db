"""Configuration of the speech track (``python speech/train_gru.py``): learned-rank GRU/LSTM
keyword spotting; defaults train the STR GRU-128 on the synthetic Speech Commands tree."""

from __future__ import annotations

from dataclasses import dataclass

from speech.features import FeatureConfig
from speech.models import SpeechModelConfig
from strlowrank.training.config import option
from strlowrank.training.controller_config import ControllerConfig
from strlowrank.training.train_config import TrainConfig


@dataclass
class SpeechDataConfig:
    name: str = option(
        "speech_commands",
        "speech_commands (keyword audio) | har2 | har6 (activity windows from smartphone "
        "sensors, docs/HAR.md)",
        choices=("speech_commands", "har2", "har6"),
    )
    root: str | None = option(
        None,
        "dataset root: a Speech Commands tree (default: the synthetic espeak tree) or a "
        "'UCI HAR Dataset' folder (default: windows of the HAPT recordings, fetched once)",
    )
    task: str = option(
        "google12", "google12 (10 words + unknown + silence) | all35", choices=("google12", "all35")
    )
    silence_fraction: float = option(
        0.1, "silence clips per split, relative to its keywords", min=0.0, max=1.0
    )
    unknown_fraction: float | None = option(
        0.1,
        "google12: unknown-word clips kept, relative to the keywords (null: keep all)",
        min=0.0,
        max=1.0,
    )
    augment_shift: int = option(0, "training augmentation: random time shift, in frames", min=0)
    augment_noise: float = option(0.0, "training augmentation: feature noise std", min=0.0)


@dataclass
class SpectraConfig:
    refactorize_every_epochs: int = option(
        0, "STR: re-orthonormalize P, Q by SVD every N epochs (0: never)", min=0
    )


@dataclass
class SpeechConfig:
    out: str = option("runs/speech", "run folder")
    tag: str | None = option(
        None,
        "a free label copied to summary.json (sweeps: the frontier "
        "budget a run belongs to); training ignores it",
    )
    data: SpeechDataConfig = option(factory=SpeechDataConfig)
    features: FeatureConfig = option(factory=FeatureConfig)
    model: SpeechModelConfig = option(factory=SpeechModelConfig)
    lowrank: SpectraConfig = option(factory=SpectraConfig)
    # singular values move from the first step (no dead time as with vision's s_init -10), so a
    # params / rank target ramps from the start; the decay on s saturates below the natural rank
    # (tau <= sigma_0), so corrections track the ramp (docs/CONTROLLER.md, speech measurements).
    # With a target the controller steers the decay on s from 0.01, the start the frontier of
    # docs/LEARNED_RANK.md was measured with; without one s keeps train.threshold_decay.
    controller: ControllerConfig = option(
        factory=lambda: ControllerConfig(start=0.0, correction="track", decay_init=0.01)
    )
    # docs/LEARNED_RANK.md: Adam for the factors P, Q and the rest; SGD (the paper's optimizer) for
    # the singular values (peak lr 30: their gradients are ~5e-4) and the thresholds (170 per run:
    # 0.1 per step x the default's 1,700 steps)
    train: TrainConfig = option(
        factory=lambda: TrainConfig(
            epochs=20,
            batch_size=64,
            optimizer="adam",
            lr=3e-3,
            weight_decay=0.0,
            momentum=0.9,
            threshold_decay=0.005,  # docs/METHOD.md section 6: 0.01 cost 1-2 points of accuracy
            spectrum_decay=3e-4,
            role_optimizer={"threshold": "sgd", "spectrum": "sgd"},
            role_lr={"spectrum": 30.0},
            role_lr_per_run={"threshold": 170.0},
            warmup_epochs=1.0,
            clip_grad=1.0,
        )
    )
