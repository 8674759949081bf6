"""The importer that serves modules from memory inside the sandbox.

The C runtime executes this file (as precompiled bytecode) right after the interpreter's core
is up and before it imports anything from outside: at that point only built-in and frozen
modules exist. `_blob` is a read-only memoryview of the module blob that
`build/pack_modules.py` produced and the C code embedded in the Wasm image.

The sandbox has no file system for code, so every import after this point is served from that
blob (the stdlib and the `capsule` package) or from the user's sources that the build handed
in at initialisation. Since the blob lives in the module's data, it is part of every snapshot
and a module first imported at run time loads exactly as it would have at build time.
"""

import marshal
import sys
from _frozen_importlib import ModuleSpec


# Where the modules of packed wheels are, as their `__file__` says (see pack_modules.py).
PACKED_WHEELS = "/lib/site-packages/"


class MemoryImporter:
    """A meta-path finder and loader over code held in linear memory."""

    def __init__(self, blob):
        self._blob = blob
        magic_size = 8
        bootstrap_size = int.from_bytes(blob[magic_size : magic_size + 4], "little")
        index_at = magic_size + 4 + bootstrap_size
        index_size = int.from_bytes(blob[index_at : index_at + 4], "little")
        # name -> (is_package, origin, offset, length) for the packed modules, and
        # path -> (offset, length) for the data files of packed wheels
        self._packed, self._data = marshal.loads(blob[index_at + 4 : index_at + 4 + index_size])
        # name -> (is_package, origin, code) for the user's modules
        self._user = {}
        # path -> bytes: data files of the user's third-party packages
        self._user_data = {}
        # name -> functions to call with the module once it has been imported
        self._after_import = {}

    def after_import(self, name, hook):
        """Call `hook(module)` when `name` is first imported (now, if it already is)."""
        if name in sys.modules:
            hook(sys.modules[name])
        else:
            self._after_import.setdefault(name, []).append(hook)

    def add_user_module(self, name, origin, source, is_package):
        """Compile a user module now, so it can be imported later without any file."""
        code = compile(source, origin, "exec", dont_inherit=True)
        self._user[name] = (is_package, origin, code)

    def add_user_data(self, path, contents):
        self._user_data[path] = contents

    def read_data(self, path):
        """A data file's bytes, by path: the user's (as `__file__` paths make them), else
        a packed wheel's, by its path in the wheel or as its modules' `__file__` makes it
        (`pkgutil.get_data`); None if there is none."""
        if path in self._user_data:
            return self._user_data[path]
        entry = self._data.get(path.removeprefix(PACKED_WHEELS))
        if entry is None:
            return None
        offset, length = entry
        return bytes(self._blob[offset : offset + length])

    def data_paths(self):
        return [*self._user_data, *self._data]

    def get_data(self, path):
        """`pkgutil.get_data` support."""
        contents = self.read_data(path)
        if contents is None:
            raise FileNotFoundError(path)
        return contents

    def find_spec(self, name, path=None, target=None):
        entry = self._user.get(name) or self._packed.get(name)
        if entry is None:
            return None
        is_package, origin = entry[0], entry[1]
        spec = ModuleSpec(name, self, origin=origin, is_package=is_package)
        spec.has_location = True
        return spec

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        name = module.__spec__.name
        exec(self.get_code(name), module.__dict__)
        for hook in self._after_import.pop(name, ()):
            hook(module)

    def get_code(self, name):
        if name in self._user:
            return self._user[name][2]
        _, _, offset, length = self._packed[name]
        return marshal.loads(self._blob[offset : offset + length])

    def get_resource_reader(self, name):
        """`importlib.resources` support for packages that carry data files."""
        if name in self._user and self._user[name][0]:
            return _PackedFiles(self, self._user[name][1].rpartition("/")[0])
        if name in self._packed and self._packed[name][0]:
            return _PackedFiles(self, name.replace(".", "/"))
        return None

    def is_package(self, name):
        entry = self._user.get(name) or self._packed.get(name)
        if entry is None:
            raise ImportError(f"no module named {name!r}", name=name)
        return entry[0]


class _PackedFiles:
    """A read-only `importlib.resources` Traversable (and its reader) over the data files
    below `path`."""

    def __init__(self, importer, path):
        self._importer = importer
        self._path = path
        self.name = path.rpartition("/")[2]

    def files(self):
        return self

    def _children(self):
        prefix = self._path + "/"
        paths = self._importer.data_paths()
        return sorted({p[len(prefix) :].partition("/")[0] for p in paths if p.startswith(prefix)})

    def is_file(self):
        return self._importer.read_data(self._path) is not None

    def is_dir(self):
        return bool(self._children())

    def iterdir(self):
        return iter([_PackedFiles(self._importer, f"{self._path}/{name}") for name in self._children()])

    def joinpath(self, *parts):
        path = "/".join([self._path, *(str(p).strip("/") for p in parts)])
        return _PackedFiles(self._importer, path)

    __truediv__ = joinpath

    def read_bytes(self):
        return self._importer.get_data(self._path)

    def read_text(self, encoding=None):
        return self.read_bytes().decode(encoding or "utf-8")

    def open(self, mode="r", *args, **kwargs):
        import io

        data = io.BytesIO(self.read_bytes())
        return data if "b" in mode else io.TextIOWrapper(data, *args, **kwargs)

    def __repr__(self):
        return f"<packed {self._path}>"


IMPORTER = MemoryImporter(_blob)  # noqa: F821 (`_blob` is set by the C runtime)
sys.meta_path.append(IMPORTER)
