/* What a C++ `throw` needs at link time. Debian's libc++abi for wasm32 is built without
 * exceptions and clang 19 has no exnref Wasm exception handling, so numpy's few C++ throws
 * (allocation failures inside pocketfft, unique's hash set) cannot be caught: they end the
 * instance, saying which exception it was. The host reports that as a failed call. */
#include <stdio.h>
#include <stdlib.h>

struct type_info { const void *vtable; const char *name; };

void *__cxa_allocate_exception(size_t size) {
    void *exception = malloc(size ? size : 1);
    if (exception == NULL) abort();
    return exception;
}

void __cxa_free_exception(void *exception) { free(exception); }

_Noreturn void __cxa_throw(void *exception, void *type, void (*destructor)(void *)) {
    (void)exception;
    (void)destructor;
    const struct type_info *info = type;
    fprintf(stderr, "C++ exception `%s` thrown in native code; this runtime cannot catch C++ exceptions\n",
            info != NULL && info->name != NULL ? info->name : "?");
    fflush(stderr);
    abort();
}
