"""Gathers a package's extension modules, built as static archives, for the runtime's link.

Usage: collect_archives.py LLVM_AR SITE_PACKAGES PACKAGE OUT_DIR [HELPER_ARCHIVE...]

Each `PACKAGE/**/X.cpython-313-wasm32-wasi.so` under SITE_PACKAGES (an archive, see
static_extension.py) becomes `OUT_DIR/lib<dotted module name>.a`. Members identical in name
and bytes in several modules (numpy's lapack_lite objects, pandas' tokenizer) move to
`libshared.a`, or the static link would define them twice. The helper archives (static
libraries of the build that several modules link) are copied. `OUT_DIR/modules.tsv` lists,
per module, its dotted name, its init function and its archive, in that order.
"""

import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

SUFFIX = ".cpython-313-wasm32-wasi.so"
SHARED_ARCHIVE = "libshared.a"


def main():
    ar, site, package, out, *helpers = sys.argv[1:]
    os.makedirs(out, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="collect-archives-") as scratch:
        members = {}  # dotted name -> [(member name, extracted path, sha256)]
        for archive in sorted(glob.glob(os.path.join(site, package, "**", "*" + SUFFIX), recursive=True)):
            dotted = os.path.relpath(archive, site)[: -len(SUFFIX)].replace(os.sep, ".")
            folder = os.path.join(scratch, dotted)
            os.makedirs(folder)
            names = subprocess.run([ar, "t", archive], capture_output=True, text=True, check=True).stdout.split()
            subprocess.run([ar, "x", os.path.abspath(archive)], cwd=folder, check=True)
            members[dotted] = []
            for name in names:
                path = os.path.join(folder, name)
                with open(path, "rb") as f:
                    members[dotted].append((name, path, hashlib.sha256(f.read()).hexdigest()))
        owners = {}
        for dotted, listed in members.items():
            for name, _, digest in listed:
                owners.setdefault((name, digest), set()).add(dotted)
        shared = {key for key, modules in owners.items() if len(modules) > 1}
        if shared:
            seen, objects = set(), []
            for listed in members.values():
                for name, path, digest in listed:
                    if (name, digest) in shared and (name, digest) not in seen:
                        seen.add((name, digest))
                        objects.append(path)
            subprocess.run([ar, "qcsD", os.path.join(out, SHARED_ARCHIVE), *objects], check=True)
        rows = []
        for dotted, listed in members.items():
            archive = f"lib{dotted}.a"
            own = [path for name, path, digest in listed if (name, digest) not in shared]
            subprocess.run([ar, "qcsD", os.path.join(out, archive), *own], check=True)
            rows.append(f"{dotted}\tPyInit_{dotted.rsplit('.', 1)[1]}\t{archive}\n")
    for helper in helpers:
        shutil.copyfile(helper, os.path.join(out, os.path.basename(helper)))
    with open(os.path.join(out, "modules.tsv"), "w") as f:
        f.writelines(rows)
    print(f"collect_archives: {package}: {len(rows)} modules, {len(shared)} shared members")


if __name__ == "__main__":
    main()
