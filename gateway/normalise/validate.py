"""Optional run-time validation of a mapped Bundle (``validate = true``): the fhir.resources R4B models (which
read and write R4 JSON for the resources we produce), plus the FHIR JSON rule the models let through: no empty
strings, arrays or objects. It costs a few milliseconds per bundle, which is why the hot path does not use it;
the test suite runs the same check, and the official R4 JSON schema, on every corpus message.
"""

from __future__ import annotations

from typing import Any

from fhir.resources.R4B.bundle import Bundle
from pydantic import ValidationError

from . import MappingError

_MAX_PROBLEMS = 5


def validate_bundle(bundle: dict[str, Any]) -> None:
    """Return if ``bundle`` is a valid FHIR Bundle; raise MappingError listing the first problems otherwise.

    The reason names paths and rules only, never values (they may be PHI), and the pydantic error is not
    chained for the same reason."""
    problems = _empty_values(bundle, "Bundle", [])
    try:
        Bundle.model_validate(bundle)
    except ValidationError as exc:
        for err in exc.errors(include_url=False, include_input=False):
            problems.append(f"{_path(bundle, err['loc'])}: {err['msg']}")
            if len(problems) >= _MAX_PROBLEMS:
                break
    if problems:
        raise MappingError("invalid FHIR bundle: " + "; ".join(problems[:_MAX_PROBLEMS]))


def _path(bundle: dict[str, Any], loc: tuple[int | str, ...]) -> str:
    """A readable path, naming the resource type of ``entry[n].resource``."""
    out = "Bundle"
    node: Any = bundle
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}"
        node = _step(node, part)
        if part == "resource" and isinstance(node, dict) and isinstance(node.get("resourceType"), str):
            out += f"({node['resourceType']})"
    return out


def _step(node: Any, part: int | str) -> Any:
    if isinstance(node, dict):
        return node.get(part) if isinstance(part, str) else None
    if isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
        return node[part]
    return None


def _empty_values(node: Any, path: str, problems: list[str]) -> list[str]:
    if len(problems) >= _MAX_PROBLEMS:
        return problems
    if isinstance(node, dict):
        if not node:
            problems.append(f"{path}: empty object")
        for key, value in node.items():
            _empty_values(value, f"{path}.{key}", problems)
    elif isinstance(node, list):
        if not node:
            problems.append(f"{path}: empty array")
        for i, value in enumerate(node):
            _empty_values(value, f"{path}[{i}]", problems)
    elif isinstance(node, str) and not node.strip():
        problems.append(f"{path}: empty string")
    return problems
