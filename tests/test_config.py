"""Config layering (defaults < YAML < command line) and one-line errors naming the field."""

from dataclasses import dataclass

import pytest

from strlowrank.cli import parse_config, parse_overrides
from strlowrank.config import ConfigError, from_dict, load_config, option, to_dict
from strlowrank.engine import TrainConfig, role_lr_scales


@dataclass
class DataCfg:
    root: str | None = option(None, "dataset root")


@dataclass
class Cfg:
    out: str = option("runs/x", "run folder")
    target: float | None = option(None, "target sparsity", min=0.0, max=1.0)
    data: DataCfg = option(factory=DataCfg)
    train: TrainConfig = option(factory=TrainConfig)


def test_layering(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.5\n  epochs: 3\nout: from_yaml\n")
    cfg, args = parse_config(Cfg, "t", ["--config", str(path), "--epochs", "7",
                                        "--train.optimizer=adam", "--data-dir", "/d"])
    assert cfg.train.lr == 0.5 and cfg.train.epochs == 7 and cfg.train.optimizer == "adam"
    assert cfg.out == "from_yaml" and cfg.data.root == "/d"
    assert to_dict(from_dict(Cfg, to_dict(cfg))) == to_dict(cfg)


@pytest.mark.parametrize("overrides,message", [
    ({"train.lrr": 1}, "unknown config key 'train.lrr'"),
    ({"train.lr": "fast"}, "train.lr: expected float"),
    ({"train.epochs": 2.5}, "train.epochs: expected int"),
    ({"train.epochs": 0}, "train.epochs: must be >= 1"),
    ({"target": 1.5}, "target: must be <= 1.0"),
    ({"train.weight_decay": -1e-4}, "train.weight_decay: must be >= 0.0"),
    ({"train.optimizer": "lbfgs"}, "train.optimizer: must be one of"),
    ({"train.progress": "yes please"}, "train.progress: expected bool"),
])
def test_errors_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Cfg, None, overrides)


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Cfg, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(Cfg, bad)
    evil = tmp_path / "evil.yaml"
    evil.write_text("out: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Cfg, evil)


def test_override_parsing():
    assert parse_overrides(["--a.b", "1e-3", "--c.d=[x, y]", "--e.f=true"]) == {
        "a.b": 1e-3, "c.d": ["x", "y"], "e.f": True}
    with pytest.raises(ConfigError, match="unrecognized argument: --bogus"):
        parse_overrides(["--bogus", "1"])
    with pytest.raises(ConfigError, match="missing value"):
        parse_overrides(["--a.b"])


def test_shipped_configs_load():
    """Every YAML in configs/ is valid for its track (paper recipes keep their exact numbers)."""
    from pathlib import Path

    from speech.config import SpeechConfig
    from strlowrank.cli import SHORTCUTS
    from strlowrank.sweep import expand, load_grid
    from vision.config import VisionConfig

    paths = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert len(paths) >= 8
    for path in paths:
        if path.name.startswith("sweep_"):  # sweep grids: every run's overrides are valid
            spec = load_grid(path)
            cls = SpeechConfig if "speech" in path.name else VisionConfig
            for run in expand(spec):  # sweep arguments may use the CLI shortcuts (epochs, seed)
                args = {**spec["base"], **run.overrides}
                base = args.pop("config", None)  # --config FILE, relative to the repository
                base = path.parents[1] / base if base else None
                load_config(cls, base, {SHORTCUTS.get(k, k): v for k, v in args.items()})
            if path.name == "sweep_speech_frontier.yaml":  # {sweep}/<run> references resolve
                assert len(expand(spec, [0, 1, 2])) == 3 * 41
            continue
        cls = VisionConfig if path.name.startswith("vision_") else SpeechConfig
        cfg = load_config(cls, path)
        if path.name == "vision_resnet50_str90.yaml":
            assert cfg.method.s_init == -3200 and cfg.train.weight_decay == 2.251757813e-5
            assert cfg.train.lr == 0.256 and cfg.train.momentum == 0.875
            assert cfg.train.channels_last == "on"  # the YAML's true
        if path.name in ("vision_resnet50_str90.yaml", "vision_mobilenetv1_str89.yaml"):
            # thresholds on the run's clock: the paper's per-step lr at the paper's length
            scale = role_lr_scales(cfg.train, 5005 * 100)["threshold"]
            assert scale * cfg.train.lr == pytest.approx(0.256)
        if "x2" in path.name or "pergate" in path.name:  # two layers / one matrix per gate
            assert cfg.model.layers == (2 if "x2" in path.name else 1)
            assert cfg.model.split == ("per_gate" if "pergate" in path.name else "stacked")
        if path.name == "vision_mobilenetv1_str89.yaml":
            assert cfg.method.s_init == -12800 and cfg.train.threshold_decay == 3.751757813e-5
