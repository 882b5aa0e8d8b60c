"""Cohort runs: input lists, shards, cross-process claims, the merged summary table."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from claim_workers import ROUNDS, beat_then_fall_silent, claim_and_die, claim_and_report, race, worker

from denuc.cli import main as cli_main
from denuc.cohort.claims import claim_order, claim_path, claimed_inputs, read_claim, try_claim
from denuc.cohort.inputs import expand_inputs, parse_shard, shard, world
from denuc.cohort.summary import write_summary_table
from denuc.errors import InputError

CTX = mp.get_context("spawn")


def touch(p: Path) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"x")
    return p


# ---------------------------------------------------------------- inputs


def test_folder_lists_known_suffixes_sorted_not_recursive(tmp_path: Path) -> None:
    d = tmp_path / "in"
    for n in ("b.png", "a.svs", "c.TIF", "notes.txt", ".hidden.png", "sub/deep.png"):
        touch(d / n)
    assert expand_inputs([str(d)]) == [d / "a.svs", d / "b.png", d / "c.TIF"]


def test_dicom_folder_is_one_input_and_mrxs_folder_is_not_listed(tmp_path: Path) -> None:
    d = tmp_path / "in"
    touch(d / "case1" / "0001.dcm")
    touch(d / "case1" / "0002.dcm")
    touch(d / "m.mrxs")
    touch(d / "m" / "Slidedat.ini")
    touch(d / "m" / "Data0000.dat")
    assert expand_inputs([str(d)]) == [d / "case1", d / "m.mrxs"]
    assert expand_inputs([str(d / "case1")]) == [d / "case1"]
    with pytest.raises(InputError, match="MIRAX"):
        expand_inputs([str(d / "m")])
    # a custom predicate replaces suffix matching
    assert expand_inputs([str(d)], is_input=lambda p: p.suffix == ".mrxs") == [d / "m.mrxs"]
    assert expand_inputs([str(d)], suffixes=[".mrxs"]) == [d / "case1", d / "m.mrxs"]


def test_globs_with_recursion_and_dedup(tmp_path: Path) -> None:
    for n in ("s/a.svs", "s/x/b.svs", "s/x/y/c.svs", "s/d.png", "s/e.txt"):
        touch(tmp_path / n)
    s = tmp_path / "s"
    assert expand_inputs([f"{s}/*.svs"]) == [s / "a.svs"]
    assert expand_inputs([f"{s}/**/*.svs"]) == [s / "a.svs", s / "x/b.svs", s / "x/y/c.svs"]
    # the same file through a folder and a glob is one input; a non-image glob match is dropped
    assert expand_inputs([str(s), f"{s}/*"]) == [s / "a.svs", s / "d.png"]
    with pytest.raises(InputError, match=r"\*\.ndpi.*nothing matched"):
        expand_inputs([f"{s}/*.ndpi"])
    with pytest.raises(InputError, match="none an image"):
        expand_inputs([f"{s}/*.txt"])


def test_list_file_comments_and_relative_paths(tmp_path: Path) -> None:
    a = touch(tmp_path / "data" / "a.png")
    b = touch(tmp_path / "other" / "b.svs")
    lst = tmp_path / "lists" / "cohort.txt"
    lst.parent.mkdir()
    lst.write_text(f"# my cohort\n\n  ../data/a.png  \n{b}\n# ../data/missing.png\n../other/*.svs\n")
    got = expand_inputs([], inputs_file=lst)
    assert [p.resolve() for p in got] == sorted([a.resolve(), b.resolve()], key=lambda p: str(p))
    assert len(got) == 2
    bad = tmp_path / "bad.txt"
    bad.write_text("a.png\nnope.png\n")
    touch(tmp_path / "a.png")
    with pytest.raises(InputError, match=r"nope\.png.*bad\.txt, line 2"):
        expand_inputs([], inputs_file=bad)
    with pytest.raises(InputError, match="no such list file"):
        expand_inputs([], inputs_file=tmp_path / "absent.txt")


def test_duplicate_stems_missing_paths_and_nothing_given(tmp_path: Path) -> None:
    touch(tmp_path / "x" / "s1.png")
    touch(tmp_path / "y" / "s1.svs")
    with pytest.raises(InputError, match="both write outputs named s1"):
        expand_inputs([str(tmp_path / "x"), str(tmp_path / "y")])
    with pytest.raises(InputError, match="no such file"):
        expand_inputs([str(tmp_path / "absent.png")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no image"):
        expand_inputs([str(tmp_path / "empty")])
    with pytest.raises(InputError, match="no input"):
        expand_inputs([])


def test_parse_shard() -> None:
    assert parse_shard("0/1") == (0, 1)
    assert parse_shard(" 3 / 4 ") == (3, 4)
    for bad in ("4/4", "1/0", "-1/2", "a/b", "1", "1/2/3", ""):
        with pytest.raises(InputError, match="--shard"):
            parse_shard(bad)


@given(st.lists(st.integers(), max_size=40), st.integers(1, 9))
def test_shards_partition_items(items: list[int], count: int) -> None:
    parts = [shard(items, i, count) for i in range(count)]
    flat = [x for p in parts for x in p]
    assert sorted(flat) == sorted(items)  # union is everything, each item once
    idx = [set(range(i, len(items), count)) for i in range(count)]
    assert all(not (idx[i] & idx[j]) for i in range(count) for j in range(i + 1, count))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    for i in range(count):  # claim orders are permutations with the own shard first
        order = claim_order(len(items), i, count)
        assert sorted(order) == list(range(len(items)))
        assert order[: len(parts[i])] == list(range(i, len(items), count))


def test_world_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    assert world() == (0, 1)
    monkeypatch.setenv("SLURM_PROCID", "2")
    monkeypatch.setenv("SLURM_NTASKS", "5")
    assert world() == (2, 5)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert world() == (1, 3)  # torchrun's variables win over SLURM's
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(InputError, match="RANK"):
        world()


# ---------------------------------------------------------------- claims (helpers run in spawned processes)


def test_claim_is_exclusive_between_processes(tmp_path: Path) -> None:
    q: mp.Queue = CTX.Queue()
    mine = try_claim(tmp_path, "s1")
    assert mine is not None and mine.held()
    p = CTX.Process(target=claim_and_report, args=(str(tmp_path), "s1", q))
    p.start()
    p.join(30)
    assert q.get(timeout=5) is None  # held by us, alive
    info = read_claim(claim_path(tmp_path, "s1"))
    assert info is not None and info.pid == os.getpid() and info.token == mine.token
    assert mine.release() and not mine.release()
    assert not claim_path(tmp_path, "s1").exists()
    p = CTX.Process(target=claim_and_report, args=(str(tmp_path), "s1", q))
    p.start()
    p.join(30)
    assert q.get(timeout=5) is not None


def test_a_claim_appears_complete_and_an_empty_one_goes_stale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import denuc.cohort.claims as claims

    seen: list[bytes] = []
    link = os.link

    def watch(src: str, dst: str) -> None:  # the claim's name appears with its contents, at once
        link(src, dst)
        seen.append(Path(dst).read_bytes())

    monkeypatch.setattr(claims.os, "link", watch)
    c = try_claim(tmp_path, "a")
    assert c is not None and seen and json.loads(seen[0])["token"] == c.token
    assert sorted(p.name for p in tmp_path.iterdir()) == [".a.claim"]  # no temporary file left
    assert try_claim(tmp_path, "a") is None
    c.release()
    # a claim file left empty by a process killed between creating and writing it (file
    # systems without hard links) blocks the input only for a short grace, not for stale_after
    empty = claim_path(tmp_path, "b")
    empty.write_bytes(b"")
    assert try_claim(tmp_path, "b", stale_after=600) is None  # just created: maybe being written
    old = time.time() - claims.EMPTY_CLAIM_GRACE_S - 5
    os.utime(empty, (old, old))
    taken = try_claim(tmp_path, "b", stale_after=600)
    assert taken is not None and read_claim(empty).token == taken.token
    taken.release()


def test_claim_of_dead_process_is_taken_over(tmp_path: Path) -> None:
    p = CTX.Process(target=claim_and_die, args=(str(tmp_path), "s1"))
    p.start()
    p.join(30)
    dead = read_claim(claim_path(tmp_path, "s1"))
    assert dead is not None and dead.pid == p.pid
    c = try_claim(tmp_path, "s1")  # heartbeat is fresh, but the owner is gone
    assert c is not None and c.held()
    assert sorted(x.name for x in tmp_path.iterdir()) == [".s1.claim"]  # no tombstone or lock left


def test_heartbeat_keeps_claim_and_silence_loses_it(tmp_path: Path) -> None:
    q: mp.Queue = CTX.Queue()
    beating, done = CTX.Event(), CTX.Event()
    p = CTX.Process(target=beat_then_fall_silent, args=(str(tmp_path), "s1", q, beating, done))
    p.start()
    try:
        assert q.get(timeout=30) is not None
        t0 = time.time()
        while beating.is_set() or time.time() - t0 < 0.1:  # owner alive and beating: never stale
            assert try_claim(tmp_path, "s1", stale_after=1.0) is None  # (beats every 0.1 s: a loaded machine's lag fits)
            time.sleep(0.1)
        time.sleep(1.1)  # owner alive but silent for longer than stale_after
        c = try_claim(tmp_path, "s1", stale_after=1.0)
        assert c is not None and c.held()
    finally:
        done.set()
        p.join(30)
    assert c.held()  # the old owner's release (at exit) did not remove our claim


def test_timeout_takeover_and_loser_notices(tmp_path: Path) -> None:
    q: mp.Queue = CTX.Queue()
    done = CTX.Event()
    # a live owner in another process; with a tiny stale_after its silent claim is taken over
    p = CTX.Process(target=claim_and_report, args=(str(tmp_path), "s1", q, done))
    p.start()
    try:
        token = q.get(timeout=30)
        assert token is not None
        assert try_claim(tmp_path, "s1") is None  # alive and recent enough for the default 600 s
        time.sleep(0.4)
        c = try_claim(tmp_path, "s1", stale_after=0.3)
        assert c is not None and c.held()
    finally:
        done.set()
        p.join(30)
    # the old owner's heartbeat reported the loss, its release left our claim alone
    assert q.get(timeout=5) is False
    assert c.held() and c.heartbeat()


def test_racing_takers_exactly_one_wins(tmp_path: Path) -> None:
    # ROUNDS stale claims (foreign host, heartbeat long ago); 4 processes race for each in turn
    old = time.time() - 1000
    for r in range(ROUNDS):
        claim_path(tmp_path, f"s{r}").write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": 0.0,
                                                             "heartbeat": 0.0, "token": f"{r:032x}"}))
        os.utime(claim_path(tmp_path, f"s{r}"), (old, old))
    q: mp.Queue = CTX.Queue()
    barrier = CTX.Barrier(4)
    procs = [CTX.Process(target=race, args=(str(tmp_path), 600.0, barrier, q)) for _ in range(4)]
    for p in procs:
        p.start()
    wins = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    assert [sum(w[r] for w in wins) for r in range(ROUNDS)] == [1] * ROUNDS
    assert sorted(x.name for x in tmp_path.iterdir()) == sorted(f".s{r}.claim" for r in range(ROUNDS))


def test_claimed_inputs_two_processes_each_input_once(tmp_path: Path) -> None:
    inputs = [str(touch(tmp_path / "in" / f"s{i:02d}.png")) for i in range(12)]
    out = tmp_path / "out"
    out.mkdir()
    (out / "s03.done").write_text("ok")  # already done: skipped
    procs = [CTX.Process(target=worker, args=(inputs, str(out), r, 2)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    lines = (out / "log.txt").read_text().split()
    stems = lines[1::2]
    assert sorted(stems) == [f"s{i:02d}" for i in range(12) if i != 3]
    assert not list(out.glob(".*.claim"))


def test_claimed_inputs_releases_when_caller_leaves(tmp_path: Path) -> None:
    inputs = [touch(tmp_path / f"s{i}.png") for i in range(3)]
    gen = claimed_inputs(inputs, tmp_path, lambda p: False, 1, 2)
    first, claim = next(gen)
    assert first.stem == "s1" and claim.held()  # rank 1 of 2 starts with its own shard
    gen.close()
    assert not claim.held() and not claim_path(tmp_path, "s1").exists()


# ---------------------------------------------------------------- summary


def test_summary_table_merges_flattens_and_drops_timings(tmp_path: Path) -> None:
    (tmp_path / "b.summary.json").write_text(json.dumps({
        "mpp": 0.5, "count": {"tumor": 3, "immune": 1}, "density_per_mm2": {"tumor": 12.5},
        "rois": ["r1", "r2"], "timings": {"detect": 3.2}, "host": "n1", "ok": True}))
    (tmp_path / "a.summary.json").write_text(json.dumps({
        "mpp": 0.25, "count": {"tumor": 0, "stroma": 7}, "elapsed": 9.1, "extra": None,
        "tiles": {"n": 4, "profile": {"x": 1}}}))
    path = write_summary_table(tmp_path)
    assert path == tmp_path / "summary.csv"
    assert path.read_text().splitlines() == [
        "stem,mpp,count.tumor,count.stroma,extra,tiles.n,count.immune,density_per_mm2.tumor,rois,ok",
        "a,0.25,0,7,,4,,,,",
        'b,0.5,3,,,,1,12.5,"[""r1"",""r2""]",true',
    ]
    first = path.read_bytes()
    # timings differ, results do not: identical table
    (tmp_path / "a.summary.json").write_text(json.dumps({
        "mpp": 0.25, "count": {"tumor": 0, "stroma": 7}, "elapsed": 1.0, "extra": None,
        "tiles": {"n": 4, "profile": {"y": 2}}}))
    assert write_summary_table(tmp_path).read_bytes() == first
    rows = write_summary_table(tmp_path, inputs=["x/a.png", "c"]).read_text().splitlines()
    assert rows == ["stem,mpp,count.tumor,count.stroma,extra,tiles.n", "a,0.25,0,7,,4", "c,,,,,"]


def test_summarize_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["summarize", str(tmp_path)]) == 2
    assert "no per-input summary" in capsys.readouterr().err
    (tmp_path / "a.summary.json").write_text("[1]")
    assert cli_main(["summarize", str(tmp_path)]) == 2
    assert "a.summary.json: summary is not a JSON object" in capsys.readouterr().err
    (tmp_path / "a.summary.json").write_text('{"count": {"tumor": 2}}')
    assert cli_main(["summarize", str(tmp_path)]) == 0
    assert (tmp_path / "summary.csv").read_text() == "stem,count.tumor\na,2\n"


def test_python_m_denuc_runs_the_cli() -> None:
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    r = subprocess.run([sys.executable, "-m", "denuc", "summarize", "--help"], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 0 and "summary.csv" in r.stdout
