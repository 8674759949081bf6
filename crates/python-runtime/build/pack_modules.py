"""Pack the standard library and the `capsule` package into one bytecode blob.

Run by `cargo xtask build-runtime` with the native build CPython (same version as the Wasm
one, so the marshal format matches). The C runtime embeds the blob and, before the
interpreter imports anything from outside, runs its bootstrap code, which installs an
importer that loads modules from the blob's bytes in linear memory: no file system needed.

Layout (integers little-endian u32):
    b"CAPSULE\\x02" | len | marshal(bootstrap code) | len | marshal(index) | contents...
index: ({module name: (is_package, origin path, offset, length)},
        {data file path: (offset, length)}), offsets from the blob start. Data files are the
non-Python files of packed wheels (`tzdata/zoneinfo/Europe/Paris`), read through
`importlib.resources`.
"""

import argparse
import marshal
import os
import struct
import zipfile

MAGIC = b"CAPSULE\x02"
# Left out: tests and tools that need a desktop, threads, processes or a package installer,
# none of which exist inside a WASI sandbox.
EXCLUDED_DIRS = {
    "__pycache__", "test", "tests", "idle_test", "idlelib", "tkinter", "turtledemo",
    "ensurepip", "venv", "pydoc_data", "site-packages", "__phello__",
}
EXCLUDED_FILES = {"turtle.py", "antigravity.py", "this.py"}
STDLIB_ORIGIN = "/lib/python3.13"
PACKAGE_ORIGIN = "/lib/capsule-sdk"
WHEEL_ORIGIN = "/lib/site-packages"
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
    # Modules CPython's build generates (`_sysconfigdata_*`), packed as top-level stdlib modules.
    parser.add_argument("--generated", action="append", default=[])
    # `FOLDER=NAME`: build folders, written as NAME in generated modules, so that the blob
    # does not depend on where it was built.
    parser.add_argument("--path-map", action="append", default=[])
    # Pure-Python wheels packed with the stdlib, their data files included (`tzdata`).
    parser.add_argument("--wheel", action="append", default=[])
    # A site-packages folder whose Python files are packed (the data flavour's numpy; its
    # extension modules are linked into the runtime instead).
    parser.add_argument("--site", action="append", default=[])
    # Files of the package only the host uses (the SDK), relative to `--package`.
    parser.add_argument("--leave-out", action="append", default=[])
    args = parser.parse_args()

    modules = {}
    for root, origin_root in ((args.stdlib, STDLIB_ORIGIN), (args.package, PACKAGE_ORIGIN)):
        for rel in python_files(root):
            if root == args.package and rel in args.leave_out:
                continue
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

    # The most specific folder first: one may lie inside another.
    path_maps = sorted((m.split("=", 1) for m in args.path_map), key=lambda m: -len(m[0]))

    def read_mapped(path):
        with open(path, encoding="utf-8") as f:
            source = f.read()
        for folder, shown in path_maps:
            source = source.replace(folder, shown)
        return source

    for root in args.site:
        for rel in python_files(root):
            name, is_package = module_name(rel)
            origin = f"{WHEEL_ORIGIN}/{rel}"
            # Build folders mapped: numpy's `__config__` records its compilers' paths.
            # Docstrings kept: numpy's code edits some of them while importing.
            code = compile(read_mapped(os.path.join(root, rel)), origin, "exec", dont_inherit=True)
            modules[name] = (is_package, origin, marshal.dumps(code))

    for path in args.generated:
        rel = os.path.basename(path)
        name, is_package = module_name(rel)
        source = read_mapped(path)
        origin = f"{STDLIB_ORIGIN}/{rel}"
        code = compile(source, origin, "exec", dont_inherit=True, optimize=2)
        modules[name] = (is_package, origin, marshal.dumps(code))

    resources = {}
    for wheel in args.wheel:
        with zipfile.ZipFile(wheel) as archive:
            for rel in sorted(archive.namelist()):
                if rel.endswith("/") or ".dist-info/" in rel:
                    continue
                if rel.endswith(".py"):
                    name, is_package = module_name(rel.replace("/", os.sep))
                    origin = f"{WHEEL_ORIGIN}/{rel}"
                    code = compile(archive.read(rel), origin, "exec", dont_inherit=True, optimize=2)
                    modules[name] = (is_package, origin, marshal.dumps(code))
                else:
                    resources[rel] = archive.read(rel)

    bootstrap = marshal.dumps(
        compile_file(os.path.join(args.package, BOOTSTRAP), f"{PACKAGE_ORIGIN}/{BOOTSTRAP}")
    )

    # Offsets depend on the index's own size; the index size depends on the offsets'
    # magnitudes, so iterate until the layout is stable (two rounds in practice).
    header_size = 0
    while True:
        offset = header_size
        index, data_index = {}, {}
        for name in sorted(modules):
            is_package, origin, data = modules[name]
            index[name] = (is_package, origin, offset, len(data))
            offset += len(data)
        for path in sorted(resources):
            data_index[path] = (offset, len(resources[path]))
            offset += len(resources[path])
        index_bytes = marshal.dumps((index, data_index))
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
        for path in sorted(resources):
            out.write(resources[path])
    print(f"pack_modules: {len(modules)} modules, {len(resources)} data files, {offset / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
