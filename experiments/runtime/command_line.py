"""Flag parsing for the command lines: a bad flag or config is one `error:` line, exit 2."""

from __future__ import annotations

import os
import re
import sys

from absl import flags


def parse_flags(argv: list[str]) -> list[str]:
  """`app.run`'s flags_parser: absl's parsing, with every problem of the flags or of the
  config file they name (a missing file, an unknown field, a value of the wrong type, an
  unknown config argument) printed as one line instead of a traceback; exit 2."""
  for i, arg in enumerate(argv[1:], 1):
    value = (arg.split("=", 1)[1] if arg.startswith("--config=") else
             argv[i + 1] if arg == "--config" and i + 1 < len(argv) else None)
    if value is not None and not os.path.isfile(value.split(":")[0]):
      _fail(f"config file {value.split(':')[0]} does not exist (the configs are in "
            "experiments/configs/)")
  try:
    rest = flags.FLAGS(argv)
    if "config" in flags.FLAGS:
      _ = flags.FLAGS.config  # a config file that fails to load fails here
    return rest
  except (flags.Error, KeyError, AttributeError, TypeError, ValueError, OSError,
          SyntaxError, ImportError) as e:
    _fail(_message(e))


def _message(error: BaseException) -> str:
  """One line: the flag that failed and the innermost reason."""
  chain = [error]
  while (chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 10:
    chain.append(chain[-1].__cause__ or chain[-1].__context__)
  first = lambda e: (str(e).strip().strip('"').splitlines() or [type(e).__name__])[0]
  outer, inner = first(chain[0]), chain[-1]
  whole = re.match(r"flag --config\.([\w.]+)=(\S+): invalid literal for int\(\)", outer)
  if whole:
    field, value = whole.groups()
    hint = {"epochs": ": the schedule is in whole epochs; to stop sooner, add "
                      "--config.halt_after_steps=N (the same command without it goes on)"}
    return (f"--config.{field} takes a whole number, got {value}"
            f"{hint.get(field, '')}")
  if isinstance(inner, KeyError):
    return f"the config has no field {first(inner)} (fields: experiments/configs/default.py)"
  if first(inner) in outer:
    return outer
  return f"{outer.rstrip(':')}: {first(inner)}"


def _fail(message: str):
  print(f"error: {message} (see --helpfull)", file=sys.stderr)
  sys.exit(2)
