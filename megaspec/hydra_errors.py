"""Hydra and OmegaConf failures as one paragraph naming the override that caused them.

Hydra reports a bad override over several lines (a search path, a list of options,
a hint about HYDRA_FULL_ERROR), often naming a config key rather than what the user
typed. Here every composition or interpolation failure becomes one SpecError located
at `command line`, naming the offending override exactly as given.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from megaspec.errors import Problem, SpecError
from megaspec.source import COMMAND_LINE

# Values in a composed config, interpolations expanded: the shipped models have one or two
# hundred; a chain of overrides each doubling the last must not expand for minutes.
MAX_CONFIG_VALUES = 10_000
# Hydra's command-line flags that take a value (it is not an override).
FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                    "--config-dir", "-cd", "--info", "-i", "--experimental-rerun"}
_NOISE = re.compile(r"^(See https://hydra\.cc|Set the environment variable HYDRA_FULL_ERROR|object_type=)")


def overrides_in(argv: Sequence[str]) -> list[str]:
    """The overrides among command-line arguments (flags and their values left out)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg.startswith("-"):
            skip = arg in FLAGS_WITH_VALUE
        else:
            out.append(arg)
    return out


def _one_line(text: str) -> str:
    lines: list[str] = []
    options: list[str] = []
    search_path = False
    for raw in text.splitlines():
        line = raw.strip()
        if not line or _NOISE.match(line):
            continue
        if raw.startswith("\t"):  # Hydra lists options (and search-path entries) one per tabbed line
            if not search_path:
                options.append(line)
            continue
        search_path = line.startswith("Config search path")
        if search_path or set(line) <= {"^", " "}:  # the search path; a caret under a position already named
            continue
        if line.startswith("full_key:"):
            lines.append(f"(at {line.removeprefix('full_key:').strip()})")
        else:  # one sentence per line in Hydra's messages: keep them apart
            if lines and lines[-1][-1] not in ".:;!?)":
                lines[-1] += "."
            lines.append(line)
    joined = " ".join(lines)
    return f"{joined.rstrip(':')}: {', '.join(options)}" if options else joined


def paragraph(exc: BaseException) -> str:
    """An exception's message (and its causes') as one line: no search paths, footers or object types."""
    parts: list[str] = []
    cause: BaseException | None = exc
    while cause is not None and len(parts) < 4:
        text = _one_line(str(cause))
        if text and not any(text in p for p in parts):
            parts.append(text)
        cause = cause.__cause__
    return "; ".join(parts) or type(exc).__name__


def _parsed(overrides: Sequence[str]) -> tuple[str | None, list[tuple[str, Any]]]:
    """(the first override that does not parse on its own, or None; (override, parsed) for the others)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    parsed = []
    for text in overrides:
        try:
            parsed.append((text, parser.parse_overrides([text])[0]))
        except Exception:  # every grammar error, whatever Hydra calls it
            return text, parsed
    return None, parsed


def _named(message: str, parsed: list[tuple[str, Any]]) -> str | None:
    """The override whose key or group the message names (`'model.config.x'`, `full_key: x`, `'model/x'`)."""
    names = re.findall(r"'([^'\s]+)'|full_key: (\S+)|override (\S+)", message)
    mentioned = [n for group in names for n in group if n]
    for exact in (True, False):
        for name in mentioned:
            name = name.split("/")[0] if "/" in name else name
            for text, override in parsed:
                key = str(override.key_or_group)
                package = override.package or ""
                if name in (key, f"{key}@{package}", package or None) or (
                        not exact and (name.startswith(key + ".") or key.startswith(name + "."))):
                    return text
    return None


def culprit(exc: BaseException, overrides: Sequence[str],
            fails: Callable[[Sequence[str]], bool] | None = None) -> str | None:
    """The override that caused `exc`: one that does not parse, one the message names, or the first prefix that fails."""
    unparsable, parsed = _parsed(overrides)
    if unparsable is not None:
        return unparsable
    named = _named(str(exc) + " " + str(exc.__cause__ or ""), parsed)
    if named is not None or fails is None:
        return named
    for i in range(1, len(overrides) + 1):
        if fails(overrides[:i]):
            return overrides[i - 1]
    return None


def is_grammar_error(exc: BaseException, overrides: Sequence[str]) -> bool:
    """True when an override does not parse: a usage error (exit status 2) rather than a bad value (1)."""
    return _parsed(overrides)[0] is not None


def composition_error(exc: BaseException, overrides: Sequence[str],
                      fails: Callable[[Sequence[str]], bool] | None = None) -> SpecError:
    """One SpecError at `command line`, naming the override as typed and the reason in one paragraph."""
    guilty = culprit(exc, overrides, fails)
    message = paragraph(exc)
    return SpecError(Problem(f"{guilty}: {message}" if guilty else message, "", COMMAND_LINE))


def check_resolves(cfg: Any, overrides: Sequence[str] = ()) -> None:
    """Resolve every interpolation of a composed config, within MAX_CONFIG_VALUES values; SpecError otherwise."""
    from omegaconf import DictConfig, ListConfig
    from omegaconf.errors import MissingMandatoryValue

    stack, count = [cfg], 0
    try:
        while stack:
            node = stack.pop()
            count += 1
            if count > MAX_CONFIG_VALUES:
                raise SpecError(Problem(f"the composed config expands to more than {MAX_CONFIG_VALUES:,} values "
                                        "(interpolations included); refusing to expand it", "", COMMAND_LINE))
            if isinstance(node, DictConfig):
                keys: Any = list(node.keys())
            elif isinstance(node, ListConfig):
                keys = range(len(node))
            else:
                continue
            for key in keys:
                try:
                    stack.append(node[key])
                except MissingMandatoryValue:
                    continue
    except SpecError:
        raise
    except Exception as exc:  # OmegaConf's errors, and whatever a resolver raises
        raise composition_error(exc, overrides) from None
