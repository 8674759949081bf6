"""Points numpy's `lapack_lite` (LAPACK translated to C by f2c) at OpenBLAS.

numpy's patched meson build leaves out `f2c_blas.c`, lapack_lite's own unoptimised BLAS, when
a BLAS library is found, so LAPACK's `dgemm_`, `dtrsm_`, ... calls link to OpenBLAS. The two
disagree on return types where f2c follows old Fortran conventions: a BLAS subroutine returns
`int` in f2c's C and `void` in OpenBLAS, a single-precision function (`sdot_`) returns
`double` in f2c and `float` in OpenBLAS. Native linkers accept the difference; on wasm a call
whose signature differs from its definition is a link error. This rewrites lapack_lite's
declarations of the BLAS functions (the functions `f2c_blas.c` defines) to OpenBLAS's types.

OpenBLAS also implements a few LAPACK routines itself, blocked and on its own kernels
(`OPENBLAS_LAPACK`), with the same signatures as f2c's. lapack_lite's definitions of those are
renamed out of the way, so every caller (numpy's `solve`, `det`, `inv`, `cholesky`, and
lapack_lite's own routines) gets OpenBLAS's. (Not its `?laed3`, which calls LAPACK helpers
declared with OpenBLAS's `void`.)

Usage: lapack_lite_blas.py LLVM_NM OPENBLAS_ARCHIVE NUMPY_SOURCE_DIR
"""

import pathlib
import re
import subprocess
import sys

LAPACK_FILES = ["f2c_c_lapack.c", "f2c_d_lapack.c", "f2c_s_lapack.c", "f2c_z_lapack.c", "f2c_lapack.c"]
SUBROUTINE = "/* Subroutine */ int"
# LU (`?getrf` and its panel `?getf2`, row swaps, solves), Cholesky, triangular inverses, and
# the products of triangular factors, in every precision.
OPENBLAS_LAPACK = [
    p + routine
    for p in "sdcz"
    for routine in ["gesv_", "getrf_", "getf2_", "getrs_", "laswp_", "potrf_", "potf2_", "trtri_", "trti2_", "lauum_", "lauu2_"]
]
# A declaration statement of functions of one return type, with one or more declarators.
DECLARATION = re.compile(r"extern (/\* Subroutine \*/ int|doublereal) ")


def declarators(text, start):
    """The comma-separated declarators from `start` to the `;` that ends the statement."""
    parts, depth, begin = [], 0, start
    for i in range(start, len(text)):
        c = text[i]
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif depth == 0 and c in ",;":
            parts.append(text[begin:i].strip())
            begin = i + 1
            if c == ";":
                return parts, i + 1
    raise ValueError(f"unterminated declaration at offset {start}")


def declared_name(declarator):
    return declarator.split("(", 1)[0].strip()


def retype(text, new_types):
    """`text` with the declarators named in `new_types` (name -> (old type, new type)) moved
    to declarations of their new type; returns the text and how many moved."""
    out, pos, moved = [], 0, 0
    while match := DECLARATION.search(text, pos):
        old_type = match.group(1)
        parts, end = declarators(text, match.end())
        retyped = [p for p in parts if new_types.get(declared_name(p), (None,))[0] == old_type]
        out.append(text[pos : match.start()])
        if retyped:
            kept = [p for p in parts if p not in retyped]
            statements = [f"extern {old_type} {', '.join(kept)};"] if kept else []
            for new_type in sorted({new_types[declared_name(p)][1] for p in retyped}):
                group = [p for p in retyped if new_types[declared_name(p)][1] == new_type]
                statements.append(f"extern {new_type} {', '.join(group)};")
            out.append("\n    ".join(statements))
            moved += len(retyped)
        else:
            out.append(text[match.start() : end])
        pos = end
    out.append(text[pos:])
    return "".join(out), moved


def archive_functions(nm, archive):
    """The Fortran-style names (`dgetrf_`) `archive` defines."""
    listed = subprocess.run([nm, "--defined-only", "-g", archive], capture_output=True, text=True, check=True)
    return {line.split()[-1] for line in listed.stdout.splitlines() if re.fullmatch(r"\S+ T [a-z0-9]+_", line)}


def main():
    nm, archive, source = sys.argv[1:]
    lite = pathlib.Path(source) / "numpy/linalg/lapack_lite"
    blas = (lite / "f2c_blas.c").read_text()
    new_types = {name: (SUBROUTINE, "/* Subroutine */ void") for name in re.findall(r"^/\* Subroutine \*/ int ([a-z0-9]+_)\(", blas, re.M)}
    # f2c's REAL FUNCTIONs return double; OpenBLAS's return float.
    for name in re.findall(r"^doublereal (s[a-z0-9]+_)\(", blas, re.M):
        new_types[name] = ("doublereal", "real")
    if len(new_types) < 50:
        sys.exit(f"lapack_lite_blas.py: {lite / 'f2c_blas.c'} no longer looks like f2c's BLAS")
    missing = sorted(set(OPENBLAS_LAPACK) - archive_functions(nm, archive))
    if missing:
        sys.exit(f"lapack_lite_blas.py: {archive} does not define {missing}; is it OpenBLAS with its LAPACK?")
    # A definition starts a line: `/* Subroutine */ int dgetrf_(integer *m, ...`.
    superseded = re.compile(r"^(/\* Subroutine \*/ int) (%s)\(" % "|".join(OPENBLAS_LAPACK), re.M)
    moved = renamed = 0
    for name in LAPACK_FILES:
        path = lite / name
        text, count = retype(path.read_text(), new_types)
        moved += count
        text, count = superseded.subn(r"\1 superseded_\2(", text)
        renamed += count
        path.write_text(text)
    if moved == 0:
        sys.exit(f"lapack_lite_blas.py: no BLAS declaration found in {lite}")
    if renamed != len(OPENBLAS_LAPACK):
        sys.exit(f"lapack_lite_blas.py: renamed {renamed} of lapack_lite's {len(OPENBLAS_LAPACK)} routines OpenBLAS replaces")


if __name__ == "__main__":
    main()
