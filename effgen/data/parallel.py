"""Running preprocess's tasks: in this process, one after the other, or in parallel with dask.

A `Runner` builds the same task graph either way. With one worker each task runs when
it is declared (no dask imported: the single-process path); with more, tasks become
`dask.delayed` calls computed by dask's local scheduler ("threads": numpy, uproot and
Arrow release the GIL in the heavy loops; or "processes"). The graph, and so the
result, does not depend on the worker count: callers merge task results in the order
they declared them.
"""

from contextlib import nullcontext

SCHEDULERS = ("threads", "processes")


class Runner:
    """task(fn, *args, nout=None) declares a call; compute(*objs) returns the values.

    on_result(name, value), if given, is called in this thread after each task ends,
    with the task function's name (for progress bars)."""

    def __init__(self, workers: int = 1, scheduler: str = "threads", on_result=None):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
        self.workers, self.scheduler, self.on_result = workers, scheduler, on_result
        self._names = {}  # dask key -> task function name

    @property
    def parallel(self) -> bool:
        return self.workers > 1

    def task(self, fn, *args, nout=None):
        if not self.parallel:
            value = fn(*args)
            if self.on_result is not None:
                self.on_result(fn.__name__, value)
            return value
        import dask

        value = dask.delayed(fn, pure=False, nout=nout)(*args)
        self._names[value.key] = fn.__name__
        return value

    def compute(self, *objs) -> tuple:
        if not self.parallel:
            return objs
        import dask
        from dask.callbacks import Callback

        progress = nullcontext()
        if self.on_result is not None:
            def posttask(key, value, dsk, state, worker_id):
                if key in self._names:
                    self.on_result(self._names[key], value)
            progress = Callback(posttask=posttask)
        with progress:
            return dask.compute(*objs, scheduler=self.scheduler, num_workers=self.workers)
