"""What each process of tests/test_distributed.py's ``torchrun`` launch runs (2 processes): the
``denuc train-detector`` command line, then the head training of both modes on a synthetic
dataset in the same process group's launch; each rank writes its encoder's forward calls.

Usage: ``torchrun --nproc-per-node 2 tests/distributed_worker.py TMP PORT -- <train-detector args>``,
with ``TMP/blobs`` the head's dataset (:func:`synthetic.make_blob_dataset`) and ``PORT`` a free
port for the head training's process groups: rank 0 hosts their store there, as in a launch
without torchrun's agent (a group made again on the agent's store would find the first group's
addresses under the same keys).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from synthetic import BlobDataset
from test_distributed import head_run

from denuc.cli import main


def run(argv: list[str]) -> int:
    tmp, port, sep, *detector_args = argv
    assert sep == "--", argv
    rc = main(["train-detector", *detector_args])
    if rc:
        return rc
    os.environ.update(MASTER_PORT=port, TORCHELASTIC_USE_AGENT_STORE="False")
    root = Path(tmp)
    ds = BlobDataset(root / "blobs")
    calls = {mode: head_run(ds, root / f"two-{mode}.safetensors", root / "cache2", mode) for mode in ("linear", "full")}
    (root / f"calls{os.environ['RANK']}.json").write_text(json.dumps(calls))
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
