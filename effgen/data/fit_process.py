"""The preprocessing fit in a child process, started before pass 1, so that importing
scikit-learn (and the scipy.stats and pandas it pulls in: over a second of CPU) runs on
another core while pass 1 reads the input, instead of between the two passes. The
child is a fresh process, so tX.pkl's bytes never depend on what the caller did before
(a pickle of scikit-learn objects shares equal strings or not, depending on the
process' past).

`FitProcess.start()` launches `python -m effgen.data.fit_process`, which imports the fit
and waits; `fit(rows, seed, scratch)` hands it the fit sample (an .npy file in the
scratch directory) and gets back the pickled ColumnTransformer (the bytes `pickle.dumps`
gives in this process for the same fit) and its quantile tables, so that this process
never imports scikit-learn (`submit` then `result`: the same in two steps, so that the
caller works meanwhile). A child that dies or fails raises PreprocessingError with
its message; closing (or this process ending: the child reads EOF) stops it.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from effgen.errors import PreprocessingError


class FitProcess:
    def __init__(self, proc, stderr):
        self._proc, self._stderr = proc, stderr

    @classmethod
    def start(cls) -> "FitProcess":
        import effgen

        # The child imports this process' effgen, wherever it was found.
        env = dict(os.environ)
        root = str(Path(effgen.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        stderr = tempfile.TemporaryFile()
        proc = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
        return cls(proc, stderr)

    def fit(self, rows: np.ndarray, seed: int, scratch: Path):
        """(pickled fitted ColumnTransformer, effgen.data.preprocess.Quantiles) for the raw
        feature rows `rows` (n, 12), as fit_preprocessing(rows, seed) in this process."""
        self.submit(rows, seed, scratch)
        return self.result()

    def submit(self, rows: np.ndarray, seed: int, scratch: Path):
        """Hand the child the fit of `rows` (see fit) without waiting for it: result()
        then waits for its answer."""
        scratch = Path(scratch)
        sample, self._out = scratch / "fit-sample.npy", scratch / "fit"
        np.save(sample, rows, allow_pickle=False)
        self._files = [sample, self._out.with_suffix(".pkl"), self._out.with_suffix(".npz")]
        request = {"sample": str(sample), "seed": int(seed), "out": str(self._out)}
        try:
            self._proc.stdin.write(json.dumps(request) + "\n")
            self._proc.stdin.flush()
        except OSError:  # the child is gone: result() says why
            pass

    def result(self):
        """What fit returns, for the rows handed over by submit."""
        from effgen.data.preprocess import Quantiles

        out = self._out
        try:
            reply = self._proc.stdout.readline().strip()
        except (OSError, ValueError):  # the child is gone (or closed): its stderr says why
            reply = ""
        if reply != "ok":
            why = reply or self._tail()
            self.close()
            raise PreprocessingError(f"fitting the preprocessing failed in its child process "
                                     f"(exit status {self._proc.returncode}): {why}")
        self._relay_stderr()
        blob = (out.with_suffix(".pkl")).read_bytes()
        with np.load(out.with_suffix(".npz"), allow_pickle=False) as tables:
            quantiles = Quantiles(tables["quantiles"], tables["references"])
        for f in self._files:
            f.unlink()
        return blob, quantiles

    def close(self):
        """Stop the child (it holds nothing but its imports: killed, not waited for)."""
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        for stream in (self._proc.stdin, self._proc.stdout, self._stderr):
            stream.close()

    def _tail(self) -> str:
        self._proc.wait()
        self._stderr.seek(0)
        lines = self._stderr.read().decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else "no message"

    def _relay_stderr(self):
        """The child's warnings (e.g. scikit-learn's about n_quantiles) on our stderr."""
        self._stderr.seek(0)
        text = self._stderr.read().decode(errors="replace")
        self._stderr.seek(0)
        self._stderr.truncate()
        if text:
            sys.stderr.write(text)


def _serve():
    """The child: import the fit (the slow part), then answer one request from stdin."""
    import gc
    import pickle

    # A short-lived process that makes no garbage cycles worth collecting: without the
    # collector, importing scikit-learn's 1,600 modules costs ~10% less CPU.
    gc.disable()

    # The reason for this process: scikit-learn imported now, while the parent reads.
    import sklearn.compose  # noqa: F401
    import sklearn.preprocessing  # noqa: F401

    from effgen.data.preprocess import Quantiles, fit_preprocessing

    line = sys.stdin.readline()
    if not line:
        return 0
    request = json.loads(line)
    try:
        rows = np.load(request["sample"], allow_pickle=False)
        ct = fit_preprocessing(rows, request["seed"])
        blob = pickle.dumps(ct, protocol=pickle.HIGHEST_PROTOCOL)
        tables = Quantiles.of(ct)
        out = Path(request["out"])
        out.with_suffix(".pkl").write_bytes(blob)
        np.savez(out.with_suffix(".npz"), quantiles=tables.quantiles_, references=tables.references_)
    except Exception as err:  # reported to the parent, which raises
        print(f"{type(err).__name__}: {err}".replace("\n", " "), flush=True)
        return 1
    print("ok", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(_serve())
