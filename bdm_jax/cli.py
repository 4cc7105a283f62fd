"""Shared entry point for the absl mains: known user errors become one line, not a traceback."""

from __future__ import annotations

import sys

from absl import app

from bdm_jax.checkpoint import CheckpointError
from bdm_jax.config import ConfigError


def _user_errors() -> tuple[type[BaseException], ...]:
    from bdm_jax.qat import TeacherMismatchError
    from bdm_jax.trainer import WorkdirError

    return (ConfigError, CheckpointError, TeacherMismatchError, WorkdirError, ValueError, FloatingPointError)


def setup_logging() -> None:
    """Our messages at INFO on stderr; libraries (orbax, absl) only from WARNING up."""
    import logging as pylogging

    from absl import logging

    logging.set_verbosity(logging.WARNING)
    log = pylogging.getLogger("bdm_jax")
    if not log.handlers:
        handler = pylogging.StreamHandler(sys.stderr)
        handler.setFormatter(pylogging.Formatter("[bdm_jax] %(message)s"))
        log.addHandler(handler)
    log.setLevel(pylogging.INFO)
    log.propagate = False


def run_main(main) -> int:
    """app.run(main), printing `error: <message>` and exiting 2 on a user error."""

    def wrapped(argv):
        setup_logging()
        try:
            return main(argv)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except _user_errors() as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"error: {msg}", file=sys.stderr)
            return 2

    try:
        app.run(wrapped)
    except SystemExit as e:
        if e.code is None:
            return 0
        return e.code if isinstance(e.code, int) else 1
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        # ml_collections raises these while parsing --config.<field>=... overrides, before main runs.
        overrides = [a.split("=", 1)[0] for a in sys.argv[1:] if a.startswith("--config.")]
        name = str(e).strip("\"' ")
        bad = [o for o in overrides if o.rsplit(".", 1)[-1] == name] or overrides
        print(f"error: {' / '.join(bad) or '--config'} is not a valid config override ({type(e).__name__}: {name}); "
              "the fields and their types are in configs/default.py", file=sys.stderr)
        return 2
    return 0
