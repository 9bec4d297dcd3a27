"""A stand-in for Hugging Face's `spaces` package that reproduces ZeroGPU's process boundary on a CPU.

What the real package (0.51, `spaces/zero/wrappers.py`) does on ZeroGPU: a `@spaces.GPU` call runs in
a worker process forked from the app; an idle worker is reused for the next call of the same function;
arguments and results (every item a generator yields) go through a fork-context multiprocessing queue,
whose pickler carries torch's reductions, so CPU tensors are shared through shared memory (an in-place
change in the worker is seen by the app) and everything else is copied; a generator the caller stops
reading is closed after its next item; an exception that is not a `gr.Error` reaches the app as
`gr.Error("<exception class name>", title="ZeroGPU worker error")`, a `gr.Error` as itself; `duration`
is seconds, a timedelta, or a callable of the call's arguments. Off ZeroGPU (no SPACES_ZERO_GPU) the
real `spaces.GPU` returns the function unchanged.

Two modes, chosen with ZEROGPU_STUB_MODE:
- "strict" (default): a fresh fork per call, arguments and results pickled by value (nothing shared,
  nothing cached in a worker survives): catches state that would not cross, and code that relies on a
  worker's leftovers;
- "reuse": as the real package, one worker per decorated function reused while idle, the queue and
  torch's shared-memory pickling: shows the KV reuse a real worker gives.
In both, a `torch.nn.Module` or a non-CPU tensor in the arguments or a result is refused, and each
call is written to $ZEROGPU_STUB_LOG (one JSON line) if set.

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
MODE = os.environ.get("ZEROGPU_STUB_MODE", "strict")
if MODE not in ("strict", "reuse"):
    raise ValueError(f"ZEROGPU_STUB_MODE is 'strict' or 'reuse', not {MODE!r}")


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


def _error_result(e: BaseException):
    """What the real package sends back for an exception: the gr.Error itself, or its class name."""
    import gradio as gr
    if isinstance(e, gr.Error):
        return ("error", e)
    return ("error", gr.Error(type(e).__name__, title="ZeroGPU worker error", print_exception=False),
            traceback.format_exc())


def _raise(value):
    error = value[0]
    if len(value) > 1:  # the real package prints the worker's traceback in the app's log
        print(value[1], flush=True)
    raise error


def _log(task, seconds, payload):
    if os.environ.get("ZEROGPU_STUB_LOG"):
        with open(os.environ["ZEROGPU_STUB_LOG"], "a") as f:
            f.write(json.dumps({"function": task.__name__, "duration": seconds, "time": time.time(),
                                "argument_bytes": len(payload), "mode": MODE}) + "\n")


# ---- strict: a fresh fork per call, pickled by value ----------------------------------------------
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
        kind, *value = _error_result(e)
        conn.send_bytes(pickle.dumps((kind, tuple(value))))
    finally:
        conn.close()
        os._exit(0)


def _start(task, args, kwargs, seconds, generator):
    payload = _dumps((args, kwargs))  # refuses a model before any work
    _log(task, seconds, payload)
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
        _raise(value)
    return kind, value


def _strict(task, duration):
    if inspect.isgeneratorfunction(task):
        @functools.wraps(task)
        def generator_call(*args, **kwargs):
            process, conn = _start(task, args, kwargs, _seconds(duration, args, kwargs), generator=True)
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
        process, conn = _start(task, args, kwargs, _seconds(duration, args, kwargs), generator=False)
        try:
            return _receive(process, conn)[1]
        finally:
            conn.close()
            process.join()
    return call


# ---- reuse: one worker per function, kept while idle, shared CPU tensors -----------------------------
class _Worker:
    """A forked process that serves calls of one function, like the real package's Worker."""

    def __init__(self, task, generator: bool):
        self.calls, self.results = _fork.SimpleQueue(), _fork.SimpleQueue()  # torch's reductions: shared tensors
        self.stop = _fork.Event()
        self.process = _fork.Process(target=self.serve, args=(task, generator), daemon=True)
        self.process.start()

    def serve(self, task, generator):
        torch.set_num_threads(1)
        while True:
            args, kwargs = self.calls.get()
            self.stop.clear()
            try:
                if generator:
                    for item in task(*args, **kwargs):
                        self.send(item)
                        if self.stop.is_set():  # the caller stopped reading: closed after its next item
                            break
                    self.results.put(("end", None))
                else:
                    self.send(task(*args, **kwargs))
            except BaseException as e:  # noqa: BLE001
                kind, *value = _error_result(e)
                self.results.put((kind, tuple(value)))

    def send(self, item):
        _dumps(item)  # refuses a model or a device tensor, as in strict mode
        self.results.put(("item", item))

    def receive(self):
        kind, value = self.results.get()
        if kind == "error":
            _raise(value)
        return kind, value


def _reuse(task, duration):
    generator = inspect.isgeneratorfunction(task)
    idle = []

    def checkout(args, kwargs):
        _log(task, _seconds(duration, args, kwargs), _dumps((args, kwargs)))  # refuses a model
        worker = next((w for w in idle if w.process.is_alive()), None)
        if worker is not None:
            idle.remove(worker)
        else:
            worker = _Worker(task, generator)
        worker.calls.put((args, kwargs))
        return worker

    if generator:
        @functools.wraps(task)
        def generator_call(*args, **kwargs):
            worker = checkout(args, kwargs)
            ended = False
            try:
                while True:
                    try:
                        kind, value = worker.receive()
                    except BaseException:  # its error ended the call
                        ended = True
                        raise
                    if kind == "end":
                        ended = True
                        return
                    yield value
            except GeneratorExit:
                worker.stop.set()
                raise
            finally:
                while not ended and worker.process.is_alive():  # let it finish its item, then reuse it
                    try:
                        ended = worker.receive()[0] == "end"
                    except Exception:  # noqa: BLE001 - it failed as it stopped: still reusable
                        ended = True
                idle.append(worker)
        return generator_call

    @functools.wraps(task)
    def call(*args, **kwargs):
        worker = checkout(args, kwargs)
        try:
            return worker.receive()[1]
        finally:
            idle.append(worker)
    return call


def GPU(task=None, *, duration=None, size=None, **kwargs):
    if task is None:
        return functools.partial(GPU, duration=duration, size=size)
    return (_reuse if MODE == "reuse" else _strict)(task, duration)
