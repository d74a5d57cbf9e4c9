"""mergekit's YAML as pydantic models: accepted unchanged, rejected with the path of the offending key.

Parameter values follow mergekit: a scalar, a gradient (a list of numbers interpolated across a slice's layers), or
a list of {filter, value} matched on tensor names, the first match winning. Scopes resolve from the most specific
down: the model's own parameters in its slice, then the slice's, then the top level.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from merging.errors import ConfigError

Scalar = Union[bool, float, int, str]
ScalarOrGradient = Union[Scalar, list[Scalar]]


class ConditionalParameter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: ScalarOrGradient
    filter: Optional[str] = None


ParameterSetting = Union[ScalarOrGradient, ConditionalParameter, list[ConditionalParameter]]

_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _coerce_strings(setting: Any) -> Any:
    """Parameter values as mergekit reads them: YAML 1.1 reads `1e-6` (no dot) and quoted numbers as strings, and
    mergekit turns such strings into numbers; "true"/"false" in quotes are booleans there too (pydantic's rules)."""
    if isinstance(setting, str):
        if _NUMBER.fullmatch(setting.strip()):
            return float(setting) if any(c in setting for c in ".eE") else int(setting)
        if setting.strip().lower() in ("true", "false"):
            return setting.strip().lower() == "true"
        return setting
    if isinstance(setting, list):
        return [_coerce_strings(v) for v in setting]
    if isinstance(setting, dict):
        return {k: (_coerce_strings(v) if k == "value" else v) for k, v in setting.items()}
    return setting


def _coerce_parameters(params: Any) -> Any:
    if not isinstance(params, dict):
        return params
    return {k: (v if k == "gram" else _coerce_strings(v)) for k, v in params.items()}  # gram: a file path


Parameters = Annotated[dict[str, ParameterSetting], BeforeValidator(_coerce_parameters)]


def _path_at(text: str, what: str) -> dict:
    """`path@revision`, as mergekit's ModelPath reads it: one `@` at most."""
    if text.count("@") > 1:
        raise ValueError(f"{what} {text!r} has more than one '@' (write path@revision)")
    path, _, rev = text.partition("@")
    return {"path": path, "revision": rev or None}


class AdapterRef(BaseModel):
    """A PEFT LoRA adapter: a local folder or a hub id, optionally at a revision."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str
    revision: Optional[str] = None

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, v: Any) -> Any:
        return _path_at(v, "LoRA adapter") if isinstance(v, str) else v

    def __str__(self) -> str:
        return self.path + (f"@{self.revision}" if self.revision else "")


class ModelRef(BaseModel):
    """A model: a local folder or a hub id, optionally at a revision (`id@rev` or {path, revision}), optionally with a
    LoRA adapter merged into it first (`base+adapter`, or mergekit's {model: ..., lora: ...})."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str
    revision: Optional[str] = None
    lora: Optional[AdapterRef] = None

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, v: Any) -> Any:
        if isinstance(v, str):
            chunks = v.split("+")
            if len(chunks) > 2:
                raise ValueError(f"model {v!r} has more than one '+' (write base+adapter)")
            return {**_path_at(chunks[0], "model"), "lora": chunks[1] if len(chunks) == 2 else None}
        if isinstance(v, dict) and "model" in v and "path" not in v:  # mergekit's ModelReference written out
            if v.get("override_architecture") is not None:
                raise ValueError("override_architecture is not supported: alloy takes each model's architecture "
                                 "from its config.json")
            extra = sorted(set(v) - {"model", "lora", "override_architecture"})
            if extra:
                raise ValueError(f"unknown key(s) {extra} in a model reference (allowed: model, lora)")
            inner = v["model"]
            base = _path_at(inner, "model") if isinstance(inner, str) else inner
            if not isinstance(base, dict):
                raise ValueError(f"model: expected a path or {{path, revision}}, got {inner!r}")
            return {**base, "lora": v.get("lora")}
        return v

    @property
    def base(self) -> "ModelRef":
        """The model without its adapter."""
        return ModelRef(path=self.path, revision=self.revision)

    def __str__(self) -> str:
        return self.path + (f"@{self.revision}" if self.revision else "") + (f"+{self.lora}" if self.lora else "")


class InputModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: ModelRef
    parameters: Optional[Parameters] = None


class InputSlice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: ModelRef
    layer_range: tuple[int, int]
    parameters: Optional[Parameters] = None

    @field_validator("layer_range")
    @classmethod
    def _range(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 0 or v[1] <= v[0]:
            raise ValueError(f"layer_range {list(v)} must be [start, end) with 0 <= start < end")
        return v


class OutputSlice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sources: list[InputSlice] = Field(min_length=1)
    base_model: Optional[ModelRef] = None
    residual_weight: Optional[float] = None
    parameters: Optional[Parameters] = None


class TokenSource(BaseModel):
    """Where a `tokenizer.tokens` entry takes its row: a model (written as the model itself: its row for the token),
    `{kind: model_token, model, token | token_id}` (another token's row) or `{kind: zero}`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["model", "model_token", "zero"]
    model: Optional[ModelRef] = None
    token: Optional[str] = None
    token_id: Optional[int] = None

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, v: Any) -> Any:
        if isinstance(v, str) or (isinstance(v, dict) and "kind" not in v):
            return {"kind": "model", "model": v}
        return v

    @model_validator(mode="after")
    def _fields(self) -> "TokenSource":
        if self.kind == "zero" and (self.model or self.token is not None or self.token_id is not None):
            raise ValueError("kind: zero takes no model, token or token_id")
        if self.kind != "zero" and self.model is None:
            raise ValueError(f"kind: {self.kind} needs a model")
        if self.kind == "model_token" and (self.token is None) == (self.token_id is None):
            raise ValueError("kind: model_token needs exactly one of token or token_id")
        if self.kind == "model" and (self.token is not None or self.token_id is not None):
            raise ValueError("token / token_id need kind: model_token")
        return self


class TokenSetting(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    source: Optional[TokenSource] = None
    force: bool = False


class TokenizerSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: Union[Literal["union", "base"], ModelRef] = "union"  # mergekit's default
    tokens: Optional[dict[str, TokenSetting]] = None
    pad_to_multiple_of: Optional[int] = None

    @field_validator("pad_to_multiple_of")
    @classmethod
    def _pad(cls, v: Optional[int]) -> Optional[int]:
        if v is not None and v < 1:
            raise ValueError(f"pad_to_multiple_of must be a positive integer, got {v}")
        return v


class OutputModule(BaseModel):
    """One module of a multi-module model (a VLM's text decoder, vision tower, projector), merged by its own
    models or slices; its parameters sit between the slices' and the top level's (mergekit's precedence)."""

    model_config = ConfigDict(extra="forbid")
    models: Optional[list[InputModel]] = None
    slices: Optional[list[OutputSlice]] = None
    parameters: Optional[Parameters] = None

    @model_validator(mode="after")
    def _inputs(self) -> "OutputModule":
        if bool(self.models) == bool(self.slices):
            raise ValueError("a module takes exactly one of 'models' or 'slices'")
        return self


DTYPES = ("float32", "float16", "bfloat16", "float64", "fp32", "fp16", "bf16", "fp64", "float", "half", "double")
class MergeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    merge_method: str
    models: Optional[list[InputModel]] = None
    slices: Optional[list[OutputSlice]] = None
    modules: Optional[dict[str, OutputModule]] = None
    base_model: Optional[ModelRef] = None
    parameters: Optional[Parameters] = None
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    tokenizer_source: Optional[Union[Literal["union", "base"], ModelRef]] = None
    tokenizer: Optional[TokenizerSection] = None
    chat_template: Optional[str] = None
    name: Optional[str] = None  # mergekit-mega documents; harmless here

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and v.removeprefix("torch.") not in DTYPES:  # mergekit also takes torch's names
            raise ValueError(f"unknown dtype {v!r}; expected one of float32, float16, bfloat16, float64")
        return None if v is None else v.removeprefix("torch.")

    @model_validator(mode="after")
    def _inputs(self) -> "MergeConfig":
        if sum(bool(x) for x in (self.models, self.slices, self.modules)) != 1:
            raise ValueError("exactly one of 'models', 'slices' or 'modules' must be given")
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("give either 'tokenizer_source' or a 'tokenizer' section, not both")
        return self

    def referenced_models(self) -> list[ModelRef]:
        seen: dict[str, ModelRef] = {}
        if self.base_model:
            seen[str(self.base_model)] = self.base_model
        for mod in [self, *(self.modules or {}).values()]:
            for m in mod.models or []:
                seen.setdefault(str(m.model), m.model)
            for s in mod.slices or []:
                for src in s.sources:
                    seen.setdefault(str(src.model), src.model)
        return list(seen.values())

    def to_yaml(self) -> str:
        return yaml.safe_dump(_plain(self.model_dump(exclude_none=True, mode="json")), sort_keys=False)


def _plain(obj: Any) -> Any:
    """model_dump turns ModelRef into {path, revision}; write it back the way users write it."""
    if isinstance(obj, dict):
        if set(obj) <= {"path", "revision", "lora"} and "path" in obj:
            lora = obj.get("lora")
            return (obj["path"] + (f"@{obj['revision']}" if obj.get("revision") else "")
                    + (f"+{_plain(lora)}" if lora else ""))
        if obj.get("kind") == "model" and set(obj) == {"kind", "model"}:  # a token's source written as the model
            return _plain(obj["model"])
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


_TOP_KEYS = list(MergeConfig.model_fields)


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after[_parse(), ModelRef]",) or "[" in str(part) or str(part).startswith(("str", "float", "int", "bool", "list", "function", "ConditionalParameter", "tuple", "literal")):
            continue  # pydantic's union branch labels are noise to a user
        else:
            text = str(part)  # a key with spaces or control characters is quoted, so the message stays one line
            out += ("." if out else "") + (text if text.isprintable() and " " not in text else repr(text))
    return out or "(top level)"


def parse_config(data: Any, source: str = "config") -> MergeConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    for key in data:
        if key not in _TOP_KEYS:
            near = difflib.get_close_matches(str(key), _TOP_KEYS, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(f"{source}: unknown key {key!r}{hint}")
    try:
        return MergeConfig.model_validate(data)
    except ValidationError as e:
        # pydantic reports one error per union branch; the first names the innermost key, which is what users need
        errs = e.errors()
        best = min(errs, key=lambda er: (er["type"] == "union_tag_invalid", -len(er["loc"])))
        msg = best["msg"].removeprefix("Value error, ")
        if "parameters" in best["loc"] and best["type"] not in ("value_error", "missing", "extra_forbidden"):
            # the union's last branch speaks ("a valid boolean"); say what a parameter value may be instead
            msg = (f"{best.get('input')!r} is not a parameter value: give a number (or true/false), a gradient (a "
                   "list of numbers) or a list of {filter, value}")
        raise ConfigError(f"{source}: {_loc(best['loc'])}: {msg}") from None


def read_yaml(path: str | Path, kind: str = "config file", documents: bool = False) -> Any:
    """A YAML file's data, or one ConfigError line naming the file (and the line and column of a syntax error).

    documents: the file may hold several YAML documents (separated by ---): a list of them."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{kind} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read ({e})") from None
    try:
        # the safe loader: no tag can build a Python object or run code
        return list(yaml.safe_load_all(text)) if documents else yaml.safe_load(text)
    except yaml.YAMLError as e:
        if "expected a single document" in str(getattr(e, "context", "")):
            raise ConfigError(f"{path}: holds several YAML documents (separated by ---); a file of merge recipes "
                              "that build on each other (mergekit-multi's) is run by `alloy multimerge`") from None
        mark = getattr(e, "problem_mark", None)
        where = f"{path}: line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        if isinstance(e, yaml.constructor.ConstructorError) and "tag" in str(getattr(e, "problem", "")):
            quoted = re.search(r"'([^']*)'", str(e.problem))
            tag = (quoted.group(1) if quoted else str(e.problem)).replace("tag:yaml.org,2002:", "!!")
            raise ConfigError(f"{where}: YAML tag {tag!r} is not allowed (configs are plain data)") from None
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: YAML syntax error: {problem}") from None


def load_config(path: str | Path) -> MergeConfig:
    return parse_config(read_yaml(path), str(path))


def evaluate(setting: Any, tensor_name: str, t: float, *, interpolate: bool = True) -> Any:
    """A parameter's value for one tensor at layer position t in [0, 1]; None when no filter matches.

    A gradient of numbers interpolates; interpolate=False (a flag or a choice, whose values mergekit reads as its
    type first: `normalize: [0, 1]` is [false, true]) steps from one value to the next instead."""
    if isinstance(setting, ConditionalParameter):
        return (evaluate(setting.value, tensor_name, t, interpolate=interpolate)
                if _matches(setting.filter, tensor_name) else None)
    if isinstance(setting, list):
        if setting and all(isinstance(e, ConditionalParameter) for e in setting):
            for cond in setting:
                if _matches(cond.filter, tensor_name):
                    return evaluate(cond.value, tensor_name, t, interpolate=interpolate)
            return None
        if interpolate and all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * setting[i0] + frac * setting[i1]
        return setting[int(t * (len(setting) - 1))]
    return setting


def _matches(filter_: Optional[str], tensor_name: str) -> bool:
    return filter_ is None or filter_ == "*" or filter_ in tensor_name
