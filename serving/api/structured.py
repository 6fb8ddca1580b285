"""`response_format` (OpenAI) and `structured_outputs` (vLLM's extra) as the engine's
`StructuredOutputsParams`; a bad or unsupported spec is a 400 naming the field."""

from kvpilot.serving.api.errors import bad_request
from kvpilot.serving.api.protocol import SamplingFields
from kvpilot.serving.structured_outputs import StructuredOutputsParams
from kvpilot.serving.validation import InvalidParameter


def structured_outputs_params(request: SamplingFields) -> StructuredOutputsParams | None:
    """None for free text."""
    response_format, extra = request.response_format, request.structured_outputs
    wants_format = response_format is not None and response_format.type != "text"
    if wants_format and extra is not None:
        raise bad_request(
            "give either response_format or structured_outputs, not both", param="structured_outputs"
        )
    try:
        if wants_format:
            return _from_response_format(request)
        if extra is not None:
            if extra.json_ is not None:
                return StructuredOutputsParams.from_schema(extra.json_, "structured_outputs.json")
            return StructuredOutputsParams(
                json_object=bool(extra.json_object),
                regex=extra.regex,
                choice=extra.choice,
                grammar=extra.grammar,
            )
    except InvalidParameter as exc:
        raise bad_request(str(exc), param=exc.param) from None
    return None


def _from_response_format(request: SamplingFields) -> StructuredOutputsParams:
    response_format = request.response_format
    if response_format.type == "json_object":
        return StructuredOutputsParams(json_object=True)
    if response_format.json_schema is None or response_format.json_schema.schema_ is None:
        raise InvalidParameter(
            "response_format.json_schema", "type 'json_schema' needs json_schema.schema (a JSON Schema)"
        )
    return StructuredOutputsParams.from_schema(
        response_format.json_schema.schema_, "response_format.json_schema.schema"
    )
