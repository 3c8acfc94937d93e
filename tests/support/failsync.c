/*
 * A shim for LD_PRELOAD that makes one fsync or fdatasync fail, for the tests of
 * tests/log_write_failure.rs (no other way makes a real fdatasync fail on demand).
 *
 * Once the file named by FAILSYNC_ARMED exists, the first fsync or fdatasync of a file
 * or directory whose path ends with FAILSYNC_NAME runs the real call, then fails with
 * EIO. That is what the kernel does after a writeback error: it reports the error to
 * one fsync and clears it, so the next fsync of the same file succeeds although the
 * data it failed to write back is lost. Every other call goes through unchanged.
 *
 * Built by the tests with `cc -shared -fPIC`.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int failed = 0;

/* True (once) when `fd` is the file to fail and the failure is armed. */
static int fail_now(int fd) {
    const char *name = getenv("FAILSYNC_NAME");
    const char *armed = getenv("FAILSYNC_ARMED");
    if (!name || !armed || __atomic_load_n(&failed, __ATOMIC_SEQ_CST)) return 0;
    char link[64], path[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n <= 0) return 0;
    path[n] = 0;
    size_t len = strlen(name);
    if ((size_t)n < len || strcmp(path + n - len, name) != 0) return 0;
    if (access(armed, F_OK) != 0) return 0;
    return !__atomic_exchange_n(&failed, 1, __ATOMIC_SEQ_CST);
}

static int call(const char *symbol, int fd) {
    int (*real)(int) = (int (*)(int))dlsym(RTLD_NEXT, symbol);
    if (!fail_now(fd)) return real(fd);
    real(fd); /* the writeback error is reported here, and cleared */
    errno = EIO;
    return -1;
}

int fsync(int fd) { return call("fsync", fd); }

int fdatasync(int fd) { return call("fdatasync", fd); }
