"""The LitServe API of ``POST /caption``: requests are parsed and checked in the inference worker
(``decode_request``), then every valid request of a batch LitServe collected is captioned in one
batched search per distinct decode setting.

A bad request never fails the batch it was collected into: LitServe answers a whole batch with
the error when ``decode_request`` or ``encode_response`` raises, so a bad request becomes a
``Rejected`` value that skips the model and is answered on its own with a 4xx and one line."""

from __future__ import annotations

import base64
import binascii
import io
from collections import defaultdict
from dataclasses import dataclass
from queue import Empty

import litserve as ls
from litserve.loops import BatchedLoop
from litserve.loops.base import collate_requests
from pydantic import ValidationError
from starlette.responses import JSONResponse

from captioner.serve.model import DecodeSettings
from captioner.serve.schemas import CaptionOptions


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; each limit bounds memory or time (CLI flags)."""

    max_body_bytes: int = 20 << 20
    max_pixels: int = 40_000_000
    max_frames: int = 100
    max_beam_size: int = 10
    max_length: int = 50


@dataclass(frozen=True)
class Rejected:
    status: int
    detail: str


@dataclass
class Job:
    image: object  # PIL image, RGB
    settings: DecodeSettings


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(x) for x in err["loc"]) or "body"
    if err["type"] == "extra_forbidden":
        return f"unknown parameter {where!r} (known: image, {', '.join(CaptionOptions.model_fields)})"
    return f"{where}: {err['msg']}"


def parse_request(payload, defaults: dict, limits: Limits) -> tuple[bytes, DecodeSettings, str]:
    """(image bytes, settings, name for errors) of a JSON object or a multipart form; raises
    ``ValueError`` with one line for anything wrong but the image itself."""
    if isinstance(payload, dict):  # JSON
        fields, name = dict(payload), "image"
        if "image" not in fields:
            raise ValueError("no 'image' key: send {\"image\": \"<base64>\", ...} as JSON, or a "
                             "multipart form with an 'image' file field")
        data = fields.pop("image")
        if not isinstance(data, str):
            raise ValueError("'image' must be a base64 string")
        if data.startswith("data:") and "," in data:
            data = data.split(",", 1)[1]
        try:
            data = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("'image' is not valid base64") from None
    else:  # starlette FormData
        items = list(payload.multi_items())
        files = [(k, v) for k, v in items if not isinstance(v, str)]
        if [k for k, _ in files] != ["image"]:
            got = ", ".join(repr(k) for k, _ in files) or "none"
            raise ValueError(f"expected one file field named 'image' (got file fields: {got})")
        fields = {k: v for k, v in items if isinstance(v, str)}
        if len(fields) != len([k for k, v in items if isinstance(v, str)]):
            raise ValueError("a parameter appears more than once")
        upload = files[0][1]
        name = f"image {upload.filename!r}" if upload.filename else "image"
        upload.file.seek(0)
        data = upload.file.read()
    try:
        options = CaptionOptions(**fields)
    except ValidationError as e:
        raise ValueError(_first_error(e)) from None
    beam = defaults["beam_size"] if options.beam_size is None else options.beam_size
    length = defaults["max_length"] if options.max_length is None else options.max_length
    if not 1 <= beam <= limits.max_beam_size:
        raise ValueError(f"beam_size={beam}: must be from 1 to {limits.max_beam_size}")
    if not 1 <= length <= limits.max_length:
        raise ValueError(f"max_length={length}: must be from 1 to {limits.max_length}")
    if not 1 <= options.alternatives <= beam:
        raise ValueError(f"alternatives={options.alternatives}: must be from 1 to beam_size ({beam})")
    if not data:
        raise ValueError(f"{name}: empty")
    return data, DecodeSettings(beam, length, options.alternatives, options.attention), name


class _HeldFirst:
    """A request queue whose first item was already taken: hands it out first."""

    def __init__(self, first, queue):
        self.first, self.queue = first, queue

    def get(self, block=True, timeout=None):
        if self.first is not None:
            first, self.first = self.first, None
            return first
        return self.queue.get(block, timeout)

    def get_nowait(self):
        return self.get(False)


class WaitingBatchedLoop(BatchedLoop):
    """LitServe's batched loop, except while idle: LitServe's asks its (manager-process) queue
    for a request every millisecond even when none comes, a fifth of a core on this 2-core
    machine; this one blocks until the first request of a batch arrives, then collects the batch
    with LitServe's own ``collate_requests`` (same ``max_batch_size`` and ``batch_timeout``)."""

    def get_batch_requests(self, lit_api, request_queue, transport):
        try:
            first = request_queue.get(timeout=1.0)
        except Empty:
            return [], []
        return collate_requests(self, lit_api, _HeldFirst(first, request_queue), transport)


class CaptionAPI(ls.LitAPI):
    """Pickled into LitServe's inference worker process, where ``setup`` loads the model."""

    def __init__(self, checkpoint: str | list[str], limits: Limits, max_batch_size: int = 16,
                 batch_timeout: float = 0.01, threads: int | None = None,
                 model_loader=None):
        loop = WaitingBatchedLoop() if max_batch_size > 1 and batch_timeout > 0 else "auto"
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout,
                         api_path="/caption", loop=loop)
        # a path, or a list of them served as one ensemble
        self.checkpoint = ([str(c) for c in checkpoint] if isinstance(checkpoint, (list, tuple))
                           else str(checkpoint))
        self.limits, self.threads = limits, threads
        self.model_loader = model_loader  # a picklable callable(path, device) -> CaptionModel

    def setup(self, device):
        from captioner.serve.model import load_caption_model
        from captioner.utils.cpu import keep_freed_memory
        from captioner.utils.hardware import set_threads

        keep_freed_memory()
        set_threads(self.threads)
        self.model = (self.model_loader or load_caption_model)(self.checkpoint, device)
        self.defaults = self.model.info["decode"]

    def decode_request(self, request):
        from captioner.data.images import ImageLoadError, load_image

        try:
            data, settings, name = parse_request(request, self.defaults, self.limits)
        except ValueError as e:
            return Rejected(400, str(e))
        try:
            image = load_image(io.BytesIO(data), self.limits.max_pixels, name=name,
                               max_frames=self.limits.max_frames, limit_name="--max-pixels")
        except ImageLoadError as e:
            return Rejected(422, str(e))
        return Job(image, settings)

    def predict(self, x):
        single = not isinstance(x, list)  # batching off: LitServe passes one request
        jobs = [x] if single else x
        out: list = [j if isinstance(j, Rejected) else None for j in jobs]
        groups = defaultdict(list)  # one batched search per distinct setting
        for i, job in enumerate(jobs):
            if isinstance(job, Job):
                groups[job.settings].append(i)
        for settings, index in groups.items():
            captions = self.model([jobs[i].image for i in index], settings)
            for i, caption in zip(index, captions):
                size = {"width": jobs[i].image.width, "height": jobs[i].image.height}
                out[i] = (caption, settings, size, len(index))
        return out[0] if single else out

    def encode_response(self, output):
        if isinstance(output, Rejected):  # answered alone; the rest of its batch goes on
            return JSONResponse({"detail": output.detail}, status_code=output.status)
        caption, settings, size, batch = output
        body = {k: caption[k] for k in ("caption", "words", "score", "alternatives")}
        if settings.attention:
            body["attention"] = {"grid": self.model.info["grid"], "words": caption["words"],
                                 "weights": caption["attention"]}
        body["settings"] = {"beam_size": settings.beam_size, "max_length": settings.max_length,
                            "alternatives": settings.alternatives}
        body["image"] = size
        body["batch_size"] = batch
        return body
