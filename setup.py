"""Package discovery for the ssm-hub wheel (metadata lives in pyproject.toml).

The top-level folders kernels/, conversion/, recipes/ and model_cards/ ship as subpackages of ssm_hub
(see package-dir in pyproject.toml), which static discovery cannot express: this lists them.
"""

from setuptools import find_packages, setup

SHIPPED_AS_SUBPACKAGES = {"kernels": "ssm_hub.kernels", "conversion": "ssm_hub.conversion",
                          "recipes": "ssm_hub.recipes", "model_cards": "ssm_hub.model_cards"}

packages = ["ssm_hub"] + [f"ssm_hub.{name}" for name in find_packages("ssm_hub")]
for folder, package in SHIPPED_AS_SUBPACKAGES.items():
    packages += [package] + [f"{package}.{name}" for name in find_packages(folder)]

setup(packages=packages)
