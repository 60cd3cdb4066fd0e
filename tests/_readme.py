"""Helpers for tests that run the README's shell lines verbatim."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def bash_block(heading: str) -> str:
    """Text of the first ```bash block in the README section `## <heading>`."""
    text = (REPO / "README.md").read_text()
    m = re.search(rf"^## {re.escape(heading)}\b.*?^```bash\n(.*?)^```", text, re.S | re.M)
    assert m, f"README has no ```bash block under '## {heading}'"
    return m.group(1)


def fake_system_python(root: Path, *, marked: bool = True, with_ensurepip: bool = True) -> Path:
    """A non-venv Python like Debian's: this interpreter's binary and stdlib under `root`, no pip,
    an EXTERNALLY-MANAGED marker in its stdlib (PEP 668). Returns the bin dir (holds `python3`)."""
    minor = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    stdlib = Path(sys.base_prefix) / "lib" / minor
    exe = Path(getattr(sys, "_base_executable", sys.executable)).resolve()
    if not (stdlib / "os.py").is_file() or not exe.is_file():
        import pytest

        pytest.skip(f"cannot lay out a copy of this Python (stdlib {stdlib}, binary {exe})")
    (root / "bin").mkdir(parents=True)
    lib = root / "lib" / minor
    (lib / "site-packages").mkdir(parents=True)
    shutil.copy2(exe, root / "bin" / "python3")
    for entry in stdlib.iterdir():
        if entry.name == "site-packages" or (entry.name == "ensurepip" and not with_ensurepip):
            continue
        (lib / entry.name).symlink_to(entry)
    if marked:
        (lib / "EXTERNALLY-MANAGED").write_text("[externally-managed]\nError=system Python (test marker)\n")
    out = subprocess.run([str(root / "bin" / "python3"), "-c", "import sys; print(sys.prefix == sys.base_prefix)"],
                         capture_output=True, text=True)
    assert out.stdout.strip() == "True", out.stdout + out.stderr
    return root / "bin"
