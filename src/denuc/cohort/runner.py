"""The cohort runner: many inputs into one output folder, the same from the CLI and from Python.

``denuc predict``, ``denuc detect``, :meth:`denuc.pipeline.DeNuC.predict_many` and
:meth:`denuc.detect.api.Detector.detect_many` all call :func:`run_cohort`, which

1. expands the inputs (files, folders, globs, a list file: :func:`denuc.cohort.inputs.expand_inputs`);
2. matches each input to its ROI and tissue-mask file when ``roi`` / ``tissue_mask`` is a
   folder (:func:`match_by_stem`); an input without its file is **reported as failed and not
   processed** (never silently processed whole);
3. decides per input, from its ``<stem>.summary.json`` (written last: the commit marker) and
   its fingerprint (:mod:`denuc.stream.fingerprint`): done (skipped), made with other settings
   (refused, naming the changes, unless ``overwrite``), or to do;
4. shares the inputs to do with other processes through claims in the output folder
   (:func:`denuc.cohort.claims.claimed_inputs`; static ``shard`` first), runs each through
   :func:`denuc.stream.job.run_source` (an input's failure is its own: the others go on);
5. writes ``summary.csv`` over every finished input in the folder (when there is more than one).

The models are built once, by ``build()``, when an input first needs them (to run it, or to
compute the fingerprint of outputs already there).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from denuc.cohort.inputs import input_stem
from denuc.errors import InputError

#: ``() -> (TileStream, models description, class colours or None)``.
Build = Callable[[], tuple[Any, dict[str, Any], Any]]

#: ROI file suffixes looked for in a ``roi`` folder, in this order.
ROI_SUFFIXES = (".geojson", ".json")
#: Mask image suffixes looked for in a ``tissue_mask`` folder, in this order.
MASK_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")


@dataclass
class InputResult:
    """What the run did with one input.

    Attributes:
        path: the input file (or DICOM folder).
        stem: its output stem (outputs are ``<out>/<stem>.*``).
        status: ``done`` (written now), ``skipped`` (finished before, same fingerprint),
            ``busy`` (another live process holds it), ``failed`` (error, or refused: no ROI /
            mask file in the folder, or outputs made with other settings).
        summary: the input's summary (``<stem>.summary.json``) when done.
        paths: the output files written.
        error: one line saying why it failed (names the input), else None.
        seconds: wall time this process spent on it.
    """

    path: Path
    stem: str
    status: str
    summary: dict[str, Any] = field(default_factory=dict)
    paths: list[Path] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0


@dataclass
class CohortResult:
    """Every input's :class:`InputResult` (in input order) and the output folder."""

    out: Path
    results: list[InputResult]

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def ok(self) -> bool:
        """No input failed."""
        return self.count("failed") == 0

    def message(self) -> str:
        """The run's last line, saying what is true, e.g. ``1 of 2 input(s) failed; 1 written to OUT``."""
        n, failed, done, busy = len(self.results), self.count("failed"), self.count("done"), self.count("busy")
        if failed:
            return f"{failed} of {n} input(s) failed; " + (f"{done} written to {self.out}" if done
                                                           else "nothing was written")
        text = f"{done} of {n} input(s) written to {self.out}"
        if self.count("skipped"):
            text += f", {self.count('skipped')} already done"
        if busy:
            text += f"; {busy} were being processed by another process: rerun to finish any it left"
        return text


def error_line(path: Path, e: BaseException) -> str:
    """``PATH: message`` for a failed input: the path named once (DeNuC's messages usually
    start with it), an unexpected exception's type named, on one line."""
    from denuc.data.image import describe_exception
    from denuc.errors import DenucError

    msg = str(e) if isinstance(e, DenucError) else describe_exception(e)
    msg = " ".join(msg.split())
    if not msg.startswith(f"{path}:") and not msg.startswith(f"{path} "):
        msg = f"{path}: {msg}"
    return msg


def match_by_stem(folder: Path, files: Sequence[Path], suffixes: Sequence[str], what: str) -> dict[Path, Path | None]:
    """Each input's file in ``folder``: ``<stem><suffix>`` or ``<file name><suffix>`` (QuPath
    names exports after the image, e.g. ``slide1.svs.geojson``), any case of the suffix.

    Returns:
        input -> its file, or None when the folder has none.

    Raises:
        InputError: an input matches more than one file (naming them).
    """
    entries: dict[str, list[Path]] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and not p.name.startswith("."):
            low = p.name.lower()
            for suf in suffixes:
                if low.endswith(suf):
                    entries.setdefault(p.name[: -len(suf)], []).append(p)
                    break
    out: dict[Path, Path | None] = {}
    for f in files:
        found = [*entries.get(input_stem(f), []), *(entries.get(f.name, []) if f.name != input_stem(f) else [])]
        if len(found) > 1:
            raise InputError(f"{f}: several {what} files in {folder} match it ({', '.join(p.name for p in found)}); "
                             "keep one")
        out[f] = found[0] if found else None
    return out


def _per_input(opts: Any, files: Sequence[Path]) -> tuple[dict[Path, Any], dict[Path, str]]:
    """Per-input options (ROI and mask files matched when given as folders) and the inputs
    refused for lacking theirs."""
    matched: dict[str, dict[Path, Path | None]] = {}
    for name, sufs, what in (("roi", ROI_SUFFIXES, "ROI"), ("tissue_mask", MASK_SUFFIXES, "tissue mask")):
        v = getattr(opts, name)
        if v is None:
            continue
        p = Path(v)
        if p.is_dir():
            matched[name] = match_by_stem(p, files, sufs, what)
        elif not p.is_file():
            raise InputError(f"--{name.replace('_', '-')} {v}: no such file or folder")
    per: dict[Path, Any] = {}
    missing: dict[Path, str] = {}
    for f in files:
        changes: dict[str, Any] = {}
        for name, m in matched.items():
            if m[f] is None:
                flag, folder = name.replace("_", "-"), getattr(opts, name)
                what = "ROI" if name == "roi" else "tissue mask"
                missing[f] = (f"{f}: no {what} file for it in {folder} (looked for {input_stem(f)}.* and {f.name}.*); "
                              f"not processed: add one, or run it without --{flag}")
            else:
                changes[name] = m[f]
        per[f] = replace(opts, **changes) if changes else opts
    return per, missing


def run_cohort(inputs: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], build: Build, *,
               opts: Any = None, inputs_file: str | os.PathLike[str] | None = None, mpp: float | None = None,
               mpp_default: float | None = None, shard: tuple[int, int] | None = None, shard_only: bool = False,
               on_result: Callable[[InputResult], None] | None = None,
               on_note: Callable[[str], None] | None = None, jobs: int | str | None = "auto") -> CohortResult:
    """Run every input into ``out`` (see the module docstring).

    Args:
        inputs: files, folders, glob patterns (or one of them); ``inputs_file``: a list file of more.
        out: the output folder (created if missing).
        build: ``() -> (TileStream, models description, colours)``, called at most once.
        opts: :class:`denuc.stream.job.RunOptions`; its ``roi`` and ``tissue_mask`` may be folders
            (one file per input, matched by stem).
        mpp: level-0 µm per pixel of every input (overrides the files' own).
        mpp_default: level-0 µm per pixel of the inputs that carry none (the others keep theirs).
        shard: ``(I, N)``: this process is worker I of N (default: torchrun / srun's rank and
            world size, else the only one); ``shard_only``: only shard I's inputs.
        on_result: called with each input's result as it is known (for printing).
        on_note: called with lines worth telling the user (skipped inputs, missing ROI files).
        jobs: inputs run at once by this process, each in a thread of its own with a share of
            the CPU threads (:func:`resolve_jobs`; ``"auto"``: 2 on a CPU with two or more
            threads when two or more inputs are to do, else 1). Each input's outputs are the same
            whatever ``jobs`` is; ``on_result`` is called from those threads, one call at a time.

    Returns:
        :class:`CohortResult`; an input's failure is in its result, not raised.

    Raises:
        InputError / ResolutionError: bad arguments (no input, bad mpp, bad shard, a missing
        ROI or mask path, an unwritable folder), before any input runs; a model that cannot be
        built.
    """
    from denuc.cohort.claims import ClaimQueue
    from denuc.cohort.inputs import expand_inputs, parse_shard, world
    from denuc.core.files import check_out_dir
    from denuc.core.mpp import check_mpp
    from denuc.sinks import output_paths
    from denuc.source import is_slide_path
    from denuc.stream.fingerprint import SettingsChanged, output_state
    from denuc.data.image import IMAGE_SUFFIXES
    from denuc.source import SLIDE_SUFFIXES
    from denuc.stream.job import RunOptions, input_fingerprint, open_input, run_source

    if isinstance(inputs, (str, os.PathLike)):  # one path, not a sequence of characters
        inputs = [inputs]
    if jobs is not None and jobs != "auto":
        resolve_jobs(jobs, 1, None)  # a bad --jobs fails before any work
    opts = opts if opts is not None else RunOptions(progress=False)
    if mpp is not None:
        mpp = check_mpp(mpp, "--mpp")
    if mpp_default is not None:
        mpp_default = check_mpp(mpp_default, "--mpp-default")
    if not inputs and inputs_file is None:
        raise InputError("no input: give image or slide files, folders, globs or --inputs LIST")
    files = expand_inputs([os.fspath(x) for x in inputs], inputs_file,
                          suffixes=tuple(dict.fromkeys([*IMAGE_SUFFIXES, *SLIDE_SUFFIXES])))
    if shard is not None:
        parse_shard(f"{shard[0]}/{shard[1]}")  # checks 0 <= I < N
    rank, size = world() if shard is None else shard
    if shard_only:
        if shard is None:
            raise InputError("--shard-only needs --shard I/N")
        files, rank, size = files[rank::size], 0, 1
    per, missing = _per_input(opts, files)
    out_dir = check_out_dir(out)
    note = on_note or (lambda _line: None)
    results: dict[Path, InputResult] = {}

    def report(r: InputResult) -> None:
        results[r.path] = r
        if on_result is not None:
            on_result(r)

    engine: list[Any] = []

    def get_engine() -> tuple[Any, dict[str, Any], Any]:
        if not engine:  # models load once, when some input needs them; their errors stop the run
            engine.extend(build())
        return engine[0], engine[1], engine[2]

    def finals(f: Path) -> list[Path]:
        o = per[f]
        return output_paths(input_stem(f), out_dir, "slide" if is_slide_path(f) else "image", o.formats, o.overlay)

    fps: dict[Path, dict[str, Any] | None] = {}

    def fingerprint(f: Path) -> dict[str, Any] | None:
        if f not in fps:
            models = get_engine()[1]  # a model that cannot be built stops the run
            try:
                with open_input(f, mpp=mpp, mpp_default=mpp_default, name=input_stem(f)) as src:
                    fps[f] = input_fingerprint(src, per[f], models)
            except Exception:  # an unreadable input: running it reports the error, with its name
                fps[f] = None
        return fps[f]

    def state(f: Path) -> str:
        """``done``, ``todo`` or ``changed`` (SettingsChanged is raised for the message)."""
        fl = finals(f)
        if per[f].overwrite or not any(p.name.endswith(".summary.json") and p.is_file() for p in fl):
            return "todo"
        fp = fingerprint(f)
        if fp is None:
            return "todo"
        return "done" if output_state(fl, fp, False) == "done" else "todo"

    def is_done(f: Path) -> bool:
        try:
            return state(f) == "done"
        except SettingsChanged:
            return True  # not to be run: reported in the first pass

    todo: list[Path] = []
    skipped = 0
    for f in files:
        if f in missing:
            report(InputResult(f, input_stem(f), "failed", error=missing[f]))
            continue
        try:
            s = state(f)
        except SettingsChanged as e:
            report(InputResult(f, input_stem(f), "failed", error=error_line(f, e)))
            continue
        if s == "done":
            skipped += 1
            report(InputResult(f, input_stem(f), "skipped", paths=finals(f)))
        else:
            todo.append(f)
    if skipped:
        note(f"skipping {skipped} input(s) already done in {out_dir} with the same settings "
             "(use --overwrite to redo)")
    if missing:
        note(f"{len(missing)} input(s) have no ROI / tissue mask file and are not processed: "
             + ", ".join(f.name for f in missing))
    queue = ClaimQueue(todo, out_dir, is_done, rank, size, stale_after=opts.stale_after)
    lock = threading.RLock()  # the claim queue, fingerprints, results and on_result, one thread at a time

    def run_one(stream: Any, f: Path, claim: Any) -> None:
        _runner, models, colors = get_engine()
        t0 = time.perf_counter()
        try:  # any failure is this input's: report it and go on (Ctrl-C still stops the run)
            res = run_source(stream, f, mpp=mpp, mpp_default=mpp_default, name=input_stem(f), out_dir=out_dir,
                             opts=per[f], models=models, colors=colors, claim=claim)
        except Exception as e:
            with lock:
                report(InputResult(f, input_stem(f), "failed", error=error_line(f, e),
                                   seconds=time.perf_counter() - t0))
            del e  # frees a MemoryError's traceback now
            return
        finally:
            claim.release()
        status = {"done": "done", "skipped": "skipped", "busy": "busy"}[res.status]
        with lock:
            report(InputResult(f, res.name, status, res.summary, res.paths, seconds=time.perf_counter() - t0))

    def next_input() -> tuple[Path, Any] | None:
        with lock:
            return queue.next()

    first = next_input()
    if first is not None:
        stream = get_engine()[0]  # loaded once, before the first input's clock starts
        n_jobs = resolve_jobs(jobs, len(todo), stream)
        if n_jobs <= 1:
            item: tuple[Path, Any] | None = first
            while item is not None:
                run_one(stream, *item)
                item = next_input()
        else:
            _run_threads(n_jobs, stream, first, next_input, run_one)
    for f in todo:  # held by another live process, or finished by one meanwhile
        if f not in results:
            report(InputResult(f, input_stem(f), "skipped" if is_done(f) else "busy"))
    _sweep_claims(out_dir, files, is_done, opts.stale_after)
    refresh_summary_table(out_dir)
    return CohortResult(out_dir, [results[f] for f in files])


def resolve_jobs(jobs: int | str | None, n_todo: int, stream: Any) -> int:
    """How many inputs run at once in this process.

    Args:
        jobs: a number >= 1, or ``"auto"`` / None: 2 when the models run on the CPU with two or
            more threads (ONNX Runtime's or PyTorch's) and two or more inputs are to do, else 1
            (a GPU runs one input at a time: its batches fill it).
        n_todo: inputs left to do.
        stream: the :class:`~denuc.stream.runner.TileStream` (its detector's device).

    Raises:
        InputError: ``jobs`` is neither ``auto`` nor a whole number >= 1.
    """
    import torch

    if jobs is None or jobs == "auto":
        on_cpu = torch.device(getattr(stream.detector, "device", "cpu")).type == "cpu"
        return 2 if on_cpu and _cpu_threads() >= 2 and n_todo >= 2 else 1
    try:
        n = int(jobs)
    except (TypeError, ValueError):
        n = 0
    if n < 1 or str(jobs).strip() != str(n):
        raise InputError(f"--jobs must be 'auto' or a whole number >= 1; got {jobs!r}")
    return max(1, min(n, n_todo))


def _cpu_threads() -> int:
    """The CPU threads the networks may use: ONNX Runtime's process-wide number when set, else
    PyTorch's."""
    import sys

    import torch

    ort_runtime = sys.modules.get("denuc.runtime.onnx")
    return int(getattr(ort_runtime, "THREADS", None) or torch.get_num_threads())


def _run_threads(n_jobs: int, stream: Any, first: tuple[Path, Any],
                 next_input: Callable[[], tuple[Path, Any] | None],
                 run_one: Callable[[Any, Path, Any], None]) -> None:
    """Run the queue's inputs in ``n_jobs`` threads (this one and ``n_jobs - 1`` more), each
    with a fork of ``stream`` and an equal share of the CPU threads for its networks (a thread
    that finds the queue empty leaves its share to those still running, from their next
    network call).

    The extra threads are daemons: Ctrl-C stops the process at once (an input cut short leaves
    only temporary files, removed by the next run, and a claim that the next run takes over).
    An exception other than an input's own failure, in any thread, is raised here.
    """
    import torch

    from denuc.runtime.onnx import set_thread_threads

    total = _cpu_threads()
    torch_threads = torch.get_num_threads()
    stop = threading.Event()
    errors: list[BaseException] = []
    busy = [n_jobs]  # threads still taking inputs: the last one left gets every thread
    busy_lock = threading.Lock()

    def share() -> int:
        return max(1, total // max(1, busy[0]))

    def work(own: Any, item: tuple[Path, Any] | None, catch: bool) -> None:
        set_thread_threads(share)
        try:
            while item is not None and not stop.is_set():
                run_one(own, *item)
                item = None if stop.is_set() else next_input()
            if item is not None:  # taken but not run: another process may have it
                item[1].release()
        except BaseException as e:
            stop.set()  # the other threads take no new input
            if not catch:
                raise
            errors.append(e)  # handed to the calling thread
        finally:
            with busy_lock:
                busy[0] -= 1
            set_thread_threads(None)

    if torch_threads > 1:  # PyTorch's own threads (a PyTorch runtime, or glue) shared the same way
        torch.set_num_threads(max(1, torch_threads // n_jobs))
    try:
        others = [threading.Thread(target=work, args=(stream.fork(), next_input(), True), daemon=True,
                                   name=f"denuc-input-{k + 1}") for k in range(n_jobs - 1)]
        for t in others:
            t.start()
        work(stream, first, False)  # Ctrl-C here stops the process now, without waiting for the others
        for t in others:
            t.join()
    finally:
        torch.set_num_threads(torch_threads)
    if errors:
        raise errors[0]


def _sweep_claims(out: Path, files: list[Path], is_done: Callable[[Path], bool], stale_after: float) -> None:
    """Remove claims and resume journals left on finished inputs by processes that died after
    writing their outputs (a live owner's claim and journal stay)."""
    from denuc.cohort.claims import claim_path, try_claim
    from denuc.stream.job import drop_dead_journal

    for f in files:
        stem = input_stem(f)
        journal = (out / f".{stem}.partial").exists()
        if (journal or claim_path(out, stem).exists()) and is_done(f):
            if journal:
                drop_dead_journal(out, stem, stale_after)
            else:
                c = try_claim(out, stem, stale_after=stale_after)
                if c is not None:
                    c.release()


def refresh_summary_table(out: str | os.PathLike[str]) -> Path | None:
    """Rewrite ``out/summary.csv`` over every finished input's summary in ``out`` (when there is
    more than one); returns its path, or None when there is at most one summary."""
    from denuc.cohort.summary import SUMMARY_SUFFIX, write_summary_table

    out = Path(out)
    if len([p for p in out.glob(f"*{SUMMARY_SUFFIX}") if not p.name.startswith(".")]) > 1:
        return write_summary_table(out)
    return None
