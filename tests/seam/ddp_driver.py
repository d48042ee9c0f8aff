"""Run by the DDP tests under torchrun: `gpulab ...` command lines in turn.

argv[1]: a JSON list of argv lists; argv[2]: a JSON list of free ports, one per command. A process
cannot re-join torchrun's agent store after destroying its group (the second gloo rendezvous reads
the first one's stale addresses), so each command gets its own env:// rendezvous: rank 0 hosts a
fresh TCP store on that command's port. After each command every rank checks that the command
destroyed its process group; a rank that finds it still initialized exits with status 3.
"""
from __future__ import annotations

import json
import os
import sys


def main() -> None:
    import torch.distributed as dist

    from gpulab.cli import invoke

    for argv, port in zip(json.loads(sys.argv[1]), json.loads(sys.argv[2]), strict=True):
        os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "False"
        os.environ["MASTER_PORT"] = str(port)
        invoke(argv)
        if dist.is_initialized():
            print(f"rank {os.environ.get('RANK')}: process group still initialized after {argv[-6:]}", flush=True)
            sys.exit(3)
        print(f"rank {os.environ.get('RANK')}: done", flush=True)


if __name__ == "__main__":
    main()
