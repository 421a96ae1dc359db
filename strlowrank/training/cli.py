"""The command line every entry point shares.

    --config FILE   YAML config (safe loader)         --out DIR       run folder
    --data-dir DIR  dataset root                       --epochs N      train.epochs
    --device NAME   train.device                       --seed N        train.seed
    --resume CKPT   continue a run                     --test-only     evaluate that checkpoint
    --init-from CKPT  model.init_from     --tag LABEL  tag      (tracks whose config has them)
    --target-sparsity S  (also -macs, -params, -rank)  controller.metric and controller.target
    --section.field VALUE (or =VALUE)                  any other config field, YAML-typed

Precedence: dataclass defaults < --config < the flags above and dotted overrides. User errors
(bad config, missing data, unreadable checkpoint) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from strlowrank.training.config import ConfigError, describe_fields, load_config, parse_value
from strlowrank.training.measures import METRICS

SHORTCUTS = {
    "epochs": "train.epochs",
    "device": "train.device",
    "seed": "train.seed",
    "data_dir": "data.root",
    "out": "out",
    "init_from": "model.init_from",
    "tag": "tag",
}


def build_parser(
    description: str, cfg_cls: type, prog: str | None = None
) -> argparse.ArgumentParser:
    """Parser with the shared flags; every config field is listed in the --help epilog."""
    rows = describe_fields(cfg_cls)
    width = max(len(r[0]) for r in rows) + 2
    lines = [
        f"  --{name:<{width}} {help_} [{tname}, default: {default!r}"
        + (f", {choices}]" if choices else "]")
        for name, tname, default, help_, choices in rows
    ]
    epilog = "config fields (override any with --NAME VALUE, YAML syntax):\n" + "\n".join(lines)
    p = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML file with config fields (see below)")
    p.add_argument(
        "--out",
        help="run folder: config.yaml, metrics.csv, budget.csv, summary.json, "
        "checkpoint.pt, plots/",
    )
    p.add_argument("--data-dir", help="dataset root (default: the embedded default data)")
    p.add_argument("--epochs", type=int, help="number of training epochs (train.epochs)")
    p.add_argument("--device", help="auto | cpu | cuda (train.device)")
    p.add_argument("--seed", type=int, help="random seed (train.seed)")
    p.add_argument("--resume", help="checkpoint.pt to continue from (or to evaluate)")
    p.add_argument(
        "--test-only",
        action="store_true",
        help="evaluate the --resume checkpoint on the test split and write summary.json",
    )
    names = {name for name, *_ in rows}
    if "model.init_from" in names:
        p.add_argument(
            "--init-from",
            help="checkpoint.pt of a trained model to initialize from (model.init_from)",
        )
    if "tag" in names:
        p.add_argument("--tag", help="a free label copied to summary.json (tag)")
    if any(name.startswith("controller.") for name, *_ in rows):
        g = p.add_argument_group("budget targets (a controller steers the threshold decay)")
        g.add_argument(
            "--target-sparsity", metavar="S", help="final overall sparsity, a fraction, e.g. 0.9"
        )
        g.add_argument("--target-macs", metavar="F", help="final sparse/dense MACs, e.g. 0.1")
        g.add_argument(
            "--target-params", metavar="N", help="final parameter count (nonzeros and factors)"
        )
        g.add_argument(
            "--target-rank", metavar="R", help="final sum of learned ranks (low-rank matrices)"
        )
    return p


def parse_overrides(extra: Sequence[str]) -> dict[str, Any]:
    """``['--train.lr', '0.1', '--model.cell=lstm']`` -> {'train.lr': 0.1, 'model.cell': 'lstm'}."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(extra):
        arg = extra[i]
        if not arg.startswith("--") or "." not in arg.split("=")[0]:
            raise ConfigError(f"unrecognized argument: {arg} (see --help)")
        if "=" in arg:
            key, text = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(extra):
                raise ConfigError(f"{arg}: missing value")
            key, text = arg[2:], extra[i + 1]
            i += 2
        out[key.replace("-", "_")] = parse_value(text)
    return out


def expand_target_flags(argv: Sequence[str], section: str = "controller") -> list[str]:
    """``--target-sparsity 0.9`` -> ``--controller.metric sparsity --controller.target 0.9``
    (also --target-macs, --target-params, --target-rank, and the ``--flag=value`` form)."""
    out: list[str] = []
    it = iter(argv)
    for arg in it:
        flag, eq, value = arg.partition("=")
        metric = flag.removeprefix("--target-")
        if flag.startswith("--target-") and metric in METRICS:
            value = value if eq else next(it, "")
            out += [f"--{section}.metric", metric, f"--{section}.target", value]
        else:
            out.append(arg)
    return out


def parse_config(
    cfg_cls: type, description: str, argv: Sequence[str] | None = None, prog: str | None = None
) -> tuple[Any, argparse.Namespace]:
    """Parse ``argv`` into (validated config, namespace with resume/test_only/config)."""
    parser = build_parser(description, cfg_cls, prog)
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(expand_target_flags(argv))
    overrides = parse_overrides(extra)
    for flag, key in SHORTCUTS.items():
        value = getattr(args, flag, None)  # --init-from, --tag only where the config has them
        if value is not None:
            overrides[key] = value
    if args.test_only and not args.resume:
        raise ConfigError("--test-only needs --resume CHECKPOINT")
    return load_config(cfg_cls, args.config, overrides), args


def run_main(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> int:
    """Run an entry point; user errors print one line (no traceback) and return 2.

    Set STRLOWRANK_DEBUG=1 to get the traceback instead.
    """
    from strlowrank.training.engine import Interrupted, TrainingError

    try:
        main(argv)
    except Interrupted as e:
        print(f"interrupted: {e}; continue with --resume", file=sys.stderr)
        return 143
    except (
        ConfigError,
        ValueError,
        FileNotFoundError,
        PermissionError,
        OSError,
        TrainingError,
    ) as e:
        if os.environ.get("STRLOWRANK_DEBUG"):
            raise
        message = str(e).strip()
        if "Original Traceback" in message:  # re-raised from a DataLoader worker
            message = message.splitlines()[-1]
        print(f"error: {message}", file=sys.stderr)
        return 2 if not isinstance(e, TrainingError) else 1
    return 0


def execute(
    cfg: Any, args: argparse.Namespace, build_task: Callable, report: Callable | None = None
) -> dict[str, Any]:
    """Compose a run: seed, (DDP), run folder, task, train or --test-only, report.

    ``build_task(cfg, info) -> Task``; ``report(model, out_dir, summary, plots)`` runs on rank 0
    at the end (``plots``: ``train.plots``, draw plots/). The resolved config is written to
    ``<out>/config.yaml`` before training.
    """
    from pathlib import Path

    from strlowrank.training.checkpoint import load_checkpoint, load_model_state, seed_everything
    from strlowrank.training.config import save_config, to_dict
    from strlowrank.training.distributed import cleanup, init_distributed
    from strlowrank.training.engine import Trainer

    info = init_distributed(cfg.train.device)
    try:
        seed_everything(cfg.train.seed)
        out = Path(cfg.out)
        if info.is_main:
            try:
                out.mkdir(parents=True, exist_ok=True)
                save_config(cfg, out / "config.yaml")
            except OSError as e:
                raise OSError(f"cannot write the run folder {out}: {e.strerror or e}") from None
        task = build_task(cfg, info)
        trainer = Trainer(task, cfg.train, out, info, to_dict(cfg))
        if args.test_only:
            state = load_checkpoint(args.resume, map_location=info.device)
            load_model_state(trainer.model, state["model"], args.resume)
            summary = trainer.finish()
        else:
            summary = trainer.fit(resume=args.resume)
        if info.is_main:
            if report is not None:
                report(trainer.model, out, summary, cfg.train.plots)
            shown = {k: v for k, v in summary.items() if k.endswith("acc") or k == "sparsity"}
            print("summary: " + "  ".join(f"{k} {v:.4f}" for k, v in shown.items()))
            print(f"run folder: {out}")
        return summary
    finally:
        cleanup(info)
