"""A stand-in for Hugging Face's `spaces` package that reproduces ZeroGPU's process boundary on a CPU.

On ZeroGPU every `@spaces.GPU` call runs in another (forked) process: its arguments are pickled
across, and so is its return value or every item it yields; what it changes in place stays in
that process; a model or a CUDA tensor cannot cross. This module does exactly that, more strictly
than the real one (a fresh fork per call, so nothing cached in a worker survives):

- each call forks a child; the child unpickles the arguments (it never touches the parent's
  objects), calls the function, and sends back each result pickled;
- a `torch.nn.Module` or a non-CPU tensor in the arguments or a result is refused;
- `duration` (seconds, or a callable taking the function's arguments) is evaluated and checked as
  the real package does, and written to $ZEROGPU_STUB_LOG (one JSON line per call) if set.

Put `tests/zerogpu` first on PYTHONPATH to use it: `PYTHONPATH=tests/zerogpu python app.py`.
"""

import functools
import inspect
import io
import json
import multiprocessing
import os
import pickle
import time
import traceback
from datetime import timedelta

import torch

_fork = multiprocessing.get_context("fork")


class _CrossingPickler(pickle.Pickler):
    def reducer_override(self, obj):
        if isinstance(obj, torch.nn.Module):
            raise pickle.PicklingError(f"ZeroGPU cannot send a {type(obj).__name__} (torch.nn.Module) across processes")
        if isinstance(obj, torch.Tensor) and obj.device.type != "cpu":
            raise pickle.PicklingError(f"ZeroGPU cannot send a {obj.device.type} tensor across processes")
        return NotImplemented


def _dumps(obj) -> bytes:
    buf = io.BytesIO()
    _CrossingPickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()


def _seconds(duration, args, kwargs) -> float:
    value = duration(*args, **kwargs) if callable(duration) else duration
    if value is None:
        return 60.0
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise TypeError(f"a ZeroGPU duration is a positive number of seconds, got {value!r}")
    return float(value)


def _child(task, payload: bytes, conn, generator: bool):
    torch.set_num_threads(1)  # PyTorch's CPU thread pool does not survive fork
    try:
        args, kwargs = pickle.loads(payload)
        if generator:
            for item in task(*args, **kwargs):
                conn.send_bytes(_dumps(("item", item)))
            conn.send_bytes(_dumps(("end", None)))
        else:
            conn.send_bytes(_dumps(("item", task(*args, **kwargs))))
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
        conn.send_bytes(pickle.dumps(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")))
    finally:
        conn.close()
        os._exit(0)


def _start(task, args, kwargs, duration, generator):
    seconds = _seconds(duration, args, kwargs)
    payload = _dumps((args, kwargs))  # refuses a model before any work
    if os.environ.get("ZEROGPU_STUB_LOG"):
        with open(os.environ["ZEROGPU_STUB_LOG"], "a") as f:
            f.write(json.dumps({"function": task.__name__, "duration": seconds, "time": time.time(),
                                "argument_bytes": len(payload)}) + "\n")
    parent, child = _fork.Pipe(duplex=False)
    process = _fork.Process(target=_child, args=(task, payload, child, generator), daemon=True)
    process.start()
    child.close()
    return process, parent


def _receive(process, conn):
    try:
        kind, value = pickle.loads(conn.recv_bytes())
    except EOFError:
        process.join()
        raise RuntimeError(f"ZeroGPU worker died (exit code {process.exitcode})") from None
    if kind == "error":
        raise RuntimeError(f"ZeroGPU worker error: {value}")
    return kind, value


def GPU(task=None, *, duration=None, size=None, **kwargs):
    if task is None:
        return functools.partial(GPU, duration=duration, size=size)

    if inspect.isgeneratorfunction(task):
        @functools.wraps(task)
        def generator_call(*args, **kwargs):
            process, conn = _start(task, args, kwargs, duration, generator=True)
            try:
                while True:
                    kind, value = _receive(process, conn)
                    if kind == "end":
                        return
                    yield value
            finally:  # the caller stopped reading (or the worker finished): no worker outlives its call
                conn.close()
                if process.is_alive():
                    process.kill()
                process.join()
        return generator_call

    @functools.wraps(task)
    def call(*args, **kwargs):
        process, conn = _start(task, args, kwargs, duration, generator=False)
        try:
            return _receive(process, conn)[1]
        finally:
            conn.close()
            process.join()
    return call
