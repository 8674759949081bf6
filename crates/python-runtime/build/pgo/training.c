/* Linked into the instrumented CPython of the profile-guided build only (never into a
 * runtime), for its training run:
 * - writes the profile counters to `$CAPSULE_PROFILE_FILE` when the interpreter exits. The
 *   counting is LLVM's profile runtime, compiled from the `minicov` crate's copy of it
 *   (Debian's wasm32 compiler-rt has none); these are the hooks that copy leaves to its host.
 * - makes what the file system reports the same on every run and machine, so that the counts
 *   are: file times are one fixed instant, inode numbers are numbered in the order files are
 *   first seen, and directories list their entries sorted by name. (The host's inode numbers
 *   and times differ between runs, and converting them to Python ints or floats takes a
 *   different number of steps for different values.) The link wraps wasi-libc's functions
 *   with these (`-Wl,--wrap=...`). */

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

/* The host's (device, inode) pairs in the order first seen; a file's number is its index + 1. */
static struct { __wasi_device_t dev; __wasi_inode_t ino; } *seen_inodes;
static size_t seen_count, seen_capacity;

static __wasi_inode_t stable_inode(__wasi_device_t dev, __wasi_inode_t ino) {
    for (size_t i = 0; i < seen_count; i++) {
        if (seen_inodes[i].dev == dev && seen_inodes[i].ino == ino) return i + 1;
    }
    if (seen_count == seen_capacity) {
        seen_capacity = seen_capacity ? 2 * seen_capacity : 1024;
        seen_inodes = realloc(seen_inodes, seen_capacity * sizeof *seen_inodes);
        if (!seen_inodes) abort();
    }
    seen_inodes[seen_count].dev = dev;
    seen_inodes[seen_count].ino = ino;
    return ++seen_count;
}

static void stabilise(__wasi_filestat_t *stat) {
    stat->ino = stable_inode(stat->dev, stat->ino);
    stat->dev = 1;
    stat->atim = stat->mtim = stat->ctim = FIXED_FILE_TIME;
}

__wasi_errno_t __real___wasi_fd_filestat_get(__wasi_fd_t fd, __wasi_filestat_t *stat);
__wasi_errno_t __real___wasi_path_filestat_get(__wasi_fd_t fd, __wasi_lookupflags_t flags, const char *path,
                                               __wasi_filestat_t *stat);

__wasi_errno_t __wrap___wasi_fd_filestat_get(__wasi_fd_t fd, __wasi_filestat_t *stat) {
    __wasi_errno_t error = __real___wasi_fd_filestat_get(fd, stat);
    if (!error) stabilise(stat);
    return error;
}

__wasi_errno_t __wrap___wasi_path_filestat_get(__wasi_fd_t fd, __wasi_lookupflags_t flags, const char *path,
                                               __wasi_filestat_t *stat) {
    __wasi_errno_t error = __real___wasi_path_filestat_get(fd, flags, path, stat);
    if (!error) stabilise(stat);
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
        /* No device here: the directory's entries share one (number 0 in the table). */
        copy->d_ino = stable_inode(0, entry->d_ino);
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
