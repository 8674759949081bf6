"""Points numpy's `lapack_lite` (LAPACK translated to C by f2c) at OpenBLAS's BLAS.

numpy's patched meson build leaves out `f2c_blas.c`, lapack_lite's own unoptimised BLAS, when
a BLAS library is found, so LAPACK's `dgemm_`, `dtrsm_`, ... calls link to OpenBLAS. The two
disagree on return types where f2c follows old Fortran conventions: a BLAS subroutine returns
`int` in f2c's C and `void` in OpenBLAS, a single-precision function (`sdot_`) returns
`double` in f2c and `float` in OpenBLAS. Native linkers accept the difference; on wasm a call
whose signature differs from its definition is a link error. This rewrites lapack_lite's
declarations of the BLAS functions (the functions `f2c_blas.c` defines) to OpenBLAS's types.

Usage: lapack_lite_blas.py NUMPY_SOURCE_DIR
"""

import pathlib
import re
import sys

LAPACK_FILES = ["f2c_c_lapack.c", "f2c_d_lapack.c", "f2c_s_lapack.c", "f2c_z_lapack.c", "f2c_lapack.c"]
SUBROUTINE = "/* Subroutine */ int"
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


def retype(text, new_types):
    """`text` with the declarators named in `new_types` (name -> (old type, new type)) moved
    to declarations of their new type; returns the text and how many moved."""
    out, pos, moved = [], 0, 0
    while match := DECLARATION.search(text, pos):
        old_type = match.group(1)
        parts, end = declarators(text, match.end())
        name = lambda part: part.split("(", 1)[0].strip()
        retyped = [p for p in parts if new_types.get(name(p), (None,))[0] == old_type]
        out.append(text[pos : match.start()])
        if retyped:
            kept = [p for p in parts if p not in retyped]
            statements = [f"extern {old_type} {', '.join(kept)};"] if kept else []
            for new_type in sorted({new_types[name(p)][1] for p in retyped}):
                group = [p for p in retyped if new_types[name(p)][1] == new_type]
                statements.append(f"extern {new_type} {', '.join(group)};")
            out.append("\n    ".join(statements))
            moved += len(retyped)
        else:
            out.append(text[match.start() : end])
        pos = end
    out.append(text[pos:])
    return "".join(out), moved


def main():
    lite = pathlib.Path(sys.argv[1]) / "numpy/linalg/lapack_lite"
    blas = (lite / "f2c_blas.c").read_text()
    new_types = {name: (SUBROUTINE, "/* Subroutine */ void") for name in re.findall(r"^/\* Subroutine \*/ int ([a-z0-9]+_)\(", blas, re.M)}
    # f2c's REAL FUNCTIONs return double; OpenBLAS's return float.
    for name in re.findall(r"^doublereal (s[a-z0-9]+_)\(", blas, re.M):
        new_types[name] = ("doublereal", "real")
    if len(new_types) < 50:
        sys.exit(f"lapack_lite_blas.py: {lite / 'f2c_blas.c'} no longer looks like f2c's BLAS")
    moved = 0
    for name in LAPACK_FILES:
        path = lite / name
        text, count = retype(path.read_text(), new_types)
        path.write_text(text)
        moved += count
    if moved == 0:
        sys.exit(f"lapack_lite_blas.py: no BLAS declaration found in {lite}")


if __name__ == "__main__":
    main()
