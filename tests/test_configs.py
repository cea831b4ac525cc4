"""configs/*.py:METHOD: every Table 1 method on every paper config, checked against the paper's facts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs
from snapjax import config as config_lib, data, experiment, train_step
from snapjax.errors import ConfigError

import helpers

METHODS = ("snapshot", "snapshot_lr0.1", "single", "nocycle", "single_cycle", "dropout")
# Paper Table 1 (rows x datasets) and the budget table: file -> (B epochs, M cycles, batch), restated.
TABLE1 = {
    **{f"{d}_{m}": (200, 5, 64) for d in ("cifar10", "cifar100") for m in ("resnet110", "wrn32_4")},
    **{f"{d}_{m}": (300, 6, 64) for d in ("cifar10", "cifar100") for m in ("densenet40", "densenet100")},
    **{f"svhn_{m}": (40, 5, 64) for m in ("resnet110", "wrn32_4", "densenet40")},
    "tinyimagenet_resnet110": (150, 6, 128), "tinyimagenet_wrn32_4": (150, 6, 128),
    "tinyimagenet_densenet40": (150, 6, 64),
}
PAPER_CONFIGS = {**TABLE1, "imagenet_resnet50": (90, 2, 256)}
# The fields a method may change; everything else (the budget, model, data) is the Snapshot Ensemble's.
METHOD_FIELDS = ("schedule", "init_lr", "num_cycles", "method", "dropout_rate")


def _expected(method, alpha0, m):
  """The paper's facts (paper.md "Baselines") for each method: schedule, init_lr, num_cycles, method, dropout."""
  return {
      "snapshot": ("cosine_cycles", alpha0, m, "snapshot", 0.0),
      "snapshot_lr0.1": ("cosine_cycles", 0.1, m, "snapshot", 0.0),
      "single": ("step", 0.1, 1, "snapshot", 0.0),  # 0.1 -> 0.01 at 50% -> 0.001 at 75%, one snapshot.
      "nocycle": ("step", 0.1, 6, "snapshot", 0.0),  # The single-model schedule, 6 snapshots equally spaced.
      "single_cycle": ("cosine_cycles", alpha0, m, "single_cycle", 0.0),  # M models, one cosine cycle each.
      "dropout": ("step", 0.1, 1, "snapshot", 0.2),  # The single model with dropout p = 0.2.
  }[method]


def test_every_table1_row_has_a_config():
  found = set(configs.names())
  assert found == set(PAPER_CONFIGS) | {"quickstart", "fashion_mnist", "study_fashion_mnist"}


@pytest.mark.parametrize("name", sorted(PAPER_CONFIGS))
def test_every_method_of_every_paper_config_is_valid_and_the_papers(name):
  module = configs.load(name)
  epochs, m, batch = PAPER_CONFIGS[name]
  default = module.get_config()
  alpha0 = 0.1 if name == "imagenet_resnet50" else 0.2  # ImageNet's batch 256 uses alpha0 = 0.1.
  assert default.to_dict() == module.get_config("snapshot").to_dict()
  spec = data.get_spec(default.dataset)
  for method in METHODS:
    if method == "dropout" and "resnet" in name:  # The paper's Dropout rows: WRN and DenseNet only.
      with pytest.raises(ConfigError, match="dropout.*resnet.*allowed methods for it: snapshot, "):
        module.get_config(method)
      continue
    c = module.get_config(method)
    config_lib.validate(c, 4)
    assert (c.num_epochs, c.batch_size) == (epochs, batch), (name, method)  # Same training budget.
    assert tuple(c[f] for f in METHOD_FIELDS) == _expected(method, alpha0, m), (name, method)
    assert {k: v for k, v in c.to_dict().items() if k not in METHOD_FIELDS} == {
        k: v for k, v in default.to_dict().items() if k not in METHOD_FIELDS}, (name, method)
    assert c.momentum == 0.9 and c.nesterov and c.weight_decay == 1e-4
    plan = train_step.make_plan(c, spec.num_train)  # Same number of updates; one snapshot per model or cycle.
    assert plan.total_steps == spec.num_train // batch * epochs
    assert len(plan.snapshot_steps) == c.num_cycles and plan.snapshot_steps[-1] == plan.total_steps
    if method == "nocycle":
      assert np.ptp(np.diff([0, *plan.snapshot_steps])) <= 1  # Equally spaced.


@pytest.mark.parametrize("name", ["cifar10_wrn32_4", "fashion_mnist"])
def test_unknown_method_names_the_allowed_ones(name):
  with pytest.raises(ConfigError, match="'snapshots' is not a method; allowed: snapshot, snapshot_lr0.1, "
                                        "single, nocycle, single_cycle, dropout, fge, swa, ema, swag, distill"):
    configs.load(name).get_config("snapshots")


def test_fashion_mnist_methods_have_the_quickstart_budget():
  quick = configs.load("quickstart").get_config()
  module = configs.load("fashion_mnist")
  assert module.get_config().to_dict() == quick.to_dict()  # The default arm is the quickstart.
  for method in METHODS:
    c = module.get_config(method)
    config_lib.validate(c, 4)
    assert tuple(c[f] for f in METHOD_FIELDS) == _expected(method, 0.2, 5), method
    assert c.model == ("wrn14_2" if method == "dropout" else "resnet8")
    for field in ("dataset", "train_split", "augment", "num_epochs", "batch_size", "seed", "momentum",
                  "weight_decay"):
      assert c[field] == quick[field], (method, field)
    plan = train_step.make_plan(c, 10_000)
    assert plan.total_steps == 30 * 78 and len(plan.snapshot_steps) == c.num_cycles


@pytest.mark.slow
def test_dropout_arm_is_deterministic_at_evaluation():
  """Dropout is off at evaluation: Experiment.apply_fn (the one eval path) gives the same logits every call, the
  same as the model in eval mode under any dropout rng; in train mode two dropout rngs differ."""
  c = configs.load("fashion_mnist").get_config("dropout")
  c.fashion_mnist_dir = ""  # Nothing is read: build() takes the dataset's spec only.
  exp = experiment.build(c)
  assert exp.model.dropout_rate == 0.2
  variables = jax.jit(exp.init_variables)(jax.random.key(0))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, *exp.input_shape)), jnp.float32)
  apply_fn = jax.jit(exp.apply_fn)
  logits = np.asarray(apply_fn(variables, x))
  np.testing.assert_array_equal(np.asarray(apply_fn(variables, x)), logits)
  evaluate = jax.jit(lambda v, x, key: exp.model.apply(v, x, train=False, rngs={"dropout": key}))
  for seed in (1, 2):
    np.testing.assert_array_equal(np.asarray(evaluate(variables, x, jax.random.key(seed))), logits)
  train = jax.jit(lambda v, x, key: exp.model.apply(v, x, train=True, rngs={"dropout": key},
                                                    mutable=["batch_stats"])[0])
  assert np.abs(np.asarray(train(variables, x, jax.random.key(1)) - train(variables, x, jax.random.key(2)))).max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("name", ["wrn", "densenet"])
def test_dropout_models_ignore_the_dropout_rng_in_eval_mode(name):
  from snapjax import models
  model = {"wrn": models.WideResNet(8, 1, 5, dropout_rate=0.2),
           "densenet": models.DenseNet(10, 4, 5, dropout_rate=0.2)}[name]
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 16, 16, 3)), jnp.float32)
  variables = jax.jit(lambda k: model.init(k, x, train=False))(jax.random.key(0))
  apply = jax.jit(lambda v, key, train: model.apply(v, x, train=train, rngs={"dropout": key},
                                                    mutable=["batch_stats"])[0], static_argnums=2)
  eval1, eval2 = (np.asarray(apply(variables, jax.random.key(s), False)) for s in (1, 2))
  np.testing.assert_array_equal(eval1, eval2)
  train1, train2 = (np.asarray(apply(variables, jax.random.key(s), True)) for s in (1, 2))
  assert np.abs(train1 - train2).max() > 1e-3


@pytest.mark.parametrize("arg, needles", [
    ("configs/cifar10_resnet110.py:dropout", ["--config=configs/cifar10_resnet110.py:dropout:", "method 'dropout'",
                                              "model='resnet110' has none", "single_cycle"]),
    ("configs/cifar10_wrn32_4.py:bogus", ["'bogus' is not a method", "allowed: snapshot, snapshot_lr0.1"]),
    ("configs/quickstart.py:bogus", ["'bogus' is not a method", "fge, swa, ema, swag"]),
    ("{tmp}/plain.py:single", ["plain.py:single", "takes no ':ARGUMENT'"]),
])
def test_train_py_bad_method_is_one_line_and_exit_code_2(arg, needles, tmp_path):
  (tmp_path / "plain.py").write_text("from snapjax import methods\n\n\ndef get_config():\n"
                                     "  return methods.quickstart_config()\n")
  arg = arg.format(tmp=tmp_path)
  workdir = tmp_path / "run"
  proc = helpers.run_python(["train.py", "--config", arg, "--workdir", str(workdir)], env=helpers.subprocess_env(4),
                            timeout=120)
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert lines[-1].startswith("error: ") and all(n in lines[-1] for n in needles), lines[-1]
  assert not workdir.exists()


FIELD_METHODS = ("fge", "swa", "ema", "swag")


@pytest.mark.parametrize("name", sorted(PAPER_CONFIGS) + ["fashion_mnist", "quickstart"])
def test_distill_of_every_config_is_the_single_model_budget_with_a_teacher_to_name(name):
  module = configs.load(name)
  single, c = module.get_config("single"), module.get_config("distill")
  with pytest.raises(ConfigError, match="method='distill' needs its teacher: set teacher_workdirs"):
    config_lib.validate(c, 4)
  c.teacher_workdirs = "runs/teacher"
  config_lib.validate(c, 4)
  assert (c.method, c.schedule, c.init_lr, c.num_cycles, c.distill_alpha, c.distill_tau) == (
      "distill", "step", 0.1, 1, 0.9, 4.0)
  differ = {k for k in c.to_dict() if c[k] != single[k]}
  assert differ == {"method", "teacher_workdirs"}, (name, differ)


@pytest.mark.parametrize("name", sorted(PAPER_CONFIGS) + ["fashion_mnist", "quickstart"])
def test_fge_swa_ema_swag_of_every_config_keep_its_budget(name):
  module = configs.load(name)
  default = module.get_config()
  spec = data.get_spec(default.dataset)
  num_train = 10_000 if default.dataset == "fashion_mnist" else spec.num_train
  for method in FIELD_METHODS:
    c = module.get_config(method)
    config_lib.validate(c, 4)
    assert (c.method, c.init_lr, c.num_cycles) == (method, 0.1, 1)
    assert c.schedule == {"fge": "fge", "swa": "swa", "swag": "swa", "ema": "step"}[method]
    changed = ("schedule", "init_lr", "num_cycles", "method")
    assert {k: v for k, v in c.to_dict().items() if k not in changed} == {
        k: v for k, v in default.to_dict().items() if k not in changed}, (name, method)
    plan = train_step.make_plan(c, num_train)
    assert plan.total_steps == num_train // c.batch_size * int(c.num_epochs)
    if method == "fge":  # 0.8 B of pretraining, then 2-epoch cycles: (0.2 B) / 2 models, one per cycle midpoint.
      assert len(plan.snapshot_steps) == round(0.2 * c.num_epochs) // 2
      spe = plan.steps_per_epoch
      assert plan.snapshot_steps[0] == round(0.8 * c.num_epochs) * spe + spe
    else:
      assert plan.snapshot_steps == (plan.total_steps,)
