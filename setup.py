# Metadata lives in pyproject.toml; this file only lets older pip versions do editable installs.
from setuptools import setup

setup()
