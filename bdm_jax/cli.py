"""Shared entry point for the absl mains: known user errors become one line, not a traceback."""

from __future__ import annotations

import os
import sys

from absl import app

from bdm_jax.checkpoint import CheckpointError, CheckpointWriteError
from bdm_jax.config import ConfigError
from bdm_jax.reliability import Preempted


def _user_errors() -> tuple[type[BaseException], ...]:
    from bdm_jax.qat import TeacherMismatchError
    from bdm_jax.trainer import WorkdirError

    # OSError: disk full or a vanished directory while writing metrics or samples is not a bug.
    return (ConfigError, CheckpointError, TeacherMismatchError, WorkdirError, ValueError, FloatingPointError, OSError)


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


def _say(line: str) -> None:
    """One line on stderr, on a line of its own even under a live progress bar."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr)


def run_main(main) -> int:
    """app.run(main), printing `error: <message>` and exiting 2 on a user error."""

    def wrapped(argv):
        setup_logging()
        try:
            return main(argv)
        except KeyboardInterrupt:
            _say("interrupted")
            return 130
        except Preempted as e:  # SIGTERM / preemption: checkpoint saved, a rerun resumes (issue 10)
            _say(str(e))
            return 0
        except _user_errors() as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            _say(f"error: {msg}")
            if isinstance(e, CheckpointWriteError):
                # orbax's helper threads of the failed save wait minutes for a signal that never comes
                sys.stdout.flush(), sys.stderr.flush()
                os._exit(2)
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
