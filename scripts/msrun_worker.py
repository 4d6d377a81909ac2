"""What msrun_launcher.sh has msrun run on each worker: CMD, with its exit status recorded.

    python scripts/msrun_worker.py STATUS_DIR CMD [ARGS...]

runs CMD (a Python script, or python / python3 / pytest and its arguments, as msrun itself would), passes
Ctrl-C and SIGTERM on to it, exits with its status and, on a worker that failed, writes that status to
STATUS_DIR/worker_K.status (K: the worker's rank): msrun only says that some process failed, and exits 1. A
worker that msrun kills because another one failed dies with this process (msrun kills the process group), so
only the workers that failed on their own leave a record.
"""
import os
import signal
import subprocess
import sys


def main():
    status_dir, command = sys.argv[1], sys.argv[2:]
    if command[0] not in ("python", "python3", "pytest"):
        command = [sys.executable, *command]
    child = subprocess.Popen(command)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda number, frame: child.send_signal(number))
    status = child.wait()
    status = 128 - status if status < 0 else status  # killed by signal N: 128 + N, as a shell reports it
    if status and os.environ.get("MS_ROLE") == "MS_WORKER":  # msrun runs CMD as its scheduler too
        with open(os.path.join(status_dir, f"worker_{os.environ['RANK_ID']}.status"), "w") as record:
            record.write(f"{status}\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
