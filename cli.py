"""
What every command of the project shares at its edges: argument types that name the flag and the range a value
must lie in, and files written so that a reader sees the old file or the new one, never half of one.

    number(int, low=1)  ->  an argparse type: "argument --steps: must be a finite int >= 1, not '0'"
    with replacing(path) as tmp: write(tmp)   ->  tmp is renamed over path on success, removed on failure;
                                                  a full disk says "disk full", naming the file

It imports nothing of the project, so every command (train.py, generate.py, understand.py, eval_geneval.py,
lora.py, toy.py) can use it.
"""
import argparse
import contextlib
import errno
import math
import os


def number(kind, low=None, high=None, above=None):
    """An argparse type: `kind` (int or float), finite, >= low / > above / <= high. A value outside gets one line
    from argparse naming the flag and the range ("argument --lr: must be a finite float > 0, not 'inf'")."""
    bounds = " and ".join(b for b in (f">= {low}" if low is not None else "", f"> {above}" if above is not None
                                      else "", f"<= {high}" if high is not None else "") if b)

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {'an int' if kind is int else 'a float'}, not {text!r}")
        if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high) \
                or (above is not None and value <= above):
            raise argparse.ArgumentTypeError(f"must be a finite {kind.__name__}" + (f" {bounds}" if bounds else "")
                                             + f", not {text!r}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


COUNT = number(int, low=1)            # 1, 2, ...
NONNEG = number(int, low=0)           # 0 usually means "off"
POSITIVE = number(float, above=0)
NONNEG_F = number(float, low=0)
FRACTION = number(float, low=0, high=1)
FINITE = number(float)


def is_disk_full(error):
    """True for ENOSPC, also when a library wrapped it in its own exception (the message then carries it)."""
    return getattr(error, "errno", None) == errno.ENOSPC or "No space left" in str(error)


@contextlib.contextmanager
def replacing(path):
    """Yield a temporary name beside `path` to write to; rename it over `path` when the block succeeds, remove it
    when it fails. A full disk raises OSError "PATH: disk full" and leaves the previous file as it was."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError) and is_disk_full(e):
            raise OSError(errno.ENOSPC, f"{path}: disk full (nothing was changed)") from e
        raise
