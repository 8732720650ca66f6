"""Shared command-line plumbing: a user's mistake ends as one line on stderr and exit status 2.

Every CLI (train.py, sample.py, python -m ldm_jax.export / .interop.convert / .quickstart)
reports the errors of ldm_jax/errors.py, bad flags, bad config files and bad config overrides
as `error: <what is wrong and the fix>`, without a traceback. --verbose (or the environment
variable LDM_JAX_VERBOSE=1) prints the traceback above that line, for bug reports.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib.util
import logging
import os
import re
import sys
import threading
import traceback
import warnings
from typing import NoReturn

from ldm_jax.errors import USER_ERRORS

# Errors whose message already says what is wrong and what to do: no traceback for these.
KNOWN_ERRORS = USER_ERRORS

VERBOSE_ENV = "LDM_JAX_VERBOSE"
VERBOSE_HELP = (f"On an error, print the traceback too (so does {VERBOSE_ENV}=1); without it an "
                f"error is one line on stderr and exit status 2.")

_verbose = False


def set_verbose(on: bool):
  global _verbose
  _verbose = bool(on)


def verbose() -> bool:
  """--verbose was given, or LDM_JAX_VERBOSE is set to 1 / true / yes."""
  return _verbose or os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes")


def one_line(message) -> str:
  """A message's lines joined into one (messages of other libraries may span several)."""
  return " ".join(line.strip() for line in str(message).splitlines() if line.strip())


def fail(message) -> NoReturn:
  """Writes `error: <message>` as one line and exits 2; with --verbose, the traceback of the
  exception being handled (if any) comes first."""
  if verbose() and sys.exc_info()[1] is not None:
    traceback.print_exc()
  sys.stderr.write(f"error: {one_line(message)}\n")
  sys.exit(2)


@contextlib.contextmanager
def friendly_errors():
  """The body's user errors (ldm_jax.errors, a missing file) become one line and exit 2.

  From here on, errors that libraries' worker threads report as unraisable (after a failed save,
  each of Orbax's pending writes finds its event loop closed) go to the debug log instead of
  stderr, and asyncio's reports of the failed tasks are dropped, so the error line stays the
  only one; --verbose prints them all. (asyncio runs only inside Orbax in these programs.)"""
  sys.unraisablehook = _quiet_off_main_thread(sys.unraisablehook)
  threading.excepthook = _quiet_off_main_thread(threading.excepthook)
  if not verbose():   # ...and the tasks and coroutines those writes leave behind
    warnings.filterwarnings("ignore", r"coroutine .* was never awaited", RuntimeWarning)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
  try:
    yield
  except KNOWN_ERRORS as e:
    fail(e)


def _quiet_off_main_thread(previous):
  """A sys.unraisablehook / threading.excepthook (both take one info object) that logs errors
  of threads other than the main one at debug level, and leaves the main thread's to `previous`."""
  def hook(arg):
    if threading.current_thread() is threading.main_thread() or verbose():
      return previous(arg)
    logging.getLogger("ldm_jax").debug("error in a background thread: %s: %s",
                                       getattr(arg.exc_type, "__name__", arg.exc_type),
                                       arg.exc_value)
  return hook


class ArgumentParser(argparse.ArgumentParser):
  """argparse with one-line usage errors (exit 2) and a --verbose flag on every (sub)parser."""

  def __init__(self, *args, **kwargs):
    kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
    super().__init__(*args, **kwargs)
    # SUPPRESS: a subcommand's parser must not reset a --verbose given before the subcommand.
    self.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                      help=VERBOSE_HELP)

  def parse_args(self, args=None, namespace=None):
    parsed = super().parse_args(args, namespace)
    set_verbose(getattr(parsed, "verbose", False))
    return parsed

  def error(self, message):
    fail(f"{message} (see {self.prog} --help)")


def setup_logging(level: str = "INFO"):
  """ldm_jax's progress lines on stderr; library chatter (Orbax, clu, absl) only from WARNING."""
  import logging  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.set_verbosity(absl_logging.WARNING)
  # Orbax warns on every read-only open of a checkpoint folder, which sampling does on purpose.
  logging.getLogger("absl").addFilter(lambda r: "is read only" not in r.getMessage())
  logger = logging.getLogger("ldm_jax")
  logger.setLevel(level)
  if not any(getattr(h, "_ldm_jax", False) for h in logger.handlers):
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    handler._ldm_jax = True  # pylint: disable=protected-access
    logger.addHandler(handler)
  logger.propagate = False
  return logger


# ---------------------------------------------------------------------------------------------
# absl CLIs (train.py, sample.py)
# ---------------------------------------------------------------------------------------------
def _verbose_in(argv) -> bool:
  return any(a in ("--verbose", "-verbose") or re.fullmatch(r"--?verbose=(1|true|True)", a)
             for a in argv[1:])


def absl_flags_parser(config_flag: str | None = None):
  """A `flags_parser` for absl's app.run: parses argv as absl does, but a bad flag, a missing
  or failing config file (the ml_collections flag `config_flag`) or a bad --<config_flag>.<field>
  override ends as one line and exit 2, instead of absl's usage text or a traceback."""

  def parse(argv):
    from absl import flags  # pylint: disable=g-import-not-at-top
    set_verbose(_verbose_in(argv))
    try:
      rest = flags.FLAGS(argv)
      if config_flag:
        _ = flags.FLAGS[config_flag].value.get("stage")   # a config that failed to load raises
    except Exception as e:  # pylint: disable=broad-except
      fail(describe_flag_error(e, argv, config_flag))
    if config_flag:
      bad = tuple_override_error(argv, config_flag, flags.FLAGS[config_flag].value)
      if bad:
        fail(bad)
    if len(rest) > 1:
      fail(f"unexpected arguments {rest[1:]}: flags take the form --name=value (see "
           f"{os.path.basename(argv[0])} --helpshort)")
    return rest

  return parse


def describe_flag_error(error: Exception, argv, config_flag: str | None = None) -> str:
  """One line for an exception of absl flag parsing: the config file or override at fault when
  `config_flag` names one, else absl's own message."""
  if config_flag:
    found = diagnose_config_flags(argv, config_flag, error)
    if found:
      return found
  message = one_line(error)
  m = re.match(r"flag --(\w+)=None: Flag --\w+ must have a value other than None", message)
  if m:
    return f"--{m.group(1)}: required (see {os.path.basename(argv[0])} --helpshort)"
  return f"{message} (see {os.path.basename(argv[0])} --helpshort)"


def _config_spec(argv, name: str) -> str | None:
  for i, arg in enumerate(argv):
    m = re.fullmatch(rf"--?{name}=(.*)", arg)
    if m:
      return m.group(1)
    if arg in (f"--{name}", f"-{name}") and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _overrides(argv, name: str) -> list[tuple[str, str | None]]:
  """(field path, value or None) of every --<name>.<field>[=value] / --no<name>.<field>."""
  out = []
  for arg in argv[1:]:
    m = re.fullmatch(rf"--?(?:no)?{name}\.([^=]+)(?:=(.*))?", arg, re.S)
    if m:
      out.append((m.group(1), m.group(2)))
  return out


def _load_config_file(spec: str):
  """get_config(variant) of `path[:variant]`, loaded the way ml_collections loads it."""
  path, _, variant = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("ldm_jax_cli_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant) if variant else module.get_config()


def _lookup(config, path: str):
  """(found, value) of a dotted path in a ConfigDict."""
  node = config
  for part in path.split("."):
    try:
      node = node[part]
    except (KeyError, TypeError, IndexError, AttributeError):
      return False, None
  return True, node


def unknown_field_message(config, path: str) -> str:
  """The schema's own 'unknown config field' line (with its 'did you mean'), as
  ldm_jax.config_validation writes it for an unknown field of a config."""
  # pylint: disable=g-import-not-at-top
  import ml_collections
  from ldm_jax import config as config_lib
  from ldm_jax import config_validation
  from ldm_jax.errors import ConfigError
  stage = config.get("stage", "autoencoder")
  try:
    known = config_lib.fields(stage)
    probe = ml_collections.ConfigDict(config.to_dict())
    node = probe
    *parents, leaf = path.split(".")
    for p in parents:
      if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
        node[p] = ml_collections.ConfigDict()
      node = node[p]
    node[leaf] = None
    config_validation.check_types(probe, known)
  except ConfigError as e:
    if f"'{path}'" in str(e):
      return str(e)
  except Exception:  # pylint: disable=broad-except
    pass
  # A config outside the schema (or one failing an earlier field): suggest from its own fields.
  fields = list(_flat_fields(config))
  close = difflib.get_close_matches(path, fields, n=1)
  hint = f" (did you mean '{close[0]}'?)" if close else ""
  return f"unknown config field '{path}'{hint}"


def _flat_fields(config, prefix=""):
  for key, value in config.items():
    yield f"{prefix}{key}"
    if hasattr(value, "items"):
      yield from _flat_fields(value, f"{prefix}{key}.")


def _expected(value) -> tuple[str, str]:
  """(the kind of value a field takes, an example of it on the command line)."""
  if isinstance(value, bool):
    return "a bool", str(value).lower()
  if isinstance(value, (tuple, list)):
    items = ", ".join(str(v) for v in value) + ("," if len(value) == 1 else "")
    return "a tuple", f"'({items})'"
  kinds = {int: "an int", float: "a float", str: "a string"}
  return kinds.get(type(value), type(value).__name__), str(value)


def tuple_override_error(argv, name: str, config) -> str | None:
  """ml_collections parses any tuple override (`--config.model.ch_mult=abc` gives ('abc',)); a
  tuple whose items are not of the schema's item type (int or float) is reported here."""
  from ldm_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  try:
    known = config_lib.fields(config.get("stage"))
  except Exception:  # pylint: disable=broad-except
    return None   # not a stage of the schema: config validation reports it
  for field, value in _overrides(argv, name):
    default = getattr(known.get(field), "default", None)
    if not isinstance(default, (tuple, list)) or not default:
      continue
    item = type(default[0])
    if item not in (int, float) or any(type(d) is not item for d in default):
      continue
    found, current = _lookup(config, field)
    numbers = (int, float) if item is float else (int,)
    if found and isinstance(current, (tuple, list)) and not all(
        isinstance(v, numbers) and not isinstance(v, bool) for v in current):
      _, example = _expected(default)
      return (f"--{name}.{field}={value}: expected a tuple of {item.__name__}s for {field} "
              f"(e.g. --{name}.{field}={example}), got {tuple(current)!r}")
  return None


def diagnose_config_flags(argv, name: str, error: Exception | None = None) -> str | None:
  """The first problem of `--<name>=file[:variant]` and its `--<name>.<field>=value` overrides:
  a missing file, a config file that fails, an unknown field (with the closest known one) or a
  value of the wrong type; None when none of them is at fault."""
  spec = _config_spec(argv, name)
  if spec is None:
    return None
  path = spec.partition(":")[0]
  if not os.path.isfile(path):
    return (f"--{name}: no config file '{path}' (give one of configs/*.py, optionally with "
            f":variant, e.g. --{name}=configs/tiny_ae.py)")
  try:
    config = _load_config_file(spec)
  except Exception as e:  # pylint: disable=broad-except
    # A config's own ValueError names the problem (e.g. an unknown variant and the known ones);
    # anything else is a bug in the file, and --verbose shows where.
    if isinstance(e, ValueError):
      return f"--{name}={spec}: {one_line(e)}"
    return (f"--{name}={spec}: {type(e).__name__}: {one_line(e)} (an error in the config file; "
            f"--verbose shows where)")
  if not hasattr(config, "items"):
    return f"--{name}={spec}: get_config() returned {type(config).__name__}, not a ConfigDict"
  message = one_line(error) if error is not None else ""
  for field, value in _overrides(argv, name):
    found, current = _lookup(config, field)
    if not found:
      return f"--{name}.{field}: {unknown_field_message(config, field)}"
    if f"--{name}.{field}=" in message or f"{name}.{field}" in message.split(":")[0]:
      kind, example = _expected(current)
      return (f"--{name}.{field}={value}: expected {kind} for {field} (e.g. "
              f"--{name}.{field}={example}), got {value!r}")
  return None
