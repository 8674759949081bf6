/* Linked into the instrumented CPython of the profile-guided build only (never into a
 * runtime), for its training run:
 * - writes the profile counters to `$CAPSULE_PROFILE_FILE` when the interpreter exits. The
 *   counting is LLVM's profile runtime, compiled from the `minicov` crate's copy of it
 *   (Debian's wasm32 compiler-rt has none); these are the hooks that copy leaves to its host.
 * - makes what the file system reports the same on every run and machine, so that the counts
 *   are: file times are one fixed instant, a file's inode number is a hash of the path it was
 *   reached by, directories have one size and list their entries sorted by name. (The host's
 *   inode numbers and times differ between runs, and converting them to Python ints or
 *   floats takes a different number of steps for different values.) The link wraps
 *   wasi-libc's functions with these (`-Wl,--wrap=...`). */

#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <wasi/api.h>

#include "InstrProfiling.h"
#include "InstrProfilingInternal.h"

/* Instrumented code refers to this symbol so that a runtime gets linked. */
int __llvm_profile_runtime;

/* Value profiling (indirect call targets, memcpy sizes) allocates its records here. */
void *minicov_alloc_zeroed(size_t size, size_t align) {
    (void)align; /* calloc's alignment covers the records'. */
    return calloc(1, size);
}

void minicov_dealloc(void *ptr, size_t size, size_t align) {
    (void)size;
    (void)align;
    free(ptr);
}

static uint32_t write_to_file(ProfDataWriter *writer, ProfDataIOVec *vecs, uint32_t count) {
    FILE *file = writer->WriterCtx;
    for (uint32_t i = 0; i < count; i++) {
        size_t length = vecs[i].ElmSize * vecs[i].NumElm;
        if (vecs[i].Data && !vecs[i].UseZeroPadding) {
            if (fwrite(vecs[i].Data, 1, length, file) != length) return 1;
        } else {
            for (size_t j = 0; j < length; j++) {
                if (fputc(0, file) == EOF) return 1;
            }
        }
    }
    return 0;
}

static void write_profile(void) {
    const char *path = getenv("CAPSULE_PROFILE_FILE");
    if (!path) return;
    FILE *file = fopen(path, "wb");
    ProfDataWriter writer = {write_to_file, file};
    /* With the value-profile reader: the plain buffer writer would leave value data out. */
    int failed = !file || lprofWriteData(&writer, lprofGetVPDataReader(), 0) != 0;
    if ((file && fclose(file) != 0) || failed) fprintf(stderr, "profile: could not write %s\n", path);
}

__attribute__((constructor)) static void register_profile_writer(void) { atexit(write_profile); }

/* 2024-01-01T00:00:00Z, in nanoseconds: every file's access, modification and change time. */
#define FIXED_FILE_TIME 1704067200000000000ull
/* Every directory's size: the host's grows with the directory's history, not its entries. */
#define FIXED_DIRECTORY_SIZE 4096

/* The path each open descriptor was opened by, indexed by descriptor. Inode numbers are
 * derived from paths: the host's depend on what else it created and deleted meanwhile (it
 * reuses the numbers of deleted files), and Python keys dicts and sets by them. */
static char **fd_paths;
static size_t fd_paths_length;

static void set_fd_path(__wasi_fd_t fd, char *path) {
    if (fd >= fd_paths_length) {
        size_t length = fd_paths_length ? 2 * fd_paths_length : 64;
        while (length <= fd) length *= 2;
        fd_paths = realloc(fd_paths, length * sizeof *fd_paths);
        if (!fd_paths) abort();
        memset(fd_paths + fd_paths_length, 0, (length - fd_paths_length) * sizeof *fd_paths);
        fd_paths_length = length;
    }
    free(fd_paths[fd]);
    fd_paths[fd] = path;
}

/* The path `fd` was opened by; a preopened folder's is its name; NULL for the standard
 * streams and anything else opened without a path. */
static const char *fd_path(__wasi_fd_t fd) {
    if (fd < fd_paths_length && fd_paths[fd]) return fd_paths[fd];
    __wasi_prestat_t prestat;
    if (__wasi_fd_prestat_get(fd, &prestat) != 0 || prestat.tag != __WASI_PREOPENTYPE_DIR) return NULL;
    char *name = calloc(1, prestat.u.dir.pr_name_len + 1);
    if (!name) abort();
    if (__wasi_fd_prestat_dir_name(fd, (uint8_t *)name, prestat.u.dir.pr_name_len) != 0) {
        free(name);
        return NULL;
    }
    set_fd_path(fd, name);
    return name;
}

/* `relative` below `base`, with `.`, `..` and repeated slashes resolved as names (the
 * training's folders have no symbolic links that would make that wrong). */
static char *join_path(const char *base, const char *relative) {
    size_t capacity = strlen(base) + strlen(relative) + 3;
    char *joined = malloc(capacity), *out = malloc(capacity);
    if (!joined || !out) abort();
    snprintf(joined, capacity, "%s/%s", base, relative);
    size_t length = 0;
    for (const char *name = joined; *name;) {
        size_t name_length = strcspn(name, "/");
        if (name_length == 2 && name[0] == '.' && name[1] == '.') {
            while (length > 0 && out[length - 1] != '/') length--;
            if (length > 0) length--;
        } else if (name_length > 0 && !(name_length == 1 && name[0] == '.')) {
            out[length++] = '/';
            memcpy(out + length, name, name_length);
            length += name_length;
        }
        name += name_length;
        if (*name == '/') name++;
    }
    if (length == 0) out[length++] = '/';
    out[length] = '\0';
    free(joined);
    return out;
}

/* FNV-1a: a 64-bit number per path, never 0. */
static __wasi_inode_t path_inode(const char *path) {
    uint64_t hash = 0xcbf29ce484222325ull;
    for (const unsigned char *c = (const unsigned char *)path; *c; c++) hash = (hash ^ *c) * 0x100000001b3ull;
    return hash ? hash : 1;
}

static __wasi_inode_t fd_inode(__wasi_fd_t fd) {
    const char *path = fd_path(fd);
    if (path) return path_inode(path);
    char name[32];
    snprintf(name, sizeof name, "<fd %u>", (unsigned)fd);
    return path_inode(name);
}

static void stabilise(__wasi_filestat_t *stat, __wasi_inode_t ino) {
    stat->ino = ino;
    stat->dev = 1;
    stat->atim = stat->mtim = stat->ctim = FIXED_FILE_TIME;
    if (stat->filetype == __WASI_FILETYPE_DIRECTORY) stat->size = FIXED_DIRECTORY_SIZE;
}

__wasi_errno_t __real___wasi_fd_filestat_get(__wasi_fd_t fd, __wasi_filestat_t *stat);
__wasi_errno_t __real___wasi_path_filestat_get(__wasi_fd_t fd, __wasi_lookupflags_t flags, const char *path,
                                               __wasi_filestat_t *stat);
__wasi_errno_t __real___wasi_path_open(__wasi_fd_t fd, __wasi_lookupflags_t dirflags, const char *path,
                                       __wasi_oflags_t oflags, __wasi_rights_t rights_base,
                                       __wasi_rights_t rights_inheriting, __wasi_fdflags_t fdflags,
                                       __wasi_fd_t *opened);
__wasi_errno_t __real___wasi_fd_close(__wasi_fd_t fd);
__wasi_errno_t __real___wasi_fd_renumber(__wasi_fd_t fd, __wasi_fd_t to);

/* A path below `fd`'s, or the path alone when `fd`'s is unknown. */
static char *path_below(__wasi_fd_t fd, const char *path) {
    const char *base = fd_path(fd);
    return join_path(base ? base : "", path);
}

__wasi_errno_t __wrap___wasi_fd_filestat_get(__wasi_fd_t fd, __wasi_filestat_t *stat) {
    __wasi_errno_t error = __real___wasi_fd_filestat_get(fd, stat);
    if (!error) stabilise(stat, fd_inode(fd));
    return error;
}

__wasi_errno_t __wrap___wasi_path_filestat_get(__wasi_fd_t fd, __wasi_lookupflags_t flags, const char *path,
                                               __wasi_filestat_t *stat) {
    __wasi_errno_t error = __real___wasi_path_filestat_get(fd, flags, path, stat);
    if (!error) {
        char *full = path_below(fd, path);
        stabilise(stat, path_inode(full));
        free(full);
    }
    return error;
}

__wasi_errno_t __wrap___wasi_path_open(__wasi_fd_t fd, __wasi_lookupflags_t dirflags, const char *path,
                                       __wasi_oflags_t oflags, __wasi_rights_t rights_base,
                                       __wasi_rights_t rights_inheriting, __wasi_fdflags_t fdflags,
                                       __wasi_fd_t *opened) {
    __wasi_errno_t error =
        __real___wasi_path_open(fd, dirflags, path, oflags, rights_base, rights_inheriting, fdflags, opened);
    if (!error) set_fd_path(*opened, path_below(fd, path));
    return error;
}

__wasi_errno_t __wrap___wasi_fd_close(__wasi_fd_t fd) {
    __wasi_errno_t error = __real___wasi_fd_close(fd);
    if (!error && fd < fd_paths_length) set_fd_path(fd, NULL);
    return error;
}

__wasi_errno_t __wrap___wasi_fd_renumber(__wasi_fd_t fd, __wasi_fd_t to) {
    __wasi_errno_t error = __real___wasi_fd_renumber(fd, to);
    if (!error && fd != to) {
        const char *path = fd < fd_paths_length ? fd_paths[fd] : NULL;
        set_fd_path(to, path ? strdup(path) : NULL);
        if (fd < fd_paths_length) set_fd_path(fd, NULL);
    }
    return error;
}

/* An open directory's entries, read in full when it is opened and sorted by name. */
struct sorted_dir {
    DIR *dir;
    struct dirent **entries;
    size_t count, next;
    struct sorted_dir *older;
};
static struct sorted_dir *open_dirs;

DIR *__real_opendir(const char *path);
DIR *__real_fdopendir(int fd);
struct dirent *__real_readdir(DIR *dir);
int __real_closedir(DIR *dir);

static int by_name(const void *a, const void *b) {
    return strcmp((*(struct dirent *const *)a)->d_name, (*(struct dirent *const *)b)->d_name);
}

static struct sorted_dir **find_sorted(DIR *dir) {
    struct sorted_dir **link = &open_dirs;
    while (*link && (*link)->dir != dir) link = &(*link)->older;
    return link;
}

static DIR *read_sorted(DIR *dir) {
    /* wasi-libc's `opendir` opens through `fdopendir`: the directory is read once. */
    if (!dir || *find_sorted(dir)) return dir;
    struct sorted_dir *sorted = calloc(1, sizeof *sorted);
    if (!sorted) abort();
    const char *directory = fd_path(dirfd(dir));
    if (!directory) directory = "";
    size_t capacity = 0;
    for (struct dirent *entry; (entry = __real_readdir(dir));) {
        if (sorted->count == capacity) {
            capacity = capacity ? 2 * capacity : 64;
            sorted->entries = realloc(sorted->entries, capacity * sizeof *sorted->entries);
            if (!sorted->entries) abort();
        }
        size_t size = sizeof *entry + strlen(entry->d_name) + 1;
        struct dirent *copy = malloc(size);
        if (!copy) abort();
        memcpy(copy, entry, size);
        char *path = join_path(directory, entry->d_name);
        copy->d_ino = path_inode(path);
        free(path);
        sorted->entries[sorted->count++] = copy;
    }
    qsort(sorted->entries, sorted->count, sizeof *sorted->entries, by_name);
    sorted->dir = dir;
    sorted->older = open_dirs;
    open_dirs = sorted;
    return dir;
}

DIR *__wrap_opendir(const char *path) { return read_sorted(__real_opendir(path)); }

DIR *__wrap_fdopendir(int fd) { return read_sorted(__real_fdopendir(fd)); }

struct dirent *__wrap_readdir(DIR *dir) {
    struct sorted_dir *sorted = *find_sorted(dir);
    if (!sorted) return __real_readdir(dir);
    return sorted->next < sorted->count ? sorted->entries[sorted->next++] : NULL;
}

int __wrap_closedir(DIR *dir) {
    struct sorted_dir **link = find_sorted(dir);
    struct sorted_dir *sorted = *link;
    if (sorted) {
        *link = sorted->older;
        for (size_t i = 0; i < sorted->count; i++) free(sorted->entries[i]);
        free(sorted->entries);
        free(sorted);
    }
    return __real_closedir(dir);
}
