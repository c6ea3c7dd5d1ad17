"""Run a script with a SIGKILL injected at the N-th call of one function, optionally mid-write.

    python tests/recipes/fault_run.py MODULE:ATTR CALL PATH_ARG SCRIPT [ARGS...]

``MODULE:ATTR`` is the function as the code under test looks it up (``eora_ft.compress.io:save_file``,
``pkg.mod:Class.method``). On its ``CALL``-th call the real function runs, then, unless ``PATH_ARG`` is
``-``, the file named by that argument (a position, or a keyword such as ``path``) is cut to half its length (a write the kernel had only
partly flushed when the process died), and the process kills itself with SIGKILL: no ``finally``,
no ``atexit``, no flush; what the disk holds is what a crash would leave.
"""

import importlib
import inspect
import os
import runpy
import signal
import sys


def install(target: str, call: int, path_arg: str) -> None:
    module_name, attr_path = target.split(":")
    owner = importlib.import_module(module_name)
    *parents, attr = attr_path.split(".")
    for name in parents:
        owner = getattr(owner, name)
    original = getattr(owner, attr)
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] != call:
            return original(*args, **kwargs)
        if path_arg != "-":
            original(*args, **kwargs)
            bound = inspect.signature(original).bind(*args, **kwargs).arguments
            path = os.fspath(args[int(path_arg)] if path_arg.isdigit() else bound[path_arg])
            with open(path, "r+b") as handle:
                handle.truncate(os.path.getsize(path) // 2)
        sys.stderr.write(f"fault_run: SIGKILL at call {call} of {target}\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    setattr(owner, attr, wrapper)


if __name__ == "__main__":
    target, call, path_arg, script, *rest = sys.argv[1:]
    install(target, int(call), path_arg)
    sys.argv = [script, *rest]
    runpy.run_path(script, run_name="__main__")
