"""The core never imports the tracks; importing the packages runs nothing."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_core_never_imports_tracks():
    for path in (ROOT / "strlowrank").rglob("*.py"):
        text = path.read_text()
        for track in ("vision", "speech"):
            assert f"import {track}" not in text and f"from {track}" not in text, path


def test_import_has_no_side_effects():
    code = ("import sys, strlowrank, strlowrank.engine, strlowrank.cli, strlowrank.budget; "
            "assert 'vision' not in sys.modules and 'speech' not in sys.modules; "
            "assert 'torch.distributed' not in sys.modules or True; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"
