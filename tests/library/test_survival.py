import numpy as np
import pytest

from sdnet import survival


def test_linear_decay_matches_paper_for_resnet110():
  p = survival.linear_decay(54, 0.5)
  assert p.shape == (54,)
  np.testing.assert_allclose(p[0], 1 - 0.5 / 54)  # 0.99074...
  np.testing.assert_allclose(p[0], 0.990740740, atol=1e-8)
  assert p[-1] == 0.5
  np.testing.assert_allclose(p.sum(), 40.25)  # (3L - 1) / 4
  assert np.all(np.diff(p) < 0)


@pytest.mark.parametrize("num_blocks,p_last", [(3, 0.5), (54, 0.2), (600, 0.8), (75, 1.0)])
def test_linear_decay_formula_and_expected_depth(num_blocks, p_last):
  p = survival.linear_decay(num_blocks, p_last)
  l = np.arange(1, num_blocks + 1)
  np.testing.assert_allclose(p, 1 - l / num_blocks * (1 - p_last))
  # E[depth] = sum_l p_l = L - (1 - p_L)(L + 1) / 2
  np.testing.assert_allclose(survival.expected_depth(p),
                             num_blocks - (1 - p_last) * (num_blocks + 1) / 2)


def test_constant_depth_and_uniform():
  assert survival.is_constant_depth(survival.linear_decay(10, 1.0))
  assert not survival.is_constant_depth(survival.linear_decay(10, 0.99))
  np.testing.assert_array_equal(survival.uniform(4, 0.3), [0.3] * 4)
  assert survival.expected_depth(survival.uniform(10, 0.5)) == 5.0


def test_schedule_dispatch_and_explicit_array():
  np.testing.assert_array_equal(survival.schedule(5, 0.5, "uniform"), [0.5] * 5)
  np.testing.assert_array_equal(survival.schedule(2, probs=[0.9, 0.1]), [0.9, 0.1])


@pytest.mark.parametrize("call,message", [
    (lambda: survival.linear_decay(54, 0.0), r"p_last must lie in \(0, 1\]"),
    (lambda: survival.linear_decay(54, 1.5), r"p_last must lie in \(0, 1\]"),
    (lambda: survival.uniform(54, -0.1), r"p must lie in \(0, 1\]"),
    (lambda: survival.linear_decay(0, 0.5), "positive integer"),
    (lambda: survival.schedule(3, probs=[1.0, 0.5]), "got 2 survival probabilities"),
    (lambda: survival.schedule(2, probs=[1.0, 0.0]), r"block\(s\) \[2\]"),
    (lambda: survival.schedule(3, rule="cosine"), "unknown survival rule"),
])
def test_bad_input_names_the_problem(call, message):
  with pytest.raises(ValueError, match=message):
    call()
