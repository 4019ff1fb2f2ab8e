"""Package layout only (everything else is in pyproject.toml): the code in src/, and the repository's top-level
conf/ folder shipped as the package ``hawkspec.conf`` (Hydra loads it with ``pkg://hawkspec.conf``), so the console
scripts find their configs wherever hawkspec is installed. A list in pyproject.toml could not combine the
discovered packages with this mapped one."""

from setuptools import find_packages, setup

setup(
    package_dir={"": "src", "hawkspec.conf": "conf"},
    packages=find_packages("src") + ["hawkspec.conf"],
)
