"""Issue 9's study: Table 1's comparison at CPU scale on real Fashion-MNIST, one budget B for every arm.

`--config configs/study_fashion_mnist.py:ARM`, ARM one of ARMS: the paper's methods (snapshot, snapshot_lr0.1,
single, nocycle, single_cycle; snapjax.methods.apply_method), snapshot_smoothout, the Snapshot Ensemble trained
with AdaSmoothOut, and (issue 23) the methods that followed, FGE, SWA and SWAG (apply_method's library defaults: FGE's
2-epoch cycles after 80% pretraining, SWA from 75% of the budget at swa_lr 0.05, SWAG's rank 20), and distill, a
ResNet-8 student on the single model's step schedule taught by a finished Snapshot Ensemble run (it needs
--config.teacher_workdirs=RUN; scripts/study.py passes the same seed's snapshot run). `python scripts/study.py`
trains every arm for 3 seeds (and single models of seeds 3 and 4 for the deep ensemble of 5) and writes
docs/results/fashion_mnist.md.

The budget, for every arm: ResNet-8, the first 20,000 training images without augmentation, 30 epochs (4,680
updates of batch 128), M = 5 cosine cycles of 6 epochs (936 updates) for the cyclic arms. It is the quickstart's
(configs/quickstart.py: 10,000 images, 30 epochs, 6-epoch cycles that converge) with twice the data, so twice the
updates per cycle at the same 6 epochs per cycle: 600,000 training images per run, about 2x the quickstart's
3.5 min, which fit issue 9's 6 arms x 3 seeds (18 runs) and their evaluations in about 2 hours on this project's
2-core CPU (2 h 34 min measured at --jobs 2). docs/results/fashion_mnist.md says how it was chosen and what a pilot
run measured. Issue 23's arms keep it: 32 runs and 32 evaluations with OOD and shift, about 6 hours at --jobs 2 by
`python scripts/study.py --dry_run`'s estimate from those measured times.
"""
from snapjax import config as base, methods

# Every arm of the study that trains; the eval-side arms (weight-averaged snapshots, true and deep ensembles) are in
# snapjax/study/plan.py.
ARMS = ("snapshot", "snapshot_lr0.1", "single", "nocycle", "single_cycle", "snapshot_smoothout", "fge", "swa", "swag",
        "distill")
# The arm whose run of the same seed teaches the distill arm's student.
DISTILL_TEACHER = "snapshot"
# AdaSmoothOut (Wen et al. 2018, the authors' --adapt-type filter): per filter, uniform noise of norm
# a * ||w_filter||, a = 0.01 constant over training, K = 1 (one fresh perturbation per batch: stochastic SmoothOut).
SMOOTHOUT = {"smoothout_a": 0.01, "smoothout_noise": "filter", "smoothout_chunks": 1, "smoothout_schedule": "constant"}


def get_config(arm=None):
  c = base.base_config()
  c.model = "resnet8"  # 75K parameters: small enough for 18 runs on a 2-core CPU.
  c.dataset = "fashion_mnist"  # Read from c.fashion_mnist_dir (apt-get install dataset-fashion-mnist).
  c.train_split = "train[:20000]"  # The first 20,000 training images; the test split stays the full 10,000.
  c.augment = "none"
  c.num_epochs = 30.0  # B: 156 steps/epoch, 4,680 updates...
  c.num_cycles = 5  # ...and M: 5 cycles of 6 epochs (936 updates each).
  c.init_lr = 0.2  # alpha0 (0.1 for snapshot_lr0.1; the step-schedule arms start at 0.1, as in the paper).
  c.batch_size = 128  # Larger batches run faster on CPU.
  c.eval_batch_size = 1000
  c.log_every_steps = 156  # One progress line per epoch.
  c.checkpoint_every_steps = 468  # A train state every 3 epochs (and at each snapshot): little is redone on resume.
  arm = arm or "snapshot"
  if arm not in ARMS:
    from snapjax.errors import ConfigError
    raise ConfigError(f"config argument {arm!r} is not an arm of the study; allowed: {', '.join(ARMS)}")
  if arm == "snapshot_smoothout":
    for k, v in SMOOTHOUT.items():
      c[k] = v
    return c
  return methods.apply_method(c, arm)
