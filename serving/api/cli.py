"""`kvpilot serve`: flags generated from `contract.SERVE_SETTINGS`, validated once by `ServeSettings`."""

import argparse
import os
import sys

from kvpilot.serving.contract import ENV_PREFIX, SERVE_SETTING, SERVE_SETTINGS, ServeSetting
from kvpilot.serving.validation import problems
from pydantic import ValidationError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the OpenAI-compatible HTTP server",
        description=f"Every flag can also be set as an environment variable {ENV_PREFIX}<FLAG_NAME>.",
        argument_default=argparse.SUPPRESS,  # absent flags fall back to KVPILOT_* env vars, then defaults
    )
    for setting in SERVE_SETTINGS:
        parser.add_argument(setting.flag, **_argument(setting))
    parser.set_defaults(run=run)


def _argument(setting: ServeSetting) -> dict:
    default = "" if setting.default is None else f" (default {setting.default})"
    if setting.type is bool:
        return {"action": argparse.BooleanOptionalAction, "help": setting.help + default}
    choices = f": {', '.join(setting.choices)}" if setting.choices else ""
    return {"metavar": setting.metavar, "help": f"{setting.help}{choices}{default}"}


def settings_error_line(error: ValidationError, given: set[str]) -> str:
    """The first validation error as one line naming the flag (or env var) that carried the value."""
    problem = problems(error)[0]
    if not problem.path:
        return problem.message
    name = problem.path[-1]  # a setting, or the EngineConfig field its model validator named
    setting = SERVE_SETTING.get(name) or next((s for s in SERVE_SETTINGS if s.engine_field == name), None)
    if setting is None:
        return f"{name}: {problem.message}"
    source = setting.flag if setting.name in given else f"{setting.flag} ({setting.env})"
    value = problem.value
    shown = value is not None and not isinstance(value, dict) and "got" not in problem.message
    return f"{source}: {problem.message}{f' (got {value!r})' if shown else ''}"


def run(args: argparse.Namespace) -> int:
    from kvpilot.serving.api.settings import ServeSettings
    from kvpilot.serving.api.termination import write_termination_reason

    given = {name: value for name, value in vars(args).items() if name in SERVE_SETTING}
    try:
        settings = ServeSettings(**given)
        settings.model_path  # noqa: B018 - resolves the default model, fails early when it is missing
    except (ValidationError, FileNotFoundError) as exc:
        if isinstance(exc, ValidationError):
            line = f"kvpilot serve: error: {settings_error_line(exc, set(given))}"
        else:
            line = f"kvpilot serve: error: --model: {exc}"
        print(line, file=sys.stderr)
        termination_log = given.get("termination_log", os.environ.get(SERVE_SETTING["termination_log"].env))
        write_termination_reason(termination_log, line)
        return 2
    from kvpilot.kernels import native_build

    native_build.prebuild_in_background()  # compiles (first start only) while torch and the model load
    from kvpilot.serving.api.server import run_server

    return run_server(settings)
