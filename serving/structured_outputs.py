"""What a request's output must match, and which JSON Schemas the grammar engine can enforce.

`StructuredOutputsParams` is vLLM's: exactly one of a JSON Schema, any JSON object, a regular
expression, a list of choices or an EBNF/GBNF grammar. `check_json_schema` is pure (no torch, no
grammar library): a malformed schema or one that uses a feature the grammar cannot enforce is an
`InvalidParameter` naming the problem, so that every output the engine returns validates.
"""

import json
from dataclasses import dataclass, field
from typing import Any

from kvpilot.serving.validation import InvalidParameter

# Keywords whose meaning the grammar enforces (xgrammar's JSON Schema converter), or that carry
# no constraint at all (annotations). Any other keyword is refused by name.
ENFORCED_KEYWORDS = frozenset(
    {
        "type", "properties", "required", "additionalProperties", "items", "prefixItems",
        "enum", "const", "anyOf", "$ref", "$defs", "definitions",
        "minLength", "maxLength", "pattern", "format",
        "minItems", "maxItems", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    }
)  # fmt: skip
ANNOTATIONS = frozenset(
    {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
     "readOnly", "writeOnly"}
)  # fmt: skip
FORMATS = frozenset({"date", "time", "date-time", "email", "ipv4", "ipv6", "hostname", "uuid", "uri"})
_SCHEMA_MAPS = ("properties", "$defs", "definitions")  # keyword -> {name: subschema}
_SCHEMA_LISTS = ("prefixItems", "anyOf")  # keyword -> [subschema, ...]
_SCHEMA_ONE = ("items", "additionalProperties")  # keyword -> subschema (or a boolean)
# The metaschema validator recurses a few frames per level: ~120 nested `items` overflow Python's
# stack. Real schemas nest far less (OpenAI allows 10 levels of objects, i.e. ~20 here).
MAX_SCHEMA_DEPTH = 64  # objects and arrays nested in one schema document


@dataclass(frozen=True)
class StructuredOutputsParams:
    json: str | None = None  # a JSON Schema, serialized (the compile cache's key)
    json_object: bool = False  # any JSON object
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None  # EBNF (GBNF)
    # The request field it came from, for errors found later (compilation); not part of the key.
    param: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise InvalidParameter(
                "structured_outputs",
                f"give exactly one of json, json_object, regex, choice, grammar (got {given or 'none'})",
            )
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) for c in self.choice)):
            raise InvalidParameter("structured_outputs.choice", "must be a non-empty list of strings")

    @property
    def kind(self) -> str:
        """Which one was given: json, json_object, regex, choice or grammar."""
        if self.json_object:
            return "json_object"
        return next(
            name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None
        )

    @property
    def source(self) -> str:
        """The request field to name in an error about this spec."""
        return self.param or f"structured_outputs.{self.kind}"

    @classmethod
    def from_schema(cls, schema: Any, param: str) -> "StructuredOutputsParams":
        """A checked JSON Schema (see `check_json_schema`); `param` names it in errors."""
        check_json_schema(schema, param)
        return cls(json=json.dumps(schema), param=param)  # key order kept: the grammar emits properties in it


def check_json_schema(schema: Any, param: str) -> None:
    """Raise `InvalidParameter` for a malformed schema or one using features the grammar cannot
    enforce (all of them named, with where they are)."""
    check_well_formed(schema, param)
    unsupported = unsupported_features(schema)
    if unsupported:
        raise InvalidParameter(param, "unsupported JSON Schema features: " + ", ".join(unsupported))


def check_well_formed(schema: Any, param: str) -> None:
    """Raise `InvalidParameter` unless `schema` is a valid JSON Schema (by its own metaschema)."""
    from jsonschema import exceptions, validators

    if not isinstance(schema, dict):
        raise InvalidParameter(param, f"the JSON Schema must be an object, got {type(schema).__name__}")
    if (depth := nesting_depth(schema)) > MAX_SCHEMA_DEPTH:
        raise InvalidParameter(
            param,
            f"the JSON Schema nests {depth} levels deep (objects and arrays); "
            f"at most {MAX_SCHEMA_DEPTH} are allowed",
        )
    try:
        validators.validator_for(schema).check_schema(schema)
    except exceptions.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path) or "the top level"
        raise InvalidParameter(param, f"malformed JSON Schema at {where}: {exc.message}") from None


def nesting_depth(value: Any) -> int:
    """How deeply objects and arrays nest in `value` (a scalar 0, `{}` 1), level by level rather
    than by recursion, so that any depth can be measured."""
    depth, level = 0, [value]
    while containers := [item for item in level if isinstance(item, dict | list)]:
        depth += 1
        level = [
            child for item in containers for child in (item.values() if isinstance(item, dict) else item)
        ]
    return depth


def unsupported_features(schema: Any, path: str = "$") -> list[str]:
    """`keyword at path` for every keyword the grammar would not enforce; [] when all are."""
    if not isinstance(schema, dict):
        return []
    found = []
    for keyword, value in schema.items():
        where = f"{path}.{keyword}"
        if keyword not in ENFORCED_KEYWORDS and keyword not in ANNOTATIONS:
            found.append(f"{keyword} (at {path})")
        elif keyword == "format" and value not in FORMATS:
            found.append(f"format {value!r} (at {path}; supported: {', '.join(sorted(FORMATS))})")
        elif keyword == "$ref" and not str(value).startswith("#"):
            found.append(f"$ref to another document {value!r} (at {path})")
        elif keyword in _SCHEMA_MAPS and isinstance(value, dict):
            for name, sub in value.items():
                found += unsupported_features(sub, f"{where}.{name}")
        elif keyword in _SCHEMA_LISTS and isinstance(value, list):
            for index, sub in enumerate(value):
                found += unsupported_features(sub, f"{where}[{index}]")
        elif keyword in _SCHEMA_ONE:
            found += unsupported_features(value, where)
    return found
