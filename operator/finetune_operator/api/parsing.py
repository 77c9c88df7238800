"""Turning what the API server hands us into models, without ever raising anything unexpected."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import TypeAdapter, ValidationError

from .models import Phase, TrainingJobSpec, TrainingJobStatus

_PHASE: TypeAdapter[Phase | None] = TypeAdapter(Phase | None)

MAX_MESSAGE_LENGTH = 400


class SpecError(ValueError):
    """The spec cannot be acted on. `message` is one line naming the field path(s)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


def plain(value: Any) -> Any:
    """Deep-copy mapping/sequence views (kopf hands out read-only views) into dicts and lists."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [plain(v) for v in value]
    return value


def field_path(loc: tuple[Any, ...], root: str = "spec") -> str:
    path = root
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part.startswith(("function-", "tagged-union")) or part in {"str", "int", "float"}:
            continue  # pydantic's internal validator names are noise for users
        else:
            path += f".{part}"
    return path


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_MESSAGE_LENGTH else text[: MAX_MESSAGE_LENGTH - 3] + "..."


def describe_validation_error(exc: ValidationError, root: str = "spec") -> tuple[str, str | None]:
    """(one-line message, first field path) for a pydantic error."""
    parts: list[str] = []
    first_path: str | None = None
    for error in exc.errors(include_url=False):
        path = field_path(tuple(error.get("loc", ())), root)
        first_path = first_path or path
        msg = str(error.get("msg", "invalid"))
        # "Value error, set maxSteps or epochs" -> "set maxSteps or epochs"
        msg = msg.removeprefix("Value error, ")
        parts.append(f"{path}: {msg}")
    return _one_line("; ".join(parts) or "invalid spec"), first_path


def parse_spec(raw: Any) -> TrainingJobSpec:
    """Validate a spec from the API. Raises SpecError (only) when it cannot be acted on.

    Fields this operator's models do not know are left out, not refused: the API server has
    already pruned whatever its CRD does not know, so such a field comes from a newer CRD than
    this operator (the window of an upgrade or a rollback, when the API server also fills in the
    newer CRD's defaults). Failing every job over it would stop their training."""
    if not isinstance(raw, Mapping):
        raise SpecError("spec: is missing or not an object", "spec")
    data = plain(raw)
    while True:
        try:
            return TrainingJobSpec.model_validate(data)
        except ValidationError as exc:
            unknown = [tuple(e["loc"]) for e in exc.errors() if e["type"] == "extra_forbidden"]
            if not unknown or not all(_drop(data, loc) for loc in unknown):
                message, path = describe_validation_error(exc)
                raise SpecError(message, path) from None


def _drop(data: Any, loc: tuple[Any, ...]) -> bool:
    """Remove the value at `loc` (pydantic's error location); False when it is not there."""
    for part in loc[:-1]:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return False
    if isinstance(data, dict) and loc and loc[-1] in data:
        del data[loc[-1]]
        return True
    return False


def parse_status(raw: Any) -> TrainingJobStatus:
    """Read the previous status. A missing or unreadable status reads as a new job's empty one.

    Only parts that fail validation are dropped, so one odd field does not reset the counters.
    """
    if not isinstance(raw, Mapping):
        return TrainingJobStatus()
    data = plain(raw)
    try:
        return TrainingJobStatus.model_validate(data)
    except ValidationError as exc:
        bad_fields = {err["loc"][0] for err in exc.errors() if err.get("loc")}
        kept = {k: v for k, v in data.items() if k not in bad_fields}
        try:
            return TrainingJobStatus.model_validate(kept)
        except ValidationError:
            return TrainingJobStatus()


def parse_phase(raw: Any) -> Phase | None:
    """Only the status's phase, as parse_status reads it (an unreadable one is dropped), without
    the cost of the whole status: kopf asks for it on every event of every job."""
    if not isinstance(raw, Mapping):
        return None
    try:
        return _PHASE.validate_python(raw.get("phase"))
    except ValidationError:
        return None


def status_to_dict(status: TrainingJobStatus) -> dict[str, Any]:
    """The status as the API stores it (camelCase, RFC 3339 times, unset fields omitted)."""
    return status.model_dump(mode="json", by_alias=True, exclude_none=True)
