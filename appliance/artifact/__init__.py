"""The specialist artifact: the contract between the factory that writes a specialist and the
serving, routing and benchmark code that reads it.

It holds the typed manifest (:mod:`.manifest`), the head file (:mod:`.head`) and the one
definition of the serving maths (:mod:`.maths`, and :mod:`.torch_maths` for PyTorch callers).
It depends on numpy and pydantic only (torch in :mod:`.torch_maths`), so the server can read
an artifact without importing the factory, and the factory can write one without the server.
"""
