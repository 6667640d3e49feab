"""The light core stays light: importing knnssd (and using it) pulls in no Ray, Optuna or MLflow, and the
registry does not import the decoding loop."""

from __future__ import annotations

import subprocess
import sys


def imported_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_core_imports_no_ray_optuna_mlflow():
    modules = imported_after("import knnssd, knnssd.cli, knnssd.runtime, knnssd.generation")
    assert not modules & {"ray", "optuna", "mlflow"}


def test_registry_bundle_does_not_import_the_decoding_loop():
    modules = imported_after("import registry.bundle, sys; assert 'knnssd.decoding' not in sys.modules")
    assert "ray" not in modules and "optuna" not in modules
