"""Host memory a CPU step frees is kept for the next step (`backend.keep_freed_host_memory`)."""
import resource
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from sdnet import models


def faults_per_step() -> int:
  """Minor page faults of one gradient of a plain ResNet-8 at batch 64, whose
  temporaries (activations and saved residuals, ~60 MB) are freed when it ends."""
  model = models.CifarResNet8(p_last=1.0)
  x = jnp.ones((64, 32, 32, 3))
  variables = model.init(jax.random.key(0), x)

  @jax.jit
  def step(params):
    def loss(params):
      logits, _ = model.apply({**variables, "params": params}, x, train=True,
                              mutable=["batch_stats"])
      return logits.sum()
    return jax.grad(loss)(params)

  for _ in range(3):
    jax.block_until_ready(step(variables["params"]))
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(5):
    jax.block_until_ready(step(variables["params"]))
  return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 5


KEPT = """
from sdnet import backend
kept = backend.keep_freed_host_memory()  # before JAX initialises its backend
from tests.library.test_host_memory import faults_per_step
print(kept, faults_per_step())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_step_no_longer_page_faults_its_temporaries_in_again():
  out = subprocess.run([sys.executable, "-c", KEPT], capture_output=True, text=True,
                       check=True, env={"JAX_PLATFORMS": "cpu", "PATH": "",
                                        "PYTHONPATH": ":".join(sys.path)})
  kept, faults_kept = out.stdout.split()
  assert kept == "True"
  faults_default = faults_per_step()  # this process keeps glibc's defaults
  # The default allocator gives large freed chunks back and faults them in every step
  # (measured 10-15 thousand pages here; kept 0 on jax 0.12.1, 2600-5500 on jax 0.10.2,
  # where not every freed chunk stays: why is not known).
  assert faults_default > 4096 and int(faults_kept) * 2 < faults_default, (
      faults_default, faults_kept)
