"""Pack the standard library and the `capsule` package into one bytecode blob.

Run by `cargo xtask build-runtime` with the native build CPython (same version as the Wasm
one, so the marshal format matches). The C runtime embeds the blob and, before the
interpreter imports anything from outside, runs its bootstrap code, which installs an
importer that loads modules from the blob's bytes in linear memory: no file system needed.

Layout (integers little-endian u32):
    b"CAPSULE\\x01" | len | marshal(bootstrap code) | len | marshal(index) | module code...
index: {module name: (is_package, origin path, offset, length)}, offsets from the blob start.
"""

import argparse
import marshal
import os
import struct

MAGIC = b"CAPSULE\x01"
# Left out: tests and tools that need a desktop, threads, processes or a package installer,
# none of which exist inside a WASI sandbox.
EXCLUDED_DIRS = {
    "__pycache__", "test", "tests", "idle_test", "idlelib", "tkinter", "turtledemo",
    "ensurepip", "venv", "pydoc_data", "site-packages", "__phello__",
}
EXCLUDED_FILES = {"turtle.py", "antigravity.py", "this.py"}
STDLIB_ORIGIN = "/lib/python3.13"
PACKAGE_ORIGIN = "/lib/capsule-sdk"
BOOTSTRAP = "_capsule_bootstrap.py"


def python_files(root):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS)
        for name in sorted(filenames):
            if name.endswith(".py") and name not in EXCLUDED_FILES and name != BOOTSTRAP:
                yield os.path.relpath(os.path.join(dirpath, name), root)


def module_name(relpath):
    parts = relpath[: -len(".py")].split(os.sep)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts.pop()
    return ".".join(parts), is_package


def compile_file(path, origin):
    with open(path, "rb") as f:
        source = f.read()
    # optimize=2 drops asserts and docstrings from the stdlib, as `python -OO` would.
    return compile(source, origin, "exec", dont_inherit=True, optimize=2)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--stdlib", required=True)
    parser.add_argument("--package", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    modules = {}
    for root, origin_root in ((args.stdlib, STDLIB_ORIGIN), (args.package, PACKAGE_ORIGIN)):
        for rel in python_files(root):
            name, is_package = module_name(rel)
            if not all(part.isidentifier() for part in name.split(".")):
                continue
            origin = f"{origin_root}/{rel}"
            try:
                code = compile_file(os.path.join(root, rel), origin)
            except SyntaxError as error:
                # A few stdlib files are templates or Python-2 leftovers; they cannot be imported.
                print(f"pack_modules: skipping {rel}: {error}")
                continue
            modules[name] = (is_package, origin, marshal.dumps(code))

    bootstrap = marshal.dumps(
        compile_file(os.path.join(args.package, BOOTSTRAP), f"{PACKAGE_ORIGIN}/{BOOTSTRAP}")
    )

    # Offsets depend on the index's own size; the index size depends on the offsets'
    # magnitudes, so iterate until the layout is stable (two rounds in practice).
    header_size = 0
    while True:
        offset = header_size
        index = {}
        for name in sorted(modules):
            is_package, origin, data = modules[name]
            index[name] = (is_package, origin, offset, len(data))
            offset += len(data)
        index_bytes = marshal.dumps(index)
        size = len(MAGIC) + 4 + len(bootstrap) + 4 + len(index_bytes)
        if size == header_size:
            break
        header_size = size

    with open(args.out, "wb") as out:
        out.write(MAGIC)
        out.write(struct.pack("<I", len(bootstrap)))
        out.write(bootstrap)
        out.write(struct.pack("<I", len(index_bytes)))
        out.write(index_bytes)
        for name in sorted(modules):
            out.write(modules[name][2])
    print(f"pack_modules: {len(modules)} modules, {offset / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
