/*
 * Capsule's CPython reactor: the Wasm exports the host calls, the `_capsule` built-in module,
 * and the embedded bytecode of the stdlib and the `capsule` package.
 *
 * The ABI is written down in crates/python-runtime/ABI.md and mirrored by the Rust types in
 * crates/python-runtime/src/lib.rs; change all three together.
 */
#define Py_BUILD_CORE_MODULE 1 /* for pymalloc's state, laid out before the snapshot */
#include "Python.h"
#include "marshal.h"
#include "internal/pycore_interp.h"

#ifndef WITH_PYMALLOC
#error "the runtime is configured --with-pymalloc (crates/xtask/src/runtime.rs)"
#endif

#include <stdint.h>
#include <stdio.h>
#include <wasi/api.h>
#include <wasi/libc.h>
#include <stdlib.h>
#include <string.h>

#ifdef CAPSULE_BUILTIN_MODULES
#include "builtin_modules.h" /* generated: `builtin_modules`, an `_inittab` table */
#endif

#define EXPORT(name) __attribute__((export_name(name)))
#define HOST_IMPORT(name) __attribute__((import_module("capsule"), import_name(name)))

/* Produced by build/pack_modules.py; see the layout described there. */
static const unsigned char MODULE_BLOB[] = {
#embed "capsule_modules.bin"
};

/* ---- host imports --------------------------------------------------------------------- */

/* Sends a JSON request to the host; returns the length of the host's JSON reply, which the
 * guest then copies into its own memory with `host_reply`. */
HOST_IMPORT("host_call") int32_t capsule_host_call(const uint8_t *request, int32_t len);
HOST_IMPORT("host_reply") void capsule_host_reply(uint8_t *destination);

static PyObject *capsule_host_call_py(PyObject *self, PyObject *arg) {
    Py_buffer request;
    if (PyObject_GetBuffer(arg, &request, PyBUF_SIMPLE) < 0) return NULL;
    if (request.len > INT32_MAX) {
        PyBuffer_Release(&request);
        PyErr_SetString(PyExc_ValueError, "host request too large");
        return NULL;
    }
    int32_t reply_len = capsule_host_call(request.buf, (int32_t)request.len);
    PyBuffer_Release(&request);
    if (reply_len < 0) {
        PyErr_SetString(PyExc_RuntimeError, "the host rejected the request");
        return NULL;
    }
    PyObject *reply = PyBytes_FromStringAndSize(NULL, reply_len);
    if (reply == NULL) return NULL;
    capsule_host_reply((uint8_t *)PyBytes_AS_STRING(reply));
    return reply;
}

/* ---- making the snapshot's heap read-mostly ------------------------------------------- */

/* Every instance starts from a copy-on-write mapping of the snapshot, and the first write to
 * a page costs a page fault and a copy. Reference counting writes to every object a task
 * merely looks at; an immortal object's count is never written. Objects that exist at
 * snapshot time are shared by the whole run anyway, so making them immortal changes nothing
 * but the writes (each instance is discarded after one task, so nothing leaks for long). */
static int immortalize_object(PyObject *op, void *unused);

static void immortalize_referents(PyObject *op) {
    traverseproc traverse = Py_TYPE(op)->tp_traverse;
    if (traverse != NULL) traverse(op, immortalize_object, NULL);
    if (PyCode_Check(op)) {
        /* Code objects are not traversable, but their constants and names are read (and so
         * reference-counted) on every execution. */
        PyCodeObject *code = (PyCodeObject *)op;
        immortalize_object(code->co_consts, NULL);
        immortalize_object(code->co_names, NULL);
        immortalize_object(code->co_localsplusnames, NULL);
    }
}

static int immortalize_object(PyObject *op, void *unused) {
    (void)unused;
    if (op == NULL || _Py_IsImmortal(op)) return 0;
    op->ob_refcnt = _Py_IMMORTAL_REFCNT;
    /* Tracked containers are all in the list given to `immortalize`; untracked ones (tuples of
     * strings, code objects) are only reachable from there, so follow them here. */
    if (!PyObject_GC_IsTracked(op)) immortalize_referents(op);
    return 0;
}

static PyObject *capsule_immortalize(PyObject *self, PyObject *objects) {
    if (!PyList_Check(objects)) {
        PyErr_SetString(PyExc_TypeError, "immortalize() takes the list from gc.get_objects()");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(objects); i++) {
        PyObject *op = PyList_GET_ITEM(objects, i);
        immortalize_referents(op);
        op->ob_refcnt = _Py_IMMORTAL_REFCNT;
    }
    Py_RETURN_NONE;
}

static PyMethodDef capsule_methods[] = {
    {"host_call", capsule_host_call_py, METH_O,
     "host_call(request: bytes) -> bytes: send a JSON request to the host, return its reply."},
    {"immortalize", capsule_immortalize, METH_O,
     "immortalize(objects: list): make these objects and what they reference immortal."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef capsule_module = {
    PyModuleDef_HEAD_INIT, "_capsule", "Calls from the sandbox to the Capsule host.", -1,
    capsule_methods,
};

static PyObject *init_capsule_module(void) { return PyModule_Create(&capsule_module); }

/* ---- helpers -------------------------------------------------------------------------- */

/* Reports the pending Python exception and stops the instance: used where nothing better can
 * be done (the interpreter could not start or the runtime's own code failed). */
static _Noreturn void fatal_python_error(const char *what) {
    fprintf(stderr, "capsule runtime: %s\n", what);
    if (PyErr_Occurred()) PyErr_Print();
    fflush(stderr);
    __builtin_trap();
}

static _Noreturn void fatal_status(const char *what, PyStatus status) {
    fprintf(stderr, "capsule runtime: %s: %s%s%s\n", what, status.func ? status.func : "",
            status.func ? ": " : "", status.err_msg ? status.err_msg : "");
    fflush(stderr);
    __builtin_trap();
}

/* A buffer handed to the host: (pointer << 32) | length, or 0 when allocation failed. */
static int64_t hand_to_host(const char *data, Py_ssize_t len) {
    char *copy = malloc((size_t)len + 1);
    if (copy == NULL) return 0;
    memcpy(copy, data, (size_t)len);
    return (int64_t)(((uint64_t)(uintptr_t)copy << 32) | (uint64_t)(uint32_t)len);
}

static int64_t hand_bytes_to_host(PyObject *bytes) {
    return hand_to_host(PyBytes_AS_STRING(bytes), PyBytes_GET_SIZE(bytes));
}

static PyObject *runtime_module = NULL;

static PyObject *call_runtime(const char *function, PyObject *arg) {
    PyObject *callable = PyObject_GetAttrString(runtime_module, function);
    if (callable == NULL) return NULL;
    PyObject *result = arg ? PyObject_CallOneArg(callable, arg) : PyObject_CallNoArgs(callable);
    Py_DECREF(callable);
    return result;
}

/* ---- exports -------------------------------------------------------------------------- */

EXPORT("capsule_alloc") void *capsule_alloc(int32_t size) { return malloc((size_t)size); }

EXPORT("capsule_free") void capsule_free(void *pointer) { free(pointer); }

static void start_interpreter(void) {
    PyStatus status;
    PyConfig config;
    PyConfig_InitIsolatedConfig(&config);
    config.site_import = 0;
    config.write_bytecode = 0;
    config.buffered_stdio = 0;           /* task output reaches the host as it is printed */
    config.install_signal_handlers = 0;
    config.pathconfig_warnings = 0;
    config.module_search_paths_set = 1;  /* empty: nothing is imported from a file system */
    config.use_hash_seed = 1;            /* a snapshot needs one seed for all its instances */
    const char *seed = getenv("CAPSULE_HASH_SEED");
    config.hash_seed = seed ? strtoul(seed, NULL, 10) : 0;
    config._init_main = 0;               /* stop after the core: install the importer first */

    status = PyConfig_SetString(&config, &config.home, L"/lib/python3.13");
    if (PyStatus_Exception(status)) fatal_status("configuring the interpreter", status);
    status = Py_InitializeFromConfig(&config);
    PyConfig_Clear(&config);
    if (PyStatus_Exception(status)) fatal_status("starting the interpreter core", status);

    /* Install the in-memory importer, then finish initialisation, which imports `encodings`
     * and friends through it. */
    PyObject *bootstrap_module = PyImport_AddModule("_capsule_bootstrap"); /* borrowed */
    if (bootstrap_module == NULL) fatal_python_error("creating the importer module");
    PyObject *globals = PyModule_GetDict(bootstrap_module);
    PyObject *blob = PyMemoryView_FromMemory((char *)MODULE_BLOB, sizeof(MODULE_BLOB), PyBUF_READ);
    if (blob == NULL || PyDict_SetItemString(globals, "_blob", blob) < 0)
        fatal_python_error("exposing the module blob");
    Py_DECREF(blob);
    if (PyDict_SetItemString(globals, "__builtins__", PyEval_GetBuiltins()) < 0)
        fatal_python_error("preparing the importer module");

    uint32_t bootstrap_len;
    memcpy(&bootstrap_len, MODULE_BLOB + 8, sizeof bootstrap_len);
    PyObject *code =
        PyMarshal_ReadObjectFromString((const char *)MODULE_BLOB + 12, (Py_ssize_t)bootstrap_len);
    if (code == NULL) fatal_python_error("reading the importer's bytecode");
    PyObject *done = PyEval_EvalCode(code, globals, globals);
    Py_DECREF(code);
    if (done == NULL) fatal_python_error("installing the importer");
    Py_DECREF(done);

    status = _Py_InitializeMain();
    if (PyStatus_Exception(status)) fatal_status("finishing interpreter initialisation", status);
}

/* ---- where a run's small objects go --------------------------------------------------
 *
 * When a sandbox slot is reused, wasmtime copies back the pages the last run wrote and keeps
 * them mapped, but only the first 32 separate stretches of written pages: every page a run
 * writes past those costs a page fault in every run. pymalloc serves each size class from
 * that class's current pool, one page each, and after start-up those pools are scattered over
 * the heap. Before the snapshot, every class is given a fresh pool, all of them adjacent in one
 * arena in the data segment, so that a run's new small objects land on a few neighbouring
 * pages low in memory (BENCHMARKS.md: no page faults per run, against six without pymalloc). */

static _Alignas(POOL_SIZE) unsigned char fresh_pools[ARENA_SIZE];
static PyObjectArenaAllocator heap_arenas;
static int fresh_pools_wanted;

static void *arena_alloc(void *ctx, size_t size) {
    if (fresh_pools_wanted && size == sizeof fresh_pools) {
        fresh_pools_wanted = 0;
        return fresh_pools;
    }
    return heap_arenas.alloc(heap_arenas.ctx, size);
}

static void arena_free(void *ctx, void *arena, size_t size) {
    /* Never reached for `fresh_pools`: every pool there keeps the block that opened it. */
    if (arena != fresh_pools) heap_arenas.free(heap_arenas.ctx, arena, size);
}

static void *small_block(size_t size) {
    void *block = PyObject_Malloc(size);
    if (block == NULL) fatal_python_error("laying out the small-object pools");
    return block;
}

/* Blocks taken here are never freed: they are what keeps the layout. */
static void give_every_size_class_a_fresh_pool(void) {
    struct _obmalloc_state *state = PyInterpreterState_Get()->obmalloc;
    PyObjectArenaAllocator ours = {NULL, arena_alloc, arena_free};
    PyObject_GetArenaAllocator(&heap_arenas);
    PyObject_SetArenaAllocator(&ours);
    /* Use up the heap arenas' free pools, so that the next pool comes from a new arena... */
    while (state->mgmt.usable_arenas != NULL) small_block(SMALL_REQUEST_THRESHOLD);
    /* ...and every class's partly used pools, so that its next block needs a new pool. */
    for (unsigned class = 0; class < NB_SMALL_SIZE_CLASSES; class++) {
        for (;;) {
            poolp head = state->pools.used[class + class];
            if (head == head->nextpool) break;
            small_block(INDEX2SIZE(class));
        }
    }
    /* The first class's block makes the new arena: ours. */
    fresh_pools_wanted = 1;
    for (unsigned class = 0; class < NB_SMALL_SIZE_CLASSES; class++) small_block(INDEX2SIZE(class));
    if (fresh_pools_wanted) fatal_python_error("laying out the small-object pools: no new arena");
}

/* Wizer's initialisation entry: start Python, import the `capsule` package and the user's
 * module (described by the JSON request the build writes to stdin), then return so that
 * Wizer can snapshot the memory. A failure in user code traps after printing its traceback
 * on stderr, which the build shows to the user. */
EXPORT("capsule_initialize") void capsule_initialize(void) {
    if (PyImport_AppendInittab("_capsule", init_capsule_module) < 0)
        fatal_status("registering `_capsule`", PyStatus_Error("PyImport_AppendInittab failed"));
#ifdef CAPSULE_BUILTIN_MODULES
    /* The data flavour's extension modules (numpy's), linked in; dotted names are found by
     * the built-in importer before any package's `__path__` is searched. */
    if (PyImport_ExtendInittab(builtin_modules) < 0)
        fatal_status("registering the built-in extension modules", PyStatus_Error("PyImport_ExtendInittab failed"));
#endif
    start_interpreter();
    runtime_module = PyImport_ImportModule("_capsule_dispatch");
    if (runtime_module == NULL) fatal_python_error("importing _capsule_dispatch");
    PyObject *failure = call_runtime("initialize", NULL);
    if (failure == NULL) fatal_python_error("initialising the user module");
    if (failure != Py_None) {
        /* The user's module raised: report its traceback (already trimmed to user frames). */
        const char *text = PyUnicode_AsUTF8(failure);
        fputs(text ? text : "the user module failed to import\n", stderr);
        fflush(stderr);
        __builtin_trap();
    }
    Py_DECREF(failure);
    give_every_size_class_a_fresh_pool();
}

/* The registered tasks as JSON: packed (pointer << 32) | length; the host frees the buffer. */
EXPORT("capsule_describe") int64_t capsule_describe(void) {
    PyObject *description = call_runtime("describe", NULL);
    if (description == NULL) fatal_python_error("describing the tasks");
    int64_t packed = hand_bytes_to_host(description);
    Py_DECREF(description);
    return packed;
}

/* wasi-libc learns the preopened directories once, in its constructors, which ran while the
 * build snapshotted the module (with none). Tell it about this instance's own preopens, the
 * directories granted by the task's `allowed_files`, so that paths resolve against them. */
static void register_preopens(void) {
    for (__wasi_fd_t fd = 3;; fd++) {
        __wasi_prestat_t prestat;
        if (__wasi_fd_prestat_get(fd, &prestat) != __WASI_ERRNO_SUCCESS) return;
        if (prestat.tag != __WASI_PREOPENTYPE_DIR) continue;
        size_t len = prestat.u.dir.pr_name_len;
        char *name = malloc(len + 1);
        if (name == NULL) return;
        if (__wasi_fd_prestat_dir_name(fd, (uint8_t *)name, len) == __WASI_ERRNO_SUCCESS) {
            name[len] = '\0';
            __wasilibc_register_preopened_fd((int)fd, name); /* keeps `name` */
        } else {
            free(name);
        }
    }
}

/* Runs one task. `request` is JSON (see ABI.md); the reply is JSON, packed as for
 * `capsule_describe`. The request buffer stays owned by the host. */
EXPORT("capsule_invoke") int64_t capsule_invoke(const char *request, int32_t len) {
    register_preopens();
    PyObject *view = PyMemoryView_FromMemory((char *)request, len, PyBUF_READ);
    if (view == NULL) fatal_python_error("reading the request");
    PyObject *reply = call_runtime("invoke", view);
    Py_DECREF(view);
    if (reply == NULL) fatal_python_error("running the task dispatcher");
    int64_t packed = hand_bytes_to_host(reply);
    Py_DECREF(reply);
    return packed;
}
