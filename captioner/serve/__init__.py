"""HTTP serving of a trained captioner (LitServe): ``captioner-serve --checkpoint PATH``.

- ``model.py``: the model handle the server calls (a batch of PIL images + decode settings), so
  another runtime (ONNX) can take the place of the PyTorch one;
- ``schemas.py``: request options and response bodies (the OpenAPI schema);
- ``api.py``: the LitServe API: request parsing and checks, batched captioning;
- ``guard.py``: body size and framing checks before a request reaches the model's queue;
- ``app.py``: the LitServer with the web page, ``/health``, ``/info`` and the OpenAPI document.
"""
