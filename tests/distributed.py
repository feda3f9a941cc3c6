"""torchrun from the tests: a rank that hangs in a collective fails the test after `timeout` seconds, and the
whole process tree (torchrun and every rank it started) is killed, so that no orphan keeps the pipes, the port or the
cores."""
import contextlib
import os
import signal
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")


def torchrun(script_args, ranks=2, timeout=300):
    """`torchrun --standalone --nproc_per_node=ranks train.py ...` (script_args may name another script first,
    ending in .py). The tests' plug-ins (tests/plugins.py) import by name. -> the completed process; fails the
    test on a non-zero exit or a hang."""
    script = script_args[0] if script_args and script_args[0].endswith(".py") else os.path.join(ROOT, "train.py")
    rest = script_args[1:] if script_args and script_args[0].endswith(".py") else script_args
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", script] + rest
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in [proc.pid] + descendants(proc.pid):  # torchrun starts each rank in a session of its own
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"torchrun did not finish in {timeout} s (a hang between ranks?):\n{err[-3000:]}")
    assert proc.returncode == 0, err[-4000:]
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def descendants(pid):
    """Every process below `pid` (Linux /proc), found before any is killed: an orphan is re-parented."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found
