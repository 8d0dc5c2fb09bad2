"""Test set-up: four host CPU devices, so that pmap tests use a real multi-device pmap.

XLA_FLAGS must be set before jax is first imported. The JAX settings go through the
environment, so the tests' subprocesses (real runs of the CLIs) inherit them, but for
XLA's optimisations: in this process they cost more compile time than the tests' tiny
programs gain from them, while the subprocesses train hundreds of steps, and with the
shared compilation cache compile each program once.
"""
import atexit
import os
import shutil
import tempfile

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A persistent compilation cache per test process, which its subprocesses inherit: the
# many runs of the same tiny config, in-process and as programs, compile each program
# once. Not one for all xdist workers: JAX writes an entry in place (no temporary file
# and rename) and reads it without a lock. (The worker abort once blamed on a shared
# cache, in test_compatibility's evaluation, was the eval step's hang that
# `experiments.training.steps.sum_over_devices` describes.)
_MADE_HERE = "SDNET_TEST_JAX_CACHE_MADE"  # set where the cache directory is the tests' own
if ("JAX_COMPILATION_CACHE_DIR" not in os.environ or
    os.environ.get(_MADE_HERE) and "PYTEST_XDIST_WORKER" in os.environ):
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="sdnet-test-jax-cache-")
  os.environ[_MADE_HERE] = "1"
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_disable_most_optimizations", True)
