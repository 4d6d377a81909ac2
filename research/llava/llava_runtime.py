"""Process set-up shared by the command line, tests and benchmarks: MindSpore context and CPU threads."""
import os

import mindspore as ms

_cpu_threads_set = False


def set_up_context(device_target="CPU", mode=1, threads=None):
    """MindSpore context for inference; safe to call more than once.

    On CPU the default op thread pool is far larger than the core count and thrashes, so it is pinned to
    the cores available to this process (MindSpore accepts that once per process); and PyNative's
    asynchronous launch is switched off: with it a tiny model's 16-token generation took 4.0 s, without
    it 0.17 s (the launcher thread fights the op threads for 2 cores).
    """
    global _cpu_threads_set
    if mode not in (0, 1):
        raise ValueError(f"mode must be 0 (graph) or 1 (PyNative), got {mode}")
    ms.set_context(mode=mode, device_target=device_target)
    if device_target == "CPU" and not _cpu_threads_set:
        ms.device_context.cpu.op_tuning.threads_num(threads or len(os.sched_getaffinity(0)))
        ms.runtime.launch_blocking()
        _cpu_threads_set = True
