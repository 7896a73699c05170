"""System packages a test needs (root, the distribution's registry): installed with apt-get, as
tools/local-slurm.sh installs SLURM's."""

from __future__ import annotations

import os
import subprocess


def apt_install(*packages: str) -> None:
    """Installs `packages`; on a fresh machine (no package lists yet) it updates them first and tries again."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", *packages]
    if subprocess.run(install, capture_output=True, env=env, timeout=600).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], check=True, capture_output=True, env=env, timeout=600)
        subprocess.run(install, check=True, capture_output=True, env=env, timeout=600)
