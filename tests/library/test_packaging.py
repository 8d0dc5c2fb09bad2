"""The library stands alone: jax, flax and numpy, nothing of the experiments."""
import configparser
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXPERIMENT_ONLY = ["experiments", "benchmarks", "optax", "orbax", "ml_collections", "chex",
                   "tensorflow", "tensorflow_datasets", "tensorboardX", "PIL", "matplotlib"]


def test_the_base_install_requires_jax_flax_and_numpy_only():
  setup = configparser.ConfigParser()
  setup.read(ROOT / "setup.cfg")
  requires = [re.split(r"[<>=\[ ]", line.strip())[0]
              for line in setup["options"]["install_requires"].strip().splitlines()]
  assert requires == ["jax", "flax", "numpy"]
  assert "sdnet" in setup["options.packages.find"]["include"]
  assert "experiments" not in setup["options.packages.find"]["include"]


def test_readme_library_example_runs_with_the_experiment_packages_blocked():
  example = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)[0]
  assert "from sdnet import models" in example
  program = textwrap.dedent(f"""
      import importlib.abc, sys
      BLOCKED = {EXPERIMENT_ONLY!r}
      for name in list(sys.modules):
        if name.split(".")[0] in BLOCKED:
          del sys.modules[name]
      class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
          if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is blocked: the library must not need it")
      sys.meta_path.insert(0, Block())
      import sdnet
      from sdnet import backend, compaction, gates, models, options, residual, survival
      """) + example + textwrap.dedent("""
      loaded = sorted({m.split(".")[0] for m in sys.modules} & set(BLOCKED))
      assert not loaded, loaded
      print("library alone: ok")
      """)
  # A bare environment but for the test session's JAX settings (conftest: its compilation
  # cache) and optimisation level, so that the program compiles as the tests do.
  jax_settings = {k: v for k, v in os.environ.items() if k.startswith(("JAX_", "XLA_"))}
  done = subprocess.run([sys.executable, "-c", program], cwd=ROOT / "tests", capture_output=True,
                        text=True, timeout=300, env={**jax_settings, "JAX_PLATFORMS": "cpu",
                                                     "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
                                                     "PATH": "/usr/bin:/bin",
                                                     "PYTHONPATH": str(ROOT)})
  assert done.returncode == 0, done.stderr[-3000:]
  assert "library alone: ok" in done.stdout


def test_old_model_names_warn_and_point_to_the_family():
  from sdnet import models
  with pytest.warns(DeprecationWarning, match="use CifarResNet152 .*ImageNetResNet152"):
    assert models.ResNet152 is models.CifarResNet152
  with pytest.warns(DeprecationWarning, match="use ImageNetResNet50"):
    assert models.ResNet50 is models.ImageNetResNet50
  with pytest.raises(AttributeError, match="ResNet7"):
    models.ResNet7  # pylint: disable=pointless-statement
