"""Errors for bad user input: the command-line tools turn them into one line and exit code 2."""


class UserError(ValueError):
  """Bad input from the user (config, workdir, data files): message is one line, exit code 2."""


class ConfigError(UserError):
  """A config field has a value outside its allowed set."""


class DataError(UserError):
  """A dataset is missing, truncated or not prepared; the message says where and how to get it."""


class CheckpointError(UserError):
  """A workdir or snapshot cannot be used (missing, corrupt, or from another run)."""


class WorkdirLockedError(UserError):
  """Another live training run holds the workdir's lock (snapjax.workdir_lock)."""


class ExportError(UserError):
  """An exported ensemble file cannot be used (unreadable, truncated, not a jax.export artifact)."""
