"""Request options and response bodies of ``POST /caption``: checked with pydantic and published
in the OpenAPI schema (``/openapi.json``, ``/docs``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class CaptionOptions(BaseModel):
    """Optional decode settings of one request; absent: the checkpoint's. Multipart form fields
    arrive as text, so numbers and booleans are read from strings too ("3", "true")."""

    model_config = ConfigDict(extra="forbid")

    beam_size: int | None = Field(None, description="1 = greedy; default: the checkpoint's")
    max_length: int | None = Field(None, description="most words; default: the checkpoint's")
    alternatives: int = Field(1, description="how many of the beam's best captions to return "
                                             "(at most beam_size)")
    attention: bool = Field(False, description="include the per-word attention grid")


class CaptionJSON(CaptionOptions):
    """The JSON form of a request (``Content-Type: application/json``)."""

    image: str = Field(..., description="the photo's bytes, base64 (a data: URL prefix is allowed)")


class CaptionUpload(CaptionOptions):
    """The multipart form of a request (``Content-Type: multipart/form-data``)."""

    image: bytes = Field(..., description="the photo file", json_schema_extra={"format": "binary"})


class Alternative(BaseModel):
    caption: str
    score: float | None = Field(..., description="summed log-prob / length penalty (higher is better)")


class AttentionGrid(BaseModel):
    grid: list[int] = Field(..., description="[rows, columns] of the encoder's regions")
    words: list[str]
    weights: list[list[float]] = Field(..., description="one row-major grid of weights per word")


class CaptionResponse(BaseModel):
    caption: str
    words: list[str]
    score: float | None
    alternatives: list[Alternative] = Field(..., description="best first; the first is `caption`")
    attention: AttentionGrid | None = None
    settings: dict = Field(..., description="the decode settings used")
    image: dict = Field(..., description="width and height of the photo as received")
    batch_size: int = Field(..., description="how many requests shared this batched search")


class ErrorResponse(BaseModel):
    detail: str = Field(..., description="one line saying what was wrong")
