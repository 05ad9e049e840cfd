#!/usr/bin/env python
"""Launch `mabn.train` with torchrun after checking what would otherwise fail minutes later.

Used by `make train GPUS=8 [NODES=2 NODE_RANK=0 MASTER_ADDR=host MASTER_PORT=29500]`; everything
after `--` is passed to the training entry as Hydra overrides. `--cpu` runs the processes on the
CPU (gloo), e.g. to try a 2-process job on a laptop: `make train PROCS=2`.
"""
import argparse
import errno
import os
import socket
import sys


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def check_master(addr: str, port: int) -> None:
    """Node rank 0 serves the rendezvous at MASTER_ADDR:MASTER_PORT: the address must be this machine's, the port free."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("" if addr in ("127.0.0.1", "localhost") else addr, port))
        except socket.gaierror:
            fail(f"MASTER_ADDR={addr} does not resolve; valid: this machine's host name or IP address (node rank 0 "
                 f"hosts the rendezvous), e.g. MASTER_ADDR=$(hostname)")
        except OSError as err:
            if err.errno == errno.EADDRNOTAVAIL:
                fail(f"MASTER_ADDR={addr} is not an address of this machine, and node rank 0 hosts the rendezvous; "
                     f"run node rank 0 on {addr}, or set MASTER_ADDR=$(hostname) here")
            fail(f"MASTER_PORT={port} is in use on {addr}; choose another, e.g. MASTER_PORT={port + 1}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=1, help="processes (GPUs) per node")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--node-rank", type=int, default=0)
    parser.add_argument("--master-addr", default="127.0.0.1")
    parser.add_argument("--master-port", type=int, default=29500)
    parser.add_argument("--cpu", action="store_true", help="CPU processes (gloo) instead of GPUs")
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="-- then Hydra overrides")
    args = parser.parse_args()
    overrides = args.overrides[1:] if args.overrides[:1] == ["--"] else args.overrides
    processes = "PROCS" if args.cpu else "GPUS"  # the make variable that set --gpus
    if args.gpus < 1 or args.nodes < 1:
        fail(f"{processes}={args.gpus} and NODES={args.nodes} are not valid; valid: integers >= 1")
    if not 0 <= args.node_rank < args.nodes:
        fail(f"NODE_RANK={args.node_rank} must be between 0 and NODES-1={args.nodes - 1}")
    if not args.master_addr.strip() or any(c.isspace() for c in args.master_addr):  # an unset shell variable
        fail(f"MASTER_ADDR={args.master_addr!r} is not valid; valid: the host name or IP address of node rank 0")
    if not 1 <= args.master_port <= 65535:  # 99999 was a traceback from the port check; 0 has no meaning across nodes
        fail(f"MASTER_PORT={args.master_port} is not valid; valid: a TCP port in 1-65535 (default 29500)")
    if args.cpu:
        overrides = ["train.device=cpu", *overrides]
    else:
        import torch

        visible = torch.cuda.device_count()
        if args.gpus > visible:
            fail(f"GPUS={args.gpus} but {visible} GPUs are visible on this node "
                 f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
                 f"use GPUS<={visible}, or PROCS={args.gpus} for CPU processes")
    # Hydra takes -m/--multirun before the overrides only: `ARGS="-m norm=bn,mabn"` after train.device=cpu, or after
    # NORM=, was 'unrecognized arguments' in every rank
    flags = [o for o in overrides if o in ("-m", "--multirun")]
    overrides = flags + [o for o in overrides if o not in flags]
    if args.node_rank == 0:
        check_master(args.master_addr, args.master_port)
    from mabn.config import CONFIG_DIR, ConfigError, check_overrides  # torch's import: after the quick checks

    try:  # one line here, not a report from every rank (each rank checks again: torchrun or srun may start it alone)
        check_overrides(overrides, CONFIG_DIR)
    except ConfigError as err:
        fail(str(err))
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nnodes={args.nodes}", f"--node_rank={args.node_rank}",
        f"--nproc_per_node={args.gpus}", f"--master_addr={args.master_addr}", f"--master_port={args.master_port}",
        "-m", "mabn.train", *overrides,
    ]
    print(" ".join(command), file=sys.stderr)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(command[3:]))  # torchrun's `main` without its @record, which prints a report of any failure
    except ChildFailedError as err:
        _, first = err.get_first_failure()  # the root cause; torchrun stops the other ranks (SIGTERM) after it
        if first.exitcode != 2:
            print(err.format_msg(), file=sys.stderr)  # a crash: the report names the rank and the root cause
            sys.exit(1)
        # A rank refused the config (mabn.train's exit status 2 after its one `error:` line): torchrun's
        # traceback and report buried that line.
        print("error: the job did not start: a rank refused it (its error line is above)", file=sys.stderr)
        sys.exit(2)
    except SignalException as err:
        # torchrun passed the stop signal on to the ranks, which checkpoint and exit (mabn.stop); its traceback
        # would bury their last lines.
        print(f"stopped by signal {int(err.sigval)}: the ranks were asked to checkpoint (their log says where); "
              f"the same command resumes", file=sys.stderr)
        sys.exit(128 + int(err.sigval))


if __name__ == "__main__":
    main()
