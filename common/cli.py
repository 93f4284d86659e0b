"""The command-line shell shared by every tree's entry point."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from tqdm.contrib.logging import logging_redirect_tqdm

from common import distributed
from common.config import parse_config
from common.profile import format_profile
from common.solvers.statistics import CalibrationError


def _os_error_text(error: OSError) -> str:
    """``No space left on device: /path`` (or the error's own message when it has no ``strerror``)."""
    if error.strerror:
        return error.strerror + (f": {error.filename}" if error.filename else "")
    return str(error)


def run_cli(
    settings_class: type,
    run: Callable[[object], tuple[Path, Path]],
    argv: list[str] | None,
    description: str,
    expected_errors: tuple[type[BaseException], ...] = (),
) -> int:
    """Parse settings, run, print the result table; bad input becomes one ``error: ...`` line and exit 2.

    ``ValueError`` (config and argument errors), ``FileNotFoundError`` (missing data) and
    :class:`CalibrationError` are always treated as bad input, plus ``expected_errors``. Any other ``OSError``
    (a full disk while writing) is one ``error:`` line too, with exit status 1.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank joins the process group (:mod:`common.distributed`)
    and checks that all ranks have the same settings before any work; a rank that fails leaves its message
    for the others, which then exit with it; only rank 0 prints the results.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        settings = parse_config(settings_class, argv, description)
        distributed.initialize(settings.device)
        distributed.check_same_settings(dataclasses.asdict(settings))
        with logging_redirect_tqdm():
            csv_path, json_path = run(settings)
    except (ValueError, FileNotFoundError, CalibrationError, distributed.DistributedError, *expected_errors) as error:
        distributed.report_failure(error)
        prefix = f"rank {distributed.rank()}: " if distributed.active() else ""
        print(f"error: {prefix}{error}", file=sys.stderr)
        return 2
    except OSError as error:  # the machine failed under the run (a full disk, a folder removed meanwhile)
        distributed.report_failure(error)
        print(f"error: {_os_error_text(error)}; the run stopped (a blockwise run keeps its finished methods in its "
              f"checkpoint and resumes from it when rerun)", file=sys.stderr)
        return 1
    except BaseException as error:
        distributed.report_failure(error)
        raise
    main = distributed.is_main()
    distributed.finalize(wait_for_peers=True)
    if not main:
        return 0
    from common.results.report import run_table_markdown  # matplotlib's import only once a run is done

    print(f"wrote {csv_path} and {json_path}\n")
    print(run_table_markdown(csv_path))
    profile = json.loads(json_path.read_text(encoding="utf-8")).get("profile")
    if profile:
        print(format_profile(profile))
    return 0
