"""The serving artifact (issue 13): eval.py --export, export_ensemble, load_exported, against independent references."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import snapjax
from snapjax import data, evaluation, experiment, training
from snapjax.errors import ExportError, UserError

import helpers
from helpers import MEAN, STD, tiny_config

pytestmark = pytest.mark.devices(4)

COMPILE_MARKERS = ("Compiling ", "Finished XLA compilation")  # What JAX_LOG_COMPILES=1 logs (see test_cli.py).
TIMEOUT = 180


def _eval_py(*args: str) -> subprocess.CompletedProcess:
  return helpers.run_python(["eval.py", *args], env=helpers.subprocess_env(4, JAX_LOG_COMPILES="1"), timeout=TIMEOUT)


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
  """One tiny run with M=3 snapshots (16 updates, 3 cycles)."""
  workdir = str(tmp_path_factory.mktemp("export") / "run")
  training.train_and_evaluate(tiny_config(tiny_data, num_epochs=1.0, num_cycles=3), workdir)
  return workdir


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
  """eval.py --export on the run (all snapshots): (FILE, its description, eval.py's report)."""
  path = str(tmp_path_factory.mktemp("served") / "ensemble.jax")
  proc = _eval_py("--workdir", trained, "--export", path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(trained, "eval", "report.json")) as f:
    report = json.load(f)
  with open(path + ".json") as f:
    meta = json.load(f)
  return path, meta, report


@pytest.fixture(scope="module")
def reference(trained, tiny_data):
  """The run's snapshots stacked, its apply_fn, and the raw test split (read here, not through the run)."""
  exp = experiment.build(evaluation.load_run_config(trained))
  members = evaluation.restore_members([trained], exp)
  stacked = snapjax.stack_snapshots([jax.tree.map(np.asarray, m.variables) for m in members])
  images, labels = data.load_fashion_mnist(tiny_data, "test")
  return exp.apply_fn, stacked, images, labels


def _normalised(images: np.ndarray) -> np.ndarray:
  """The reference normalisation, restated from the Fashion-MNIST statistics in helpers."""
  return (images.astype(np.float32) - np.float32(MEAN)) / np.float32(STD)


_PLAIN_JAX = textwrap.dedent("""
    import sys
    import jax, numpy as np
    exported = jax.export.deserialize(open(sys.argv[1], "rb").read())
    images = np.load(sys.argv[2])
    for batch in (1, 7, len(images)):
      probs = np.concatenate([np.asarray(exported.call(images[i:i + batch]))
                              for i in range(0, len(images), batch)])
      np.save(f"{sys.argv[3]}/probs_{batch}.npy", probs)
    print("platforms", ",".join(exported.platforms))
    print("loaded", ",".join(sorted(m for m in ("snapjax", "flax", "optax", "orbax") if m in sys.modules)) or "-")
""")


@pytest.mark.slow
def test_plain_jax_reproduces_eval_py(exported, reference, tmp_path):
  path, meta, report = exported
  apply_fn, stacked, images, labels = reference
  np.save(tmp_path / "images.npy", images)
  script = tmp_path / "serve.py"
  script.write_text(_PLAIN_JAX)
  proc = subprocess.run([sys.executable, str(script), path, str(tmp_path / "images.npy"), str(tmp_path)],
                        cwd=str(tmp_path), env=helpers.subprocess_env(1), capture_output=True, text=True,
                        timeout=TIMEOUT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "loaded -" in proc.stdout, proc.stdout  # Neither snapjax nor Flax (nor optax, orbax) was imported.
  assert "platforms cpu,cuda,tpu" in proc.stdout, proc.stdout
  want = np.asarray(snapjax.ensemble_predict(apply_fn, stacked, jnp.asarray(_normalised(images))))
  errors = int(np.sum(np.argmax(want, -1) != labels))
  assert errors / len(labels) == report["ensemble"]["error"]  # The reference is eval.py's ensemble.
  for batch in (1, 7, len(images)):
    probs = np.load(tmp_path / f"probs_{batch}.npy")
    assert probs.shape == (len(images), 10) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, want, rtol=0, atol=1e-6, err_msg=f"batch size {batch}")
    assert int(np.sum(np.argmax(probs, -1) != labels)) == errors, f"batch size {batch}"


def test_serving_example_reproduces_eval_py(exported, tiny_data):
  """examples/serve_exported.py (README's serving recipe): jax and numpy only, raw IDX files in."""
  path, _, report = exported
  proc = subprocess.run([sys.executable, "examples/serve_exported.py", path, "--idx_dir", tiny_data, "--batch", "7"],
                        cwd=helpers.ROOT, env=helpers.subprocess_env(1), capture_output=True, text=True,
                        timeout=TIMEOUT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  ens = report["ensemble"]
  assert (f"test error {100 * ens['error']:.2f}% NLL {ens['nll']:.4f} on {ens['count']} examples; "
          f"snapjax/flax loaded: none") in proc.stdout, proc.stdout


def test_cli_export_description(exported, trained):
  path, meta, report = exported
  assert os.path.getsize(path) == meta["bytes"]
  assert meta["input"] == {"shape": ["b", 28, 28, 1], "dtype": "uint8"}
  assert meta["num_classes"] == 10 and meta["last_m"] == 3 == report["ensemble"]["m"]
  assert meta["members"] == [{"workdir": s["workdir"], "step": s["step"]} for s in report["snapshots"]]
  assert [m["step"] for m in meta["members"]] == sorted(int(s) for s in os.listdir(os.path.join(trained, "snapshots")))
  assert meta["platforms"] == ["cpu", "cuda", "tpu"]
  assert meta["snapjax_version"] == snapjax.__version__ and meta["jax_version"] == jax.__version__
  assert meta["test"]["count"] == report["num_test_examples"] == helpers.NUM_TEST
  assert meta["test"]["error"] == report["ensemble"]["error"]  # Exact counts: the same misclassified examples.
  assert meta["test"]["nll"] == pytest.approx(report["ensemble"]["nll"], abs=1e-5)


def test_cli_export_last_m(trained, reference, tmp_path):
  """--last_m picks the members; the artifact's output is ensemble_predict(..., last_m=2)."""
  apply_fn, stacked, images, _ = reference
  path = str(tmp_path / "last2.jax")
  proc = _eval_py("--workdir", trained, "--last_m=2", "--export", path, "--out_dir", str(tmp_path / "eval"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  meta = json.load(open(path + ".json"))
  report = json.load(open(tmp_path / "eval" / "report.json"))
  assert meta["last_m"] == 2 and [m["step"] for m in meta["members"]] == [s["step"] for s in report["snapshots"][1:]]
  assert meta["test"]["error"] == report["ensemble"]["error"] == report["ensembles"][1]["error"]
  model = snapjax.load_exported(path)
  x = images[:20]
  want = snapjax.ensemble_predict(apply_fn, stacked, jnp.asarray(_normalised(x)), last_m=2)
  np.testing.assert_allclose(np.asarray(model(x)), np.asarray(want), rtol=0, atol=1e-6)


def test_library_last_m_and_members(reference):
  """export_ensemble(last_m=m < M, return_members) equals ensemble_predict on the same inputs."""
  apply_fn, stacked, images, _ = reference
  x = images[:13]
  blob = snapjax.export_ensemble(apply_fn, stacked, x[:1], last_m=2, return_members=True, platforms=("cpu",),
                                 preprocess=lambda im: data.normalize(im, data.get_spec("fashion_mnist")))
  model = snapjax.load_exported(blob)
  assert model.platforms == ("cpu",)
  mean, members = model(x)
  want_mean, want_members = snapjax.ensemble_predict(apply_fn, stacked, jnp.asarray(_normalised(x)), last_m=2,
                                                     return_members=True)
  assert mean.shape == (13, 10) and members.shape == (2, 13, 10)
  np.testing.assert_allclose(np.asarray(mean), np.asarray(want_mean), rtol=0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(members), np.asarray(want_members), rtol=0, atol=1e-6)
  # The members are the last two snapshots: the newest alone is ensemble_predict's last_m=1.
  newest = snapjax.ensemble_predict(apply_fn, stacked, jnp.asarray(_normalised(x)), last_m=1)
  np.testing.assert_allclose(np.asarray(members[-1]), np.asarray(newest), rtol=0, atol=1e-6)
  with pytest.raises(ValueError, match=r"last_m must be None or an int in \[1, 3\]"):
    snapjax.export_ensemble(apply_fn, stacked, x[:1], last_m=4)


def test_multi_platform_artifact_runs_on_cpu(exported, reference):
  path, _, _ = exported
  _, _, images, _ = reference
  model = snapjax.load_exported(path)
  assert model.platforms == ("cpu", "cuda", "tpu") and jax.default_backend() == "cpu"
  probs = np.asarray(model(images[:3]))
  assert probs.shape == (3, 10) and np.allclose(probs.sum(-1), 1.0, atol=1e-5)


def test_wrong_input_names_expected_shape_and_dtype(exported, reference):
  path, _, _ = exported
  _, _, images, _ = reference
  model = snapjax.load_exported(path)
  for bad, got in ((images[:2, :27], "(2, 27, 28, 1)"), (images[:2, ..., 0], "(2, 28, 28)"),
                   (images[:2].astype(np.float32), "float32")):
    with pytest.raises(ValueError) as info:
      model(bad)
    message = str(info.value)
    assert "\n" not in message and "(b, 28, 28, 1)" in message and "dtype uint8" in message and got in message


def _one_line_export_error(source, *needles):
  with pytest.raises(ExportError) as info:
    snapjax.load_exported(source)
  message = str(info.value)
  assert isinstance(info.value, UserError) and "\n" not in message and len(message) < 400, message
  for needle in needles:
    assert needle in message, (needle, message)


def test_damaged_files_are_one_line_errors(exported, tmp_path):
  path, meta, _ = exported
  blob = open(path, "rb").read()
  cut = str(tmp_path / "cut.jax")  # No description beside it: the artifact itself must tell.
  open(cut, "wb").write(blob[:len(blob) // 2])
  _one_line_export_error(cut, cut, "truncated or not a jax.export artifact")
  garbage = str(tmp_path / "garbage.jax")
  open(garbage, "wb").write(np.random.default_rng(0).bytes(4096))
  _one_line_export_error(garbage, garbage, "truncated or not a jax.export artifact")
  empty = str(tmp_path / "empty.jax")
  open(empty, "wb").close()
  _one_line_export_error(empty, empty, "empty")
  _one_line_export_error(str(tmp_path / "missing.jax"), str(tmp_path / "missing.jax"), "cannot read")
  described = str(tmp_path / "described.jax")  # With FILE.json beside it, the recorded size tells first.
  open(described, "wb").write(blob[:-10])
  shutil.copy(path + ".json", described + ".json")
  _one_line_export_error(described, described, "truncated", f"{len(blob) - 10} bytes", f"records {meta['bytes']}")


def test_export_into_missing_directory(trained, tmp_path):
  before = sorted(os.listdir(trained))
  target = str(tmp_path / "nowhere" / "ensemble.jax")
  proc = _eval_py("--workdir", trained, "--export", target)
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr and lines[-1].startswith("error: "), proc.stderr[-3000:]
  assert "--export" in lines[-1] and str(tmp_path / "nowhere") in lines[-1] and "does not exist" in lines[-1]
  assert not [l for l in lines if any(m in l for m in COMPILE_MARKERS)]
  assert not os.path.exists(tmp_path / "nowhere") and sorted(os.listdir(trained)) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only directory")
def test_export_into_read_only_directory(tmp_path):
  locked = tmp_path / "locked"
  locked.mkdir(mode=0o555)
  with pytest.raises(UserError, match="--export=.*is not writable"):
    evaluation.check_export_path(str(locked / "ensemble.jax"))
