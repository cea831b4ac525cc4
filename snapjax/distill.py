"""Distilling a finished ensemble into one network (Hinton et al. 2015): method="distill".

The teacher is the ensemble of the runs in config.teacher_workdirs: the mean softmax of the last teacher_last_m
snapshots of each run (of each member of a K-member run; 0 = all), tempered by tau = distill_tau,

  p_T(x) = softmax(log mean_i softmax(f_i(x)) / tau),

and the student (config.model, by default the teacher's architecture or a smaller one) minimises

  (1 - alpha) CE(labels, softmax(z)) + alpha tau^2 KL(p_T || softmax(z / tau)),   alpha = distill_alpha,

the tau^2 keeping the soft term's gradient on the scale of the hard one's (Hinton et al., Section 2).

With augmented training batches the teacher runs inside the compiled train step on each augmented batch, so its
soft labels are those of the images the student sees: the fused evaluator (`ensemble.ensemble_predict`) in eval
mode, frozen (no gradient). Its stacked snapshot variables are then an input of the compiled update, neither part
of the train state (they are not checkpointed with it) nor constants of the program (a closed-over array would be
copied into the program's text). Without augmentation (augment "none") an image's soft labels are the same at
every epoch, so with distill_soft_labels="auto" they are computed once, on the devices, for every training image
before training (`precompute_soft_labels`, on every start and resume: one teacher pass over the split instead of
one per batch) and drawn with the labels, index for index; distill_soft_labels="step" keeps the teacher in the step.
Either way its cost is part of the run's wall time. With distill_alpha = 0 the teacher is loaded and checked but
never run: the step is the plain one.

`load_teacher` makes every check of the teacher runs before anything is compiled or written: each workdir is a
snapjax run with snapshots that no live run is still training (restored with their CRC32 checksums checked), of the student's dataset,
class count and input shape, and the runs can be ensembled together. The teacher's snapshots and checksums are
recorded in the student's workdir (TEACHER_FILE) when it starts; a resumed run whose teacher changed is refused.
"""
import dataclasses
import json
import zlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from snapjax import checkpoints, data, ensemble, experiment, runs, workdir as workdir_lib, workdir_lock
from snapjax.errors import CheckpointError, ConfigError

PyTree = Any
TEACHER_FILE = "teacher.json"  # In the student's workdir: the teacher's snapshots and their checksums.
# How the teacher's snapshots run inside the step: unrolled, so that every convolution is at the top level of the
# step, where XLA:CPU's fast kernels and the loop body's rewrite (snapjax/dispatch.py) reach it (a lax.map body
# keeps its own, slower, convolutions there). A teacher is a handful of snapshots, so compile time stays small.
TEACHER_STRATEGY = "loop"


def workdir_list(value: str) -> list[str]:
  """The comma-separated teacher_workdirs as a list, blanks dropped."""
  return [w for w in (p.strip() for p in str(value).split(",")) if w]


@dataclasses.dataclass(frozen=True, eq=False)
class Teacher:
  """A frozen ensemble teacher: the stacked variables of its snapshots and how to run them.

  variables: the snapshots stacked on a leading axis (`ensemble.stack_snapshots`), replicated on the run's mesh.
  apply_fn: (variables, x) -> logits of one snapshot, in eval mode (its own config's model and dtype).
  sources: {"workdir", "step", "member", "checksum"} of every snapshot, in stacking order.
  """
  variables: PyTree
  apply_fn: Callable[[PyTree, jax.Array], jax.Array]
  sources: list[dict[str, Any]]
  model: str
  alpha: float
  tau: float
  precomputed: bool = False  # Soft labels of every training image computed once before training (no augmentation).

  @property
  def size(self) -> int:
    return len(self.sources)

  @property
  def in_step(self) -> bool:
    """Does the train step run the teacher? Not at alpha = 0, where its term has no weight, nor when its soft
    labels were computed before training."""
    return self.alpha > 0 and not self.precomputed

  @property
  def distils(self) -> bool:
    """Does the step take the distillation loss (alpha > 0), with soft labels from the batch or from the teacher?"""
    return self.alpha > 0

  def soft_targets(self, variables: PyTree, x_BxHxWxC: jax.Array) -> jax.Array:
    """The tempered teacher probabilities of a batch (`soft_targets`); `variables`: the traced `self.variables`."""
    return soft_targets(self, variables, x_BxHxWxC)

  def loss(self, logits_BxC: jax.Array, labels_B: jax.Array,
           targets_BxC: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The student's loss on a batch and its two terms (`distill_loss` at this teacher's alpha and tau)."""
    return distill_loss(logits_BxC, labels_B, targets_BxC, self.alpha, self.tau)

  def record(self) -> dict[str, Any]:
    """What TEACHER_FILE and the snapshots' metadata say of the teacher."""
    return {"model": self.model, "alpha": self.alpha, "tau": self.tau, "size": self.size,
            "soft_labels": "precomputed" if self.precomputed else "in the step", "snapshots": self.sources}


def tempered(probs_BxC: jax.Array, tau: float) -> jax.Array:
  """softmax(log p / tau): the ensemble's mean probability at temperature tau (tau = 1 gives p back)."""
  return jax.nn.softmax(jnp.log(jnp.maximum(probs_BxC, 1e-30)) / tau, axis=-1)


def soft_targets(teacher: Teacher, variables: PyTree, x_BxHxWxC: jax.Array) -> jax.Array:
  """The tempered teacher probabilities of a batch, float32 (batch, classes), without gradient. Traced in the step."""
  probs_BxC = ensemble.ensemble_predict(teacher.apply_fn, variables, x_BxHxWxC, strategy=TEACHER_STRATEGY)
  return jax.lax.stop_gradient(tempered(probs_BxC, teacher.tau))


def distill_loss(logits_BxC: jax.Array, labels_B: jax.Array, targets_BxC: jax.Array, alpha: float,
                 tau: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(1 - alpha) CE + alpha tau^2 KL(targets || softmax(logits / tau)), batch means; and the two terms.

  KL(p || q) = sum_c p_c (log p_c - log q_c), with 0 log 0 = 0.
  """
  logits_BxC = logits_BxC.astype(jnp.float32)
  ce_B = optax.softmax_cross_entropy_with_integer_labels(logits_BxC, labels_B)
  log_q_BxC = jax.nn.log_softmax(logits_BxC / tau, axis=-1)
  log_p_BxC = jnp.log(jnp.where(targets_BxC > 0, targets_BxC, 1.0))
  kl_B = jnp.sum(targets_BxC * (log_p_BxC - log_q_BxC), axis=-1)
  ce, kl = ce_B.mean(), kl_B.mean()
  return (1.0 - alpha) * ce + alpha * tau ** 2 * kl, {"ce": ce, "kl": kl}


def _teacher_config(workdir: str) -> ml_collections.ConfigDict:
  if not workdir_lib.run_path(workdir).is_dir():
    raise CheckpointError(f"teacher_workdirs: {workdir!r} is not a directory; allowed: the --workdir of finished "
                          f"train.py runs")
  saved = workdir_lib.read_config(workdir)
  if saved is None:
    raise CheckpointError(f"teacher_workdirs: {workdir!r} is not a snapjax run ({workdir_lib.CONFIG_FILE} is "
                          f"missing); allowed: the --workdir of finished train.py runs")
  if not checkpoints.saved_snapshot_steps(workdir):
    raise CheckpointError(f"teacher_workdirs: {workdir!r} has no snapshots; train it first")
  lock = workdir_lock.holder(workdir)
  if lock is not None and workdir_lock.is_live(lock):  # A preempted run's snapshots so far are taken as they are.
    raise CheckpointError(f"teacher_workdirs: {workdir!r} is still training (a live run holds its "
                          f"{workdir_lock.LOCK_FILE}); distil from it once it has finished")
  return ml_collections.ConfigDict(saved)


def _check_same_data(student: experiment.Experiment, teacher: experiment.Experiment, workdir: str) -> None:
  s, t = student.spec, teacher.spec
  if student.config.dataset != teacher.config.dataset or s.num_classes != t.num_classes:
    raise ConfigError(f"teacher_workdirs: {workdir!r} was trained on dataset={teacher.config.dataset!r} "
                      f"({t.num_classes} classes), the student on dataset={student.config.dataset!r} "
                      f"({s.num_classes} classes); allowed: runs of dataset={student.config.dataset!r}")
  if tuple(student.input_shape) != tuple(teacher.input_shape):
    raise ConfigError(f"teacher_workdirs: {workdir!r} takes inputs of shape {teacher.input_shape}, the student "
                      f"{student.input_shape}; allowed: runs with the student's image_size")


def snapshot_checksum(checksums: dict[str, str]) -> str:
  """One CRC32 of a snapshot's per-array CRC32s (checkpoints.array_checksums), in key order."""
  text = ",".join(f"{k}={v}" for k, v in sorted(checksums.items()))
  return f"{zlib.crc32(text.encode()):08x}"


def load_teacher(config: ml_collections.ConfigDict, exp: experiment.Experiment) -> Teacher | None:
  """The teacher of a method="distill" run (None for every other method), every teacher run checked first.

  Raises:
    CheckpointError / ConfigError (one line): a teacher workdir that is missing, not a run, without snapshots,
      of another dataset, class count or input shape, not ensemble-compatible with the other teacher runs, or
      whose snapshots fail their checksums; teacher_last_m larger than a run's snapshot count.
  """
  if config.method != "distill":
    return None
  workdirs = workdir_list(config.teacher_workdirs)
  paths = [str(workdir_lib.run_path(w)).rstrip("/") for w in workdirs]
  twice = next((w for w, p in zip(workdirs, paths) if paths.count(p) > 1), None)
  if twice is not None:
    raise ConfigError(f"teacher_workdirs names {twice!r} twice; allowed: each teacher run once")
  configs = [_teacher_config(w) for w in workdirs]
  teacher_exps = [experiment.build(cfg, mesh=exp.mesh) for cfg in configs]
  for teacher_exp, wd in zip(teacher_exps, workdirs):
    _check_same_data(exp, teacher_exp, wd)
  try:
    runs.check_compatible(configs, workdirs)
  except CheckpointError as e:
    raise CheckpointError(f"teacher_workdirs: {e}") from None
  teacher_exp = teacher_exps[0]
  members = runs.restore_members(workdirs, teacher_exp)  # Checks every snapshot's CRC32 checksums.
  _, groups, _ = runs.member_groups(members)
  last_m = int(config.teacher_last_m)
  chosen = []
  for idx in groups:
    if last_m > len(idx):
      m = members[idx[0]]
      raise ConfigError(f"teacher_last_m={last_m} is more than the {len(idx)} snapshots of teacher run "
                        f"{m.workdir!r} (member {m.member}); allowed: 0 (all) or 1..{len(idx)}")
    chosen.extend(idx[len(idx) - last_m:] if last_m else idx)
  picked = [members[i] for i in chosen]
  sources = [{"workdir": str(workdir_lib.run_path(m.workdir)), "step": m.step, "member": m.member,
              "checksum": snapshot_checksum(checkpoints.array_checksums(m.variables))} for m in picked]
  stacked = jax.device_put(ensemble.stack_snapshots([m.variables for m in picked]), exp.replicated)
  precomputed = (config.distill_soft_labels == "auto" and exp.spec.in_memory and exp.spec.augment == "none"
                 and float(config.distill_alpha) > 0)
  return Teacher(variables=stacked, apply_fn=teacher_exp.apply_fn, sources=sources, model=str(configs[0].model),
                 alpha=float(config.distill_alpha), tau=float(config.distill_tau), precomputed=precomputed)


def precompute_soft_labels(teacher: Teacher, exp: experiment.Experiment, images: np.ndarray) -> np.ndarray:
  """The tempered teacher probabilities of every training image (raw, as the split holds them), float32 (N, C).

  The training batches of an unaugmented run are the normalised images (data.augment_batch with augment "none"),
  so these are the soft labels the step would compute for them. Run on the run's mesh in batches of
  eval_batch_size; every host gets the whole array (each holds the whole host split too).
  """
  spec, variables = exp.spec, teacher.variables
  fn = jax.jit(lambda v, raw: soft_targets(teacher, v, data.normalize(raw, spec)), out_shardings=exp.replicated)
  batch = experiment.round_up(int(exp.config.eval_batch_size), exp.mesh.devices.size)
  out = []
  for x, _, mask in data.eval_batches(images, np.zeros(len(images), np.int32), batch):
    probs = fn(variables, experiment.put_sharded(exp.mesh, x))
    out.append(np.asarray(probs.addressable_data(0))[mask.astype(bool)])
  return np.concatenate(out).astype(np.float32)


def check_recorded(workdir: str, teacher: Teacher) -> None:
  """A resumed student's teacher must be the one it started with (TEACHER_FILE), else a one-line CheckpointError."""
  path = workdir_lib.run_path(workdir) / TEACHER_FILE
  if not path.exists():
    return
  try:
    saved = json.loads(path.read_text()).get("snapshots", [])
  except (OSError, ValueError, AttributeError) as e:
    raise CheckpointError(f"{path} is unreadable ({e}); it records this run's teacher; pass --fresh") from e
  key = lambda s: (s["workdir"], s["step"], s["member"], s["checksum"])
  if [key(s) for s in saved] != [key(s) for s in teacher.sources]:
    raise CheckpointError(f"the teacher in teacher_workdirs is not the one this run started with ({path} records "
                          f"{len(saved)} other snapshot(s) or checksums); pass --fresh to distil from it anew")


def write_record(workdir: str, teacher: Teacher) -> None:
  """TEACHER_FILE in the student's workdir, written once when the run starts (atomically; main process only)."""
  path = workdir_lib.run_path(workdir) / TEACHER_FILE
  if jax.process_index() != 0 or path.exists():
    return
  tmp = path.parent / (TEACHER_FILE + ".tmp")
  tmp.write_text(json.dumps(teacher.record(), indent=1))
  tmp.replace(path)

