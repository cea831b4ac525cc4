"""Train a Snapshot Ensemble: python train.py --config configs/quickstart.py --workdir runs/quick."""
from absl import app, flags
from ml_collections import config_flags

from snapjax import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for snapshots, train state, logs and the resolved config.")
flags.DEFINE_bool("fresh", False, "Move an existing run in --workdir aside (nothing is deleted) and start again.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for several processes (else auto).")
flags.DEFINE_integer("num_processes", None, "Number of processes, with --coordinator_address.")
flags.DEFINE_integer("process_id", None, "This process's index, with --coordinator_address.")
flags.DEFINE_string("cpu_collectives", None, "CPU collectives implementation for multi-process CPU runs (gloo).")
flags.DEFINE_string("compilation_cache_dir", None, "Opt-in: keep compiled programs in this directory (local or a "
                    "bucket) and reuse them in later runs: JAX's persistent compilation cache.")
flags.mark_flags_as_required(["config", "workdir"])


def run(argv, hooks=None):
  """train.py's work; returns the TrainResult. hooks (snapjax.training.Hooks): for tools such as test probes."""
  cli.setup_logging()
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]}; use --config.<field>=<value> to override config fields")
  config = cli.config_from_flag("config")
  cli.enable_compilation_cache(FLAGS.compilation_cache_dir)
  cli.maybe_initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                                   FLAGS.cpu_collectives)
  from snapjax import training
  return cli.run_guarded(lambda: training.main(config, FLAGS.workdir, fresh=FLAGS.fresh, hooks=hooks))


def main(argv):
  run(argv)  # absl exits with main's return value: return nothing.


if __name__ == "__main__":
  cli.run_guarded(lambda: app.run(main, flags_parser=cli.parse_flags))
