"""The shared contract of the API and the worker: settings, Redis state and claims, job envelopes, notes.

Both `adapter/` (the HTTP edge) and `worker/` (queue, model, EHR I/O) import this package; it imports neither.
"""
