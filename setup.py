"""The wheel's packages: align's own, found, plus the data-only packages that pyproject.toml maps onto the top-level
recipes/ and accelerate_configs/ (its [tool.setuptools.package-dir] comment says why they are listed here)."""

from setuptools import find_packages, setup


setup(packages=[*find_packages(include=["align", "align.*"]), "align.recipes", "align.accelerate_configs"])
