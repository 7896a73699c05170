"""The package list, with the config groups of the top-level conf/ installed as llmft/conf/ (package data that a wheel
carries), which pyproject.toml alone cannot say: its packages.find does not take a package-dir mapping."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["llmft*"]), "llmft.conf"], package_dir={"llmft.conf": "conf"})
