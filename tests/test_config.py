"""Config layering (defaults < YAML < command line) and one-line errors naming the field."""

import dataclasses
import typing
from dataclasses import dataclass

import pytest

from strlowrank.training.cli import parse_config, parse_overrides
from strlowrank.training.config import ConfigError, from_dict, load_config, option, to_dict
from strlowrank.training.train_config import TrainConfig


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
    cfg, args = parse_config(
        Cfg,
        "t",
        ["--config", str(path), "--epochs", "7", "--train.optimizer=adam", "--data-dir", "/d"],
    )
    assert cfg.train.lr == 0.5 and cfg.train.epochs == 7 and cfg.train.optimizer == "adam"
    assert cfg.out == "from_yaml" and cfg.data.root == "/d"
    assert to_dict(from_dict(Cfg, to_dict(cfg))) == to_dict(cfg)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"train.lrr": 1}, "unknown config key 'train.lrr'"),
        ({"train.lr": "fast"}, "train.lr: expected float"),
        ({"train.epochs": 2.5}, "train.epochs: expected int"),
        ({"train.epochs": 0}, "train.epochs: must be >= 1"),
        ({"target": 1.5}, "target: must be <= 1.0"),
        ({"train.weight_decay": -1e-4}, "train.weight_decay: must be >= 0.0"),
        ({"train.optimizer": "lbfgs"}, "train.optimizer: must be one of"),
        ({"train.progress": "yes please"}, "train.progress: expected bool"),
        # one field per decay; role mappings take known roles, valid values
        (
            {"train.role_decay": {"threshold": 0.1}},
            "train.role_decay.threshold: set train.threshold_decay instead",
        ),
        ({"train.role_decay": {"weight": 0.1}}, "train.role_decay.weight: set train.weight_decay"),
        (
            {"train.role_lr": {"spectrom": 1.0}},
            "train.role_lr: unknown key 'spectrom', must be one of",
        ),
        ({"train.role_lr": {"spectrum": -1.0}}, "train.role_lr.spectrum: must be >= 0.0"),
        (
            {"train.role_optimizer": {"threshold": "lbfgs"}},
            "train.role_optimizer.threshold: must be one of \\['sgd', 'adam', 'adamw'\\]",
        ),
    ],
)
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
        "a.b": 1e-3,
        "c.d": ["x", "y"],
        "e.f": True,
    }
    with pytest.raises(ConfigError, match="unrecognized argument: --bogus"):
        parse_overrides(["--bogus", "1"])
    with pytest.raises(ConfigError, match="missing value"):
        parse_overrides(["--a.b"])


def config_fields(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field, object]]:
    """(dotted name, field, annotation) of every leaf field of a config dataclass."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += config_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", f, hints[f.name]))
    return out


# paths, labels and name patterns
FREE_TEXT = {"out", "tag", "data.root", "method.budget", "model.init_from", "method.dense_layers"}


@pytest.mark.parametrize("track", ["vision", "speech"])
def test_every_enumerated_field_lists_its_choices(track):
    """Every string field but paths and labels has choices: a bad value gets one line naming
    the field and the choices, and --help lists them."""
    from speech.config import SpeechConfig
    from strlowrank.training.cli import build_parser
    from vision.config import VisionConfig

    cls = {"vision": VisionConfig, "speech": SpeechConfig}[track]
    help_text = build_parser("t", cls).format_help()
    enumerated = 0
    for name, f, tp in config_fields(cls):
        choices = f.metadata.get("choices")
        if typing.get_origin(tp) is dict:  # keyed by role: the keys are checked
            assert f.metadata.get("keys"), f"{name}: a mapping without its keys"
            continue
        if str in (tp, *typing.get_args(tp)) and name not in FREE_TEXT:
            assert choices, f"{name}: a string field without choices"
        if not choices:
            continue
        enumerated += 1
        with pytest.raises(ConfigError) as error:
            load_config(cls, None, {name: "bogus"})
        assert str(error.value) == f"{name}: must be one of {list(choices)}, got 'bogus'"
        assert f"--{name} " in help_text
        assert f"one of: {' | '.join(map(str, choices))}]" in help_text
    assert enumerated >= 10
