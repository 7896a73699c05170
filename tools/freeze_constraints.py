"""Write constraints.txt: the exact versions of this environment, after a green run of README command 2.

    python tools/freeze_constraints.py          # from the venv the tests passed in

pyproject.toml keeps ranges (users get fixes); constraints.txt lets anyone reproduce a run exactly:
`pip install -e '.[dev,deepspeed,eval]' -c constraints.txt`. torch is written without its local build label (`+cpu`,
`+cu128`): the same release, whichever build the machine needs. llmft itself (editable) is left out.
"""

from __future__ import annotations

import datetime
import platform
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    frozen = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"], capture_output=True,
                            text=True, check=True).stdout.splitlines()
    pins = sorted((re.sub(r"\+[\w.]+$", "", line) for line in frozen if "==" in line and not line.startswith("-e")),
                  key=str.lower)
    header = [f"# The versions of the last green run of README command 2 (python -m pytest, CPU, Python "
              f"{platform.python_version()}, {datetime.date.today()}).",
              "# pyproject.toml keeps ranges; to reproduce a run exactly: pip install torch==2.13.0 && "
              "pip install -e '.[dev,deepspeed,eval]' -c constraints.txt",
              "# (on a GPU machine, install your CUDA build of torch first). Regenerate after a green run: "
              "python tools/freeze_constraints.py"]
    (REPO / "constraints.txt").write_text("\n".join(header + pins) + "\n")
    print(f"constraints.txt: {len(pins)} pinned packages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
