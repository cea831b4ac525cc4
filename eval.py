"""Score a run's snapshots, their ensembles and the paper's analyses: python eval.py --workdir runs/quick.

Add --analyses=weight_average,interpolation for the analyses that pass over training data, --analyses=ood,shift for
out-of-distribution sets and corrupted test sets, --analyses=all for every analysis.
"""
from absl import app, flags

from snapjax import cli

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("workdir", None, "Run directory; repeat to ensemble the snapshots of several runs.")
flags.DEFINE_integer("last_m", None, "Size of the headline ensemble: the last m snapshots (default: all).")
flags.DEFINE_string("out_dir", None, "Where report.json, report.md and the figures go (default WORKDIR/eval).")
flags.DEFINE_integer("eval_batch_size", None, "Global evaluation batch size (default: the run's config).")
flags.DEFINE_string("data_dir", None, "Override the run's TFDS data_dir.")
flags.DEFINE_string("fashion_mnist_dir", None, "Override the run's Fashion-MNIST IDX directory.")
flags.DEFINE_string("tiny_imagenet_dir", None, "Override the run's Tiny ImageNet directory.")
flags.DEFINE_string("export", None, "Also write the headline ensemble (--last_m) as one jax.export file for "
                    "serving, raw images in, probabilities out; its description goes to FILE.json.")
flags.DEFINE_list("analyses", [], "Also run these analyses, comma-separated: weight_average (the last m snapshots' "
                  "weights averaged, m = 2..M) and interpolation (paper Fig. 5), both recomputing BatchNorm "
                  "statistics on training batches; ood (out-of-distribution detection) and shift (corrupted test "
                  "sets); all: every analysis that applies. Calibration, diversity, temperature scaling, selective "
                  "prediction, conformal sets and the deep-ensemble equivalent (several runs) are always reported.")
flags.DEFINE_integer("shift_examples", None, "Test examples (the first ones) per corruption and severity of "
                     "--analyses=shift (default 1000).")
flags.DEFINE_string("val_split", None, "Override the run's val_split: held-out training images for temperature "
                    "scaling, e.g. 'train[-5000:]' (never trained on).")
flags.DEFINE_integer("bn_batches", None, "Training batches (of the run's batch size, with its augmentation) on "
                     "which --analyses recompute BatchNorm statistics (default 50, at most one epoch); 0 = one epoch.")
flags.DEFINE_integer("interpolation_points", None, "Lambdas of --analyses=interpolation, evenly spaced in [0, 1] "
                     "with both ends (default 11: 0, 0.1, ..., 1).")
flags.DEFINE_integer("swag_samples", 30, "A method=swag run's snapshot is scored as this many networks sampled from "
                     "its SWAG posterior (each with BatchNorm statistics measured on its swa_bn_batches training "
                     "batches); their ensemble is SWAG's Bayesian model average.")
flags.DEFINE_integer("swag_seed", 0, "Seed of the SWAG samples.")
flags.DEFINE_string("compilation_cache_dir", None, "Opt-in: keep compiled programs in this directory (local or a "
                    "bucket) and reuse them in later runs: JAX's persistent compilation cache.")
flags.mark_flag_as_required("workdir")


def main(argv):
  cli.setup_logging()
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]}")
  cli.enable_compilation_cache(FLAGS.compilation_cache_dir)
  from snapjax import evaluation, report as report_lib
  overrides = {"data_dir": FLAGS.data_dir, "fashion_mnist_dir": FLAGS.fashion_mnist_dir,
               "tiny_imagenet_dir": FLAGS.tiny_imagenet_dir, "val_split": FLAGS.val_split}
  passes = {k: getattr(FLAGS, k) for k in ("bn_batches", "interpolation_points", "shift_examples")
            if getattr(FLAGS, k) is not None}
  report = cli.run_guarded(lambda: evaluation.evaluate_runs(
      FLAGS.workdir, last_m=FLAGS.last_m, out_dir=FLAGS.out_dir, data_overrides=overrides,
      eval_batch_size=FLAGS.eval_batch_size, export_path=FLAGS.export, analyses=FLAGS.analyses,
      swag_samples=FLAGS.swag_samples, swag_seed=FLAGS.swag_seed, **passes))
  print(report_lib.summary(report))
  for line in report_lib.members_summary(report) + report_lib.analyses_summary(report):
    print(line)
  if "export" in report:
    print(report_lib.export_summary(report["export"], FLAGS.export))


if __name__ == "__main__":
  cli.run_guarded(lambda: app.run(main, flags_parser=cli.parse_flags))
