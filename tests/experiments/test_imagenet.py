"""ImageNet: fb.resnet.torch's transforms against their definitions, the streaming
sources on generated trees (CMYK, greyscale and PNG-named-.JPEG files among them) and on
TFDS's mock data."""
import io
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from benchmarks import imagenet_like
from experiments import data
from experiments.configs import imagenet as imagenet_configs
from experiments.data import imagenet
from experiments.data import imagenet_preprocessing as fb
from experiments.data import images as images_lib
from experiments.data import on_device
from experiments.runtime import errors
from experiments.training import loop


def encoded(pixels: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
  buffer = io.BytesIO()
  picture = Image.fromarray(pixels)
  (picture.convert(mode) if mode else picture).save(buffer, format=fmt, quality=95)
  return buffer.getvalue()


# ------------------------------------------------------------------- the transforms


def test_random_sized_crop_has_the_area_and_aspect_of_its_definition():
  rng = np.random.default_rng(0)
  areas, aspects = [], []
  for _ in range(2000):
    left, top, w, h = fb.random_sized_crop(rng, 500, 375)
    assert 0 <= left <= 500 - w and 0 <= top <= 375 - h
    areas.append(w * h / (500 * 375))
    aspects.append(w / h)
  # 8-100% of the area, aspect 3/4-4/3 (either way round), up to the rounding to pixels
  assert 0.08 - 0.01 <= min(areas) and max(areas) <= 1.0
  assert 0.75 - 0.01 <= min(aspects) and max(aspects) <= 4 / 3 + 0.01
  assert max(areas) > 0.9 and min(areas) < 0.1  # the whole range is drawn
  # No crop of 8% of the area at aspect <= 4/3 fits a 1000 x 20 image: centre crop.
  assert fb.random_sized_crop(np.random.default_rng(0), 1000, 20) is None


def test_augment_parameters_are_drawn_from_their_distributions():
  draws = np.stack([fb.augment_parameters(np.random.default_rng(i)) for i in range(4000)])
  flips, factors, alphas = draws[:, 0], draws[:, 1:4], draws[:, 4:7]
  assert set(np.unique(flips)) == {0.0, 1.0} and abs(flips.mean() - 0.5) < 0.03
  assert factors.min() >= 0.6 and factors.max() <= 1.4
  np.testing.assert_allclose(factors.std(0), 0.8 / np.sqrt(12), rtol=0.05)  # U(0.6, 1.4)
  np.testing.assert_allclose(alphas.std(0), 0.1, rtol=0.05)


def test_lighting_noise_has_the_pca_covariance():
  """x + V (alpha * lambda), alpha ~ N(0, 0.1^2 I): the noise added to every pixel has
  covariance 0.01 V diag(lambda^2) V^T."""
  alphas = np.stack([fb.augment_parameters(np.random.default_rng(i))[4:7]
                     for i in range(20000)])
  noise = np.asarray(on_device.lighting(jnp.zeros((len(alphas), 1, 1, 3)), alphas))[:, 0, 0]
  expected = 0.01 * fb.EIGENVECTORS @ np.diag(fb.EIGENVALUES ** 2) @ fb.EIGENVECTORS.T
  np.testing.assert_allclose(np.cov(noise.T), expected, atol=3e-5)
  np.testing.assert_allclose(noise.mean(0), 0, atol=3e-4)


def test_color_jitter_is_fb_resnet_torchs_blends_in_any_of_their_orders():
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 4, 4, 3)), jnp.float32)
  gray = lambda im: im @ jnp.asarray([0.299, 0.587, 0.114])
  brightness = lambda im, a: a * im
  contrast = lambda im, a: a * im + (1 - a) * jnp.mean(gray(im), axis=(1, 2),
                                                      keepdims=True)[..., None]
  saturation = lambda im, a: a * im + (1 - a) * gray(im)[..., None]
  a = jnp.asarray([[1.3, 0.7, 1.2], [0.8, 1.1, 0.65]])
  got = on_device.color_jitter(x, a)
  for order in itertools.permutations(range(3)):  # RandomOrder: any of the 6
    expected = x
    for which in order:
      expected = (brightness, contrast, saturation)[which](
          expected, a[:, which, None, None, None])
    np.testing.assert_allclose(got, expected, rtol=1e-5, err_msg=str(order))
  assert not np.allclose(got, x)


def test_evaluation_of_a_known_image_gives_the_expected_pixels():
  """600 x 300, thirds red / green / blue: shorter side to 256 makes it 512 x 256; the
  centre 224 x 224 spans x = 144..368 of it, so columns up to 26 are red, 27..197 green
  and the rest blue (bicubic smooths a few pixels at each border)."""
  pixels = np.zeros((300, 600, 3), np.uint8)
  pixels[:, :200, 0] = pixels[:, 200:400, 1] = pixels[:, 400:, 2] = 255
  out = fb.eval_example(encoded(pixels), 224, 256)
  assert out.shape == (224, 224, 3)
  for columns, channel in ((slice(0, 22), 0), (slice(32, 192), 1), (slice(203, 224), 2)):
    region = out[:, columns]
    assert region[..., channel].min() >= 250, (columns, channel)
    assert np.delete(region, channel, -1).max() <= 5, (columns, channel)


def test_a_training_crop_is_the_resized_crop_flipped_as_drawn():
  pixels = np.zeros((375, 500, 3), np.uint8)
  pixels[:, :250] = (255, 0, 0)  # left half red, right half blue
  pixels[:, 250:] = (0, 0, 255)
  seen = set()
  for seed in range(40):
    rng = np.random.default_rng(seed)
    crop = fb.random_sized_crop(np.random.default_rng(seed), 500, 375)
    out, augment = fb.train_example(encoded(pixels, "JPEG"), rng, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    left, _, w, _ = crop
    red_share = np.clip((250 - left) / w, 0, 1)  # of the crop, before the flip
    red_columns = (out[32, :, 0] > 128).mean()
    assert abs(red_columns - red_share) < 0.1, (seed, red_columns, red_share)
    if 0.2 < red_share < 0.8:
      assert (out[32, 0, 0] > 128) == (not augment[0])  # red is on the left unless flipped
      seen.add(bool(augment[0]))
  assert seen == {True, False}


def test_files_decode_to_rgb_by_content_whatever_their_name(tmp_path):
  rgb = np.random.default_rng(0).integers(0, 256, (40, 50, 3)).astype(np.uint8)
  png_named_jpeg = tmp_path / "n1_2933.JPEG"
  png_named_jpeg.write_bytes(encoded(rgb, "PNG"))
  np.testing.assert_array_equal(images_lib.read_rgb(png_named_jpeg), rgb)
  smooth = np.repeat(np.repeat(rgb[::10, ::10], 10, 0), 10, 1)  # JPEG-friendly
  cmyk = images_lib.to_rgb(Image.open(io.BytesIO(encoded(smooth, "JPEG", "CMYK"))))
  assert cmyk.shape == smooth.shape and np.abs(cmyk.astype(int) - smooth).mean() < 8
  grey = images_lib.to_rgb(Image.open(io.BytesIO(encoded(smooth, "JPEG", "L"))))
  assert grey.shape == smooth.shape and (grey[..., 0] == grey[..., 2]).all()
  sixteen = np.full((4, 4), 1000, np.uint16)  # 16-bit: scaled, not clipped to 255
  assert images_lib.to_rgb(Image.fromarray(sixteen)).max() == round(1000 * 255 / 65535)
  with pytest.raises(images_lib.UnreadableImage, match="not an image"):
    images_lib.read_rgb(_write(tmp_path / "bad.JPEG", b"\xff\xd8 not a JPEG"))
  truncated = encoded(smooth, "JPEG")
  with pytest.raises(images_lib.UnreadableImage, match="cannot decode"):
    images_lib.read_rgb(_write(tmp_path / "short.JPEG", truncated[:len(truncated) // 2]))


def _write(path, content: bytes):
  path.write_bytes(content)
  return path


# ---------------------------------------------------------------------- the sources


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
  """4 classes x 6 training and 2 validation images, the first of each class RGB, CMYK,
  greyscale or a PNG named .JPEG, and one truncated file."""
  root = imagenet_like.write_tree(tmp_path_factory.mktemp("imagenet"), classes=4,
                                  train_per_class=6, val_per_class=2, width=80, height=60,
                                  special_every=4)
  victim = root / "train" / "n00000002" / "n00000002_3.JPEG"
  victim.write_bytes(victim.read_bytes()[:200])
  return root


def quick_config(root, **overrides):
  config = imagenet_configs.get_config("quick")
  config.data_dir, config.input_workers = str(root), 0
  config.batch_size, config.eval_batch_size, config.epochs = 8, 8, 1
  config.image_size, config.eval_resize, config.log_every_steps = 32, 36, 1
  for name, value in overrides.items():
    config[name] = value
  return config


def test_the_folder_source_streams_deterministic_batches_of_crops(tree, caplog):
  source = data.build(quick_config(tree))
  assert source.describe().startswith("imagenet_folder:")
  assert (source.num_train, source.num_classes) == (24, 4)
  assert source.evaluation_splits == {"validation": 8}
  one = list(source.train_batches(0, 8, 0, [1, 2], data.Shard(0, 1, 4)))
  again = list(source.train_batches(0, 8, 1, [2], data.Shard(0, 1, 4)))  # from step 1
  assert one[0]["images"].shape == (4, 1, 2, 32, 32, 3) and one[1]["augment"].shape == (
      4, 2, 2, fb.AUGMENT_SIZE)
  for name in ("images", "labels", "augment"):
    np.testing.assert_array_equal(again[0][name], one[1][name])  # a function of the step
  # Two processes of two devices feed what one of four does.
  halves = [next(source.train_batches(0, 8, 0, [1], data.Shard(p, 2, 2))) for p in (0, 1)]
  np.testing.assert_array_equal(np.concatenate([h["images"] for h in halves]),
                                one[0]["images"])
  labels = np.concatenate([b["labels"].reshape(-1) for b in one])
  assert set(labels) <= set(range(4))
  # Every image of an epoch once: 24 examples in 3 batches of 8.
  epoch = np.concatenate([b["labels"].reshape(-1) for b in source.train_batches(
      0, 8, 0, [3], data.Shard(0, 1, 4))])
  assert sorted(epoch) == sorted(np.repeat(np.arange(4), 6))
  evaluation = list(source.eval_batches("validation", 8, data.Shard(0, 1, 4)))
  assert len(evaluation) == 1 and evaluation[0]["mask"].sum() == 8


def test_an_unreadable_file_is_replaced_named_and_counted(tree, caplog):
  source = data.build(quick_config(tree))
  list(source.train_batches(0, 8, 0, [3], data.Shard(0, 1, 4)))  # the whole epoch
  [line] = [r.getMessage() for r in caplog.records if "cannot decode" in r.getMessage()]
  assert "n00000002_3.JPEG: a grey image takes its place (1 such file(s) so far)" in line


def test_folder_layouts_that_cannot_work_are_refused_in_one_line(tmp_path):
  with pytest.raises(errors.MissingFileError, match="has no train/ directory"):
    data.build(quick_config(tmp_path))
  root = imagenet_like.write_tree(tmp_path / "t", classes=3, train_per_class=2,
                                  val_per_class=1, width=40, height=30)
  (root / "val" / "n00000001").rename(root / "val" / "n99999999")
  with pytest.raises(errors.UserError, match=r"unknown \['n99999999'\]; missing "
                                             r"\['n00000001'\]"):
    data.build(quick_config(root))
  (root / "val" / "n99999999").rename(root / "val" / "n00000001")
  (root / "train" / "n00000000" / "n00000000_1.JPEG").write_bytes(b"")
  with pytest.raises(errors.UserError, match="n00000000_1.JPEG is empty"):
    data.build(quick_config(root))


def test_the_quick_config_trains_and_reports_top5_in_process(tree, tmp_path):
  run = loop.train_and_evaluate(quick_config(tree), str(tmp_path / "run"))
  results = run.results
  assert results.finished and results.steps == 3 and results.final_test_error is None
  assert 0 <= results.best_validation_top5_error <= results.best_validation_error <= 1
  assert results.best_validation_top5_error == 0  # 4 classes: always in the top 5
  records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text(
  ).splitlines()]
  assert any("validation/top5_error" in r for r in records)
  assert all(0 <= r["train/input_wait_fraction"] <= 1 for r in records if "train/loss" in r)


def test_tfds_imagenet2012_on_mock_data_and_a_missing_download_named(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=24):
    source = data.build(quick_config("", dataset="imagenet2012"))
    assert source.num_classes == 1000 and source.num_train == 24
    batch = next(source.train_batches(0, 8, 0, [1], data.Shard(0, 1, 4)))
  assert batch["images"].shape == (4, 1, 2, 32, 32, 3)
  with pytest.raises(errors.MissingFileError,
                     match=r"put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar "
                           r"\(from image-net.org\) into .*downloads/manual"):
    data.build(quick_config(str(tmp_path), dataset="imagenet2012"))
  assert jax.device_count() == 4
