"""Stands in for the linker of `cc -shared -o X.so objects... libraries...` in numpy's build.

Capsule links numpy's extension modules into the runtime as built-in modules, so each
`-shared` link (meson's way of making an extension module) writes `X.so` as a static archive
instead: the module's own objects plus the members of any thin archive on the command line
(meson's per-module helper libraries). Regular archives shared by several modules
(`libnpymath.a`, `libnpyrandom.a`) are linked once, by the runtime's own link.

Usage: static_extension.py LLVM_AR <the compiler's arguments>
"""

import os
import shlex
import subprocess
import sys


def expand(args):
    """Arguments with `@file` response files read in."""
    expanded = []
    for arg in args:
        if arg.startswith("@") and os.path.isfile(arg[1:]):
            with open(arg[1:]) as f:
                expanded += expand(shlex.split(f.read()))
        else:
            expanded.append(arg)
    return expanded


def is_thin(path):
    with open(path, "rb") as f:
        return f.read(8) == b"!<thin>\n"


def main():
    ar, args = sys.argv[1], expand(sys.argv[2:])
    output, objects = None, []
    for i, arg in enumerate(args):
        if arg == "-o":
            output = args[i + 1]
        elif arg.endswith(".o"):
            objects.append(arg)
        elif arg.endswith(".a") and is_thin(arg):
            listed = subprocess.run([ar, "t", arg], capture_output=True, text=True, check=True)
            objects += listed.stdout.split()
    if output is None:
        sys.exit("static_extension.py: the link names no output (-o)")
    names = [os.path.basename(o) for o in objects]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        sys.exit(f"static_extension.py: {output} would hold several members named {clashes}")
    if os.path.exists(output):
        os.remove(output)
    subprocess.run([ar, "qcsD", output, *objects], check=True)


if __name__ == "__main__":
    main()
