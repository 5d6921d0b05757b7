"""Input files for `effgen preprocess`: ROOT tuples read with uproot, or feather / parquet
files holding the same branches, streamed in chunks.

`expand_inputs` turns paths, globs and space-separated lists (the notebook's INPUT_FILES)
into files; `open_inputs` opens each one, checks that it holds the tree and the branches
the derivation needs (listing what it holds when not) and that every file offers the same
optional branches; `Source.chunks` then yields dicts of numpy arrays of at most
`step_size` entries. Every problem is a DataError naming the file.
"""

import glob
from pathlib import Path

import numpy as np

from effgen.data.derive import OPTIONAL, REQUIRED, TREE
from effgen.errors import DataError

MAGIC = {b"root": "root", b"ARROW1": "feather", b"PAR1": "parquet"}
DEFAULT_STEP = 1 << 19  # 524,288: two of synth's baskets


def expand_inputs(specs) -> list:
    """Files named by `specs`: each item a path, a glob, or several of them separated by
    whitespace (the notebook's INPUT_FILES). Order is kept (globs sorted); a file named twice is refused, as is a glob
    or path that matches nothing."""
    files = []
    for spec in specs:
        # A path that exists is taken whole (it may hold spaces); else a whitespace list.
        items = [str(spec)] if Path(str(spec)).exists() else str(spec).split()
        for item in items:
            if glob.has_magic(item):
                matches = sorted(glob.glob(item))
                if not matches:
                    raise DataError(f"{item}: matches no file")
                files += [Path(m) for m in matches]
            else:
                files.append(Path(item))
    if not files:
        raise DataError("no input files given")
    seen = {}
    for f in files:
        key = f.resolve()
        if key in seen:
            raise DataError(f"{f}: named twice in the inputs (as {seen[key]} too)")
        seen[key] = f
    return files


def sniff(path: Path) -> str:
    """'root', 'feather' or 'parquet' from the file's first bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except FileNotFoundError:
        raise DataError(f"{path}: input file is missing") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read the input file: {err}") from err
    for magic, kind in MAGIC.items():
        if head.startswith(magic):
            return kind
    raise DataError(f"{path}: not a ROOT, feather or parquet file (starts with {head!r})")


class Source:
    """One opened input file. Attributes: path, kind, num_entries, branches (all names)."""

    def __init__(self, path, tree=TREE):
        self.path = Path(path)
        self.kind = sniff(self.path)
        self.tree_path = tree
        if self.kind == "root":
            self._open_root(tree)
        else:
            self._open_arrow()
        missing = [b for b in REQUIRED if b not in self.branches]
        if missing:
            where = f"tree '{tree}' of {self.path}" if self.kind == "root" else str(self.path)
            raise DataError(f"{where}: missing branches {missing}; it holds "
                            f"{sorted(self.branches)}")
        self.optional = [b for b in OPTIONAL if b in self.branches]
        self.columns = REQUIRED + self.optional

    def _open_root(self, tree):
        import uproot

        try:
            # Plain reads, not a memory map: a mapped file's pages count in the resident
            # size, which would grow with the input.
            self._file = uproot.open(self.path, handler=uproot.MultithreadedFileSource, num_workers=1)
        except Exception as err:  # uproot raises many kinds on a bad header
            raise DataError(f"{self.path}: not a readable ROOT file (truncated or corrupt?): "
                            f"{_first_line(err)}") from err
        end, size = getattr(self._file.file, "fEND", 0), self.path.stat().st_size
        if end > size:  # checked before reading anything: a copy cut short
            raise DataError(f"{self.path}: truncated ROOT file: its header says {end:,} bytes, "
                            f"the file has {size:,}")
        try:
            obj = self._file[tree]
        except KeyError as err:
            try:
                held = sorted(f"{k} ({v})" for k, v in self._file.classnames(cycle=False).items())
            except Exception:  # pragma: no cover - a directory too damaged to list
                held = ["<unlistable>"]
            raise DataError(f"{self.path}: no tree '{tree}'; the file holds {held}") from err
        except Exception as err:
            raise DataError(f"{self.path}: cannot read '{tree}' (truncated or corrupt?): "
                            f"{_first_line(err)}") from err
        if not hasattr(obj, "num_entries"):
            raise DataError(f"{self.path}: '{tree}' is a {type(obj).__name__}, not a tree")
        self._tree = obj
        self.num_entries = int(obj.num_entries)
        self.branches = set(obj.keys(recursive=False))

    def _open_arrow(self):
        import pyarrow as pa
        import pyarrow.ipc as ipc
        import pyarrow.parquet as pq

        try:
            if self.kind == "feather":
                self._reader = ipc.open_file(pa.OSFile(str(self.path)))
                self.num_entries = int(self._reader.count_rows())
                names = self._reader.schema.names
            else:
                self._reader = pq.ParquetFile(str(self.path))
                self.num_entries = int(self._reader.metadata.num_rows)
                names = self._reader.schema_arrow.names
        except (OSError, pa.ArrowException) as err:
            raise DataError(f"{self.path}: unreadable or truncated {self.kind} file: {err}") from err
        self.branches = set(names)

    def __repr__(self):
        return f"Source({str(self.path)!r}, {self.kind}, {self.num_entries} entries)"

    # Pickled as (path, tree) and opened again: a dask process worker gets its own handle.
    def __getstate__(self):
        return {"path": self.path, "tree": self.tree_path}

    def __setstate__(self, state):
        self.__init__(state["path"], state["tree"])

    def ranges(self, step_size=DEFAULT_STEP) -> list:
        """[(start, stop)] entry ranges of at most step_size entries covering the file, cut
        where every branch read starts a new basket (ROOT), record batch (feather) or row
        group (parquet) when possible, so that no range decompresses a basket twice."""
        if self.kind == "root":
            bounds = [int(b) for b in self._tree.common_entry_offsets(filter_name=self.columns)]
        elif self.kind == "feather":
            with _IpcFile(self.path) as reader:
                sizes = [reader.get_batch(i).num_rows for i in range(reader.num_record_batches)]
            bounds = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).tolist()
        else:
            meta = self._reader.metadata
            sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
            bounds = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).tolist()
        return pack_ranges(bounds, self.num_entries, step_size)

    def read(self, start, stop) -> dict:
        """{branch: numpy array} of entries [start, stop); DataError if they cannot be read."""
        try:
            if self.kind == "root":
                arrays = self._tree.arrays(self.columns, entry_start=start, entry_stop=stop,
                                           library="np", array_cache=None)
            else:
                arrays = self._read_arrow(start, stop)
            return {k: _plain(arrays[k], self.path, k) for k in self.columns}
        except DataError:
            raise
        except Exception as err:  # a basket or record batch that does not decompress
            raise DataError(f"{self.path}: reading failed (truncated or corrupt file?): "
                            f"{_first_line(err)}") from err

    def _read_arrow(self, start, stop):
        """Columns of entries [start, stop) of a feather or parquet file, from a reader of
        its own (readers are not shared between threads)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from effgen.data.columnar import to_numpy

        parts, first = [], 0
        if self.kind == "feather":
            with _IpcFile(self.path) as reader:
                for i in range(reader.num_record_batches):
                    batch = reader.get_batch(i)
                    if first < stop and first + batch.num_rows > start:
                        parts.append(batch.select(self.columns).slice(
                            max(0, start - first), stop - max(start, first)))
                    first += batch.num_rows
            table = pa.Table.from_batches(parts, schema=parts[0].schema if parts else None)
        else:
            pf = pq.ParquetFile(str(self.path))
            groups = []
            for i in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(i).num_rows
                if first < stop and first + n > start:
                    groups.append(i)
                    if len(groups) == 1:
                        skip = max(0, start - first)
                first += n
            table = pf.read_row_groups(groups, columns=self.columns).slice(skip, stop - start)
        out = {}
        for k in self.columns:
            col = table.column(k)
            numeric = pa.types.is_integer(col.type) or pa.types.is_floating(col.type)
            # Anything else (nulls, strings, ...) as pyarrow converts it: _plain judges.
            out[k] = to_numpy(col) if numeric and not col.null_count else col.to_numpy(zero_copy_only=False)
        return out

    def chunks(self, step_size=DEFAULT_STEP):
        """Yield (first_entry, {branch: numpy array}) over `ranges(step_size)`."""
        for start, stop in self.ranges(step_size):
            yield start, self.read(start, stop)


class _IpcFile:
    """An Arrow IPC file reader over a plain (not memory-mapped) file, closed on exit."""

    def __init__(self, path):
        import pyarrow as pa
        import pyarrow.ipc as ipc

        self.source = pa.OSFile(str(path))
        self.reader = ipc.open_file(self.source)

    def __enter__(self):
        return self.reader

    def __exit__(self, *exc):
        self.source.close()


def pack_ranges(bounds, total, step_size) -> list:
    """[(start, stop)] covering [0, total), each at most step_size entries, cut at `bounds`
    (sorted entry numbers) where possible, evenly between two bounds further apart."""
    if step_size <= 0:
        raise ValueError(f"step_size must be positive, got {step_size}")
    bounds = sorted({0, total, *(b for b in bounds if 0 < b < total)})
    ranges, start, prev = [], 0, 0
    for b in bounds[1:]:
        if b - start > step_size and prev > start:
            ranges.append((start, prev))
            start = prev
        if b - start > step_size:  # one basket longer than step_size: even pieces
            n = -(-(b - start) // step_size)
            cuts = [start + (b - start) * i // n for i in range(n + 1)]
            ranges += list(zip(cuts[:-1], cuts[1:]))
            start = b
        prev = b
    if start < total:
        ranges.append((start, total))
    return ranges


def _first_line(err) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def _plain(values, path, name):
    """A flat numeric numpy array, or DataError (jagged or non-numeric branches)."""
    values = np.asarray(values)
    if values.dtype == object or values.ndim != 1 or values.dtype.kind not in "biuf":
        raise DataError(f"{path}: branch '{name}' is not a flat numeric column "
                        f"(dtype {values.dtype}, shape {values.shape})")
    return values


def open_inputs(files, tree=TREE) -> list:
    """Open every file (cheap: headers and footers only); DataError on the first problem,
    or if files differ in which optional branches (key, truth) they hold."""
    sources = [Source(f, tree) for f in files]
    first = sources[0]
    for s in sources[1:]:
        if s.optional != first.optional:
            raise DataError(
                f"inconsistent branches across input files: {first.path} has optional branches "
                f"{first.optional}, {s.path} has {s.optional}; all files must hold the same ones")
    return sources
