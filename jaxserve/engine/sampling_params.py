"""SamplingParams: what one request asks of the sampler, with vLLM's names and ranges.

Host-side only (no jax). Validated at construction: a bad value raises SamplingParamsError naming
the parameter, which the server turns into a 400 with that `param`. Messages follow vLLM's
(`vllm/sampling_params.py`) where vLLM has one. The runner's sampler (runner/sampling.py) packs
these into fixed-width arrays, hence the two size caps below.
"""

from __future__ import annotations

import dataclasses
import json as _json
import math
import numbers

# The sampler holds logit_bias and stop_token_ids in fixed-width arrays so that their shapes never
# change between steps (a new shape would recompile the step); these are those widths.
MAX_LOGIT_BIAS_ENTRIES = 300
MAX_STOP_TOKEN_IDS = 64
# Bounds on what one request may ask for, checked before any work (a request with n = 2**63
# once made the server allocate children until the OOM killer ended it): n completions per
# prompt, and the stop strings every detokenized step is searched for.
MAX_N = 128
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class SamplingParamsError(ValueError):
    """An out-of-range or inconsistent sampling parameter; `param` names it."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


# A grammar, schema, regex or choice list of one request, as canonical text: llguidance builds
# its parser in time and memory that grow with it.
MAX_STRUCTURED_OUTPUT_CHARS = 100_000
MAX_CHOICES = 1024


@dataclasses.dataclass(frozen=True)
class StructuredOutputsParams:
    """Constrained decoding, as vLLM 0.33 names it: exactly one of a JSON schema (`json`, a dict
    or its JSON text), `regex`, `choice` (the output is one of these strings), `grammar` (Lark,
    or GBNF/EBNF as llguidance converts it) or `json_object` (any JSON object). The engine
    compiles it with llguidance (engine/grammar.py) and masks every step's logits with it."""
    json: str | dict | None = None
    regex: str | None = None
    choice: tuple[str, ...] | list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    # JSON only: no whitespace between tokens (compact output; vLLM's option of this name)
    disable_any_whitespace: bool = False

    def __post_init__(self):
        given = [k for k in ("json", "regex", "choice", "grammar", "json_object")
                 if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise SamplingParamsError("structured_outputs", "structured_outputs needs exactly one "
                                      "of json, regex, choice, grammar and json_object, got "
                                      f"{given or 'none'}.")
        param = f"structured_outputs.{given[0]}"
        if self.json is not None:
            if isinstance(self.json, str):
                try:
                    schema = _json.loads(self.json)
                except ValueError as e:
                    raise SamplingParamsError(param, f"the JSON schema is not valid JSON: {e}") from None
            else:
                schema = self.json
            if not isinstance(schema, (dict, bool)):
                raise SamplingParamsError(param, "a JSON schema must be an object or a boolean.")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise SamplingParamsError(f"structured_outputs.{name}",
                                          f"{name} must be a non-empty string.")
        if self.choice is not None:
            if (isinstance(self.choice, str) or not isinstance(self.choice, (list, tuple))
                    or not self.choice or not all(isinstance(c, str) for c in self.choice)):
                raise SamplingParamsError(param, "choice must be a non-empty list of strings.")
            if len(self.choice) > MAX_CHOICES:
                raise SamplingParamsError(param, f"choice can hold at most {MAX_CHOICES} strings, "
                                          f"got {len(self.choice)}.")
            object.__setattr__(self, "choice", tuple(self.choice))
        if self.json_object is not None and not isinstance(self.json_object, bool):
            raise SamplingParamsError("structured_outputs.json_object",
                                      "json_object must be a boolean.")
        if not isinstance(self.disable_any_whitespace, bool):
            raise SamplingParamsError("structured_outputs.disable_any_whitespace",
                                      "disable_any_whitespace must be a boolean.")
        try:
            canonical = self.key[1]
        except (TypeError, ValueError, RecursionError) as e:  # not JSON, or nested too deep
            raise SamplingParamsError(param, f"the JSON schema cannot be serialized: {e}") from None
        if len(canonical) > MAX_STRUCTURED_OUTPUT_CHARS:
            raise SamplingParamsError(param, f"the {given[0]} constraint can have at most "
                                      f"{MAX_STRUCTURED_OUTPUT_CHARS} characters, got "
                                      f"{len(canonical)}.")

    @property
    def kind(self) -> str:
        return next(k for k in ("json", "regex", "choice", "grammar", "json_object")
                    if getattr(self, k) not in (None, False))

    @property
    def param(self) -> str:
        """The field that errors about this constraint name."""
        return f"structured_outputs.{self.kind}"

    @property
    def key(self) -> tuple[str, str, bool]:
        """(kind, canonical text, compact JSON): equal constraints share one compiled grammar."""
        kind = self.kind
        compact = self.disable_any_whitespace and kind in ("json", "json_object")
        if kind == "json":
            schema = _json.loads(self.json) if isinstance(self.json, str) else self.json
            return kind, _json.dumps(schema, sort_keys=True, separators=(",", ":")), compact
        if kind == "choice":
            return kind, _json.dumps(list(self.choice)), compact
        if kind == "json_object":
            return kind, '{"type":"object"}', compact
        return kind, getattr(self, kind), compact


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


@dataclasses.dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 16
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None  # -1: none, as in vLLM
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None  # top logprobs per generated token (0: only the sampled one)
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None  # JSON gives string keys: converted to int
    skip_special_tokens: bool = True
    # constrained decoding (a dict of StructuredOutputsParams' fields is converted)
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self):
        if isinstance(self.structured_outputs, dict):
            try:
                self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
            except TypeError as e:
                raise SamplingParamsError("structured_outputs", str(e)) from None
        if self.structured_outputs is not None and not isinstance(
                self.structured_outputs, StructuredOutputsParams):
            raise SamplingParamsError("structured_outputs", "structured_outputs must be a "
                                      "StructuredOutputsParams.")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        if self.stop_token_ids is not None and not isinstance(self.stop_token_ids, (list, tuple)):
            raise SamplingParamsError("stop_token_ids",
                                      "stop_token_ids must be a list of integers.")
        self.stop_token_ids = list(dict.fromkeys(self.stop_token_ids or []))  # dedup, keep order
        if self.top_k == -1:
            self.top_k = 0
        if self.seed == -1:
            self.seed = None
        self.logit_bias = self._convert_logit_bias(self.logit_bias)
        self._validate()

    @staticmethod
    def _convert_logit_bias(bias) -> dict[int, float] | None:
        if bias is None:
            return None
        if not isinstance(bias, dict):
            raise SamplingParamsError("logit_bias", "logit_bias must be an object mapping token "
                                      "ids to bias values.")
        out = {}
        for token, value in bias.items():
            try:
                if isinstance(token, (bool, float)):
                    raise ValueError
                tid = int(token)
            except (TypeError, ValueError):
                raise SamplingParamsError(
                    "logit_bias", f"logit_bias contains a key that is not an integer token id: "
                    f"{token!r}.") from None
            if not _is_number(value):
                raise SamplingParamsError(
                    "logit_bias", f"logit_bias values must be numbers, got {value!r} for token "
                    f"{tid}.")
            out[tid] = float(value)
        return out

    def _validate(self):
        def bad(param, msg):
            raise SamplingParamsError(param, msg)

        for name in ("n", "top_k", "min_tokens"):
            if not _is_int(getattr(self, name)):
                bad(name, f"{name} must be an integer, got {type(getattr(self, name)).__name__}.")
        for name in ("max_tokens", "seed", "logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not _is_int(value):
                bad(name, f"{name} must be an integer, got {type(value).__name__}.")
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            value = getattr(self, name)
            if not _is_number(value):
                bad(name, f"{name} must be a number, got {type(value).__name__}.")
            if not math.isfinite(value):
                bad(name, f"{name} must be a finite number, got {value}.")

        if self.n < 1:
            bad("n", f"n must be at least 1, got {self.n}.")
        if self.n > MAX_N:
            bad("n", f"n can be at most {MAX_N}, got {self.n}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            bad("max_tokens", f"max_tokens must be at least 1, got {self.max_tokens}.")
        if not 0.0 <= self.temperature <= 2.0:
            bad("temperature", f"temperature must be in [0, 2], got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < 0:
            bad("top_k", f"top_k must be 0 or -1 (disable), or at least 1, got {self.top_k}.")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", f"min_p must be in [0, 1], got {self.min_p}.")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad("presence_penalty", f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad("frequency_penalty", f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.")
        if not self.repetition_penalty > 0.0:
            bad("repetition_penalty", "repetition_penalty must be greater than zero, got "
                f"{self.repetition_penalty}.")
        if self.min_tokens < 0:
            bad("min_tokens", f"min_tokens must be greater than or equal to 0, got {self.min_tokens}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, "
                f"got {self.min_tokens}.")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            bad("logprobs", f"logprobs must be in [0, 20], got {self.logprobs}.")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= 20:
            bad("prompt_logprobs", f"prompt_logprobs must be in [0, 20], got {self.prompt_logprobs}.")
        if self.seed is not None and not _INT64_MIN <= self.seed <= _INT64_MAX:
            bad("seed", f"seed must be a 64-bit signed integer, got {self.seed}.")
        # vLLM rejects n > 1 with greedy sampling ("n must be 1 when using greedy sampling");
        # jaxserve allows it (the n copies are identical), which the server tests rely on.

        if any(not isinstance(s, str) for s in self.stop):
            bad("stop", "stop must be a string or a list of strings.")
        if any(not s for s in self.stop):
            bad("stop", "stop cannot contain an empty string.")
        if len(self.stop) > MAX_STOP_STRINGS:
            bad("stop", f"stop can hold at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}.")
        if any(len(s) > MAX_STOP_STRING_CHARS for s in self.stop):
            bad("stop", f"stop strings can have at most {MAX_STOP_STRING_CHARS} characters, got "
                f"{max(len(s) for s in self.stop)}.")
        if any(not _is_int(t) for t in self.stop_token_ids):
            bad("stop_token_ids", f"stop_token_ids must contain only integers, got "
                f"{self.stop_token_ids}.")
        if any(t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids",
                f"stop_token_ids must be non-negative, got {self.stop_token_ids}.")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            bad("stop_token_ids", f"stop_token_ids can hold at most {MAX_STOP_TOKEN_IDS} ids, got "
                f"{len(self.stop_token_ids)}.")

        if self.logit_bias:
            if len(self.logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
                bad("logit_bias", f"logit_bias can hold at most {MAX_LOGIT_BIAS_ENTRIES} entries, "
                    f"got {len(self.logit_bias)}.")
            for tid, value in self.logit_bias.items():
                if tid < 0:
                    bad("logit_bias", f"logit_bias token ids must be non-negative, got {tid}.")
                if not -100.0 <= value <= 100.0:  # also rejects NaN
                    bad("logit_bias", f"logit_bias values must be in [-100, 100], got {value} "
                        f"for token {tid}.")

    @property
    def uses_penalties(self) -> bool:
        """Penalties read the whole output so far, so their steps wait for every token."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    def verify_token_ids(self, vocab_size: int) -> None:
        """Check the token ids this request names against the model's vocabulary; the engine
        calls it once at admission, where the vocabulary size is known."""
        if self.logit_bias:
            bad = sorted(t for t in self.logit_bias if t >= vocab_size)
            if bad:
                raise SamplingParamsError(
                    "logit_bias", f"token_id(s) {bad} in logit_bias contain out-of-vocab token "
                    f"ids. Vocabulary size: {vocab_size}")
        bad = [t for t in self.stop_token_ids if t >= vocab_size]
        if bad:
            raise SamplingParamsError(
                "stop_token_ids", f"token_id(s) {bad} in stop_token_ids contain out-of-vocab "
                f"token ids. Vocabulary size: {vocab_size}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
