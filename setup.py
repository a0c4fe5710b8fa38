"""Package discovery for the one distribution `cxrfast` (everything else is in pyproject.toml).

`shards/`, `pipelines/`, `kernels/` and `bench/` are top-level folders installed as
`cxrfast.shards`, `cxrfast.pipelines`, `cxrfast.kernels` and `cxrfast.bench`; their subpackages and
every subpackage of `cxrfast/` are found automatically, so the wheel never lacks one.
"""

from setuptools import find_packages, setup

MAPPED = {"cxrfast.shards": "shards", "cxrfast.pipelines": "pipelines", "cxrfast.kernels": "kernels",
          "cxrfast.bench": "bench"}

packages = find_packages(include=["cxrfast", "cxrfast.*"])
for name, folder in MAPPED.items():
    packages += [name] + [f"{name}.{sub}" for sub in find_packages(where=folder)]

setup(packages=packages, package_dir={"cxrfast": "cxrfast", **MAPPED})
