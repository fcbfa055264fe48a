"""The endpoint's request and response models (the OpenAPI schema at /openapi.json)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Extra = Literal["embedding", "prompt_embedding", "gate_mean", "ifd", "n_loss_tokens"]

_EXAMPLES = [
    {
        "samples": [
            {
                "id": "ex-1",
                "messages": [
                    {"role": "user", "content": "Reverse the word: gate"},
                    {"role": "assistant", "content": "etag"},
                ],
            },
            {"instruction": "Uppercase: ray", "input": "", "output": "RAY"},
            {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
        ],
        "return": ["ifd"],
    }
]


class ScoreRequest(BaseModel):
    """Samples to score, each in any accepted row shape: messages, ShareGPT or Alpaca."""

    model_config = ConfigDict(
        extra="forbid", populate_by_name=True, json_schema_extra={"examples": _EXAMPLES}
    )

    samples: list[dict[str, Any]] = Field(
        min_length=1,
        description="Rows as in a corpus file ({messages}, {conversations} or "
        "{instruction, input, output}; optional id and source). At most max_samples "
        "(GET /v1/info) per request, else 413; a sample over max_chars characters "
        "(serialized as JSON) gives 422.",
    )
    return_: list[Extra] = Field(
        default_factory=list,
        alias="return",
        description="Extra per-sample fields to return.",
    )
    commit: bool = Field(
        False,
        description="/v1/select only: append the selected samples to the selection log "
        "(idempotent by sample_id; copies of pool or logged samples are refused).",
    )


class RowError(BaseModel):
    """Why one sample was not scored (the batch job's reject reasons)."""

    reason: str = Field(description="e.g. missing_assistant, unknown_shape, ...")
    detail: str


class SampleScore(BaseModel):
    """One sample's scores, as the batch job's parquet row has them; or its error."""

    index: int = Field(description="Position of the sample in the request.")
    sample_id: str | None = Field(None, description="Given id, else a content hash.")
    source: str | None = None
    n_tokens: int | None = None
    truncated: bool | None = None
    nll: float | None = Field(None, description="Mean nll over the scored tokens.")
    gate: list[float] | None = Field(None, description="Per layer ppl-weighted gate s_l.")
    q: float | None = Field(None, description="Quality score against the loaded reference.")
    gate_mean: list[float] | None = None
    embedding: list[float] | None = None
    prompt_embedding: list[float] | None = Field(
        None, description="The prompt alone (calibration: cluster groups rows by it)."
    )
    ifd: float | None = None
    n_loss_tokens: int | None = None
    error: RowError | None = None


class SampleDecision(SampleScore):
    """A sample's scores plus the decision the last selection would have made for it."""

    score: float | None = Field(None, description="The selection method's score.")
    cluster: int | None = Field(None, description="Nearest diversity cluster (null: none).")
    selected: bool | None = Field(None, description="score >= the cluster's cutoff.")
    margin: float | None = Field(None, description="score - cutoff; negative: not selected.")
    commit_status: str | None = Field(
        None,
        description="With commit: committed, already_committed, duplicate_text, "
        "near_duplicate, budget_exhausted or not_selected.",
    )
    kept_id: str | None = Field(
        None, description="The pool or logged sample this one copies (duplicate statuses)."
    )


class ScoreResponse(BaseModel):
    results: list[SampleScore]
    n_scored: int
    n_errors: int


class SelectResponse(BaseModel):
    results: list[SampleDecision]
    n_scored: int
    n_errors: int
    n_selected: int
    n_committed: int | None = None
    method: str


class ErrorBody(BaseModel):
    """Every non-2xx reply: a stable code and a message for people."""

    error: str
    message: str
    detail: list[dict[str, Any]] | None = None


ERROR_RESPONSES = {
    code: {"model": ErrorBody, "description": desc}
    for code, desc in {
        400: "Malformed JSON",
        401: "Missing or wrong API key",
        413: "Too many samples, or body too large",
        422: "Invalid body, empty samples list or an over-long sample",
        409: "No reference loaded (score_only)",
        500: "Unexpected server error (no details are exposed)",
    }.items()
}
