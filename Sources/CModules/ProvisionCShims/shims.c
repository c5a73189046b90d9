#ifndef _GNU_SOURCE
#error "ProvisionCShims must be compiled with _GNU_SOURCE (O_DIRECT, struct ucred)"
#endif
#include <malloc.h>
#include "ProvisionCShims.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <linux/aio_abi.h>
#include <stdio.h>
#include <unistd.h>
#include <systemd/sd-daemon.h>
#include <systemd/sd-journal.h>

#ifndef BLKGETDISKSEQ
#define BLKGETDISKSEQ _IOR(0x12, 128, __u64)
#endif

int provision_o_direct(void) { return O_DIRECT; }
int provision_o_excl(void) { return O_EXCL; }
int provision_o_cloexec(void) { return O_CLOEXEC; }

int provision_blk_getsize64(int fd, uint64_t *bytes) { return ioctl(fd, BLKGETSIZE64, bytes); }
int provision_blk_logical_block_size(int fd, int *bytes) { return ioctl(fd, BLKSSZGET, bytes); }
int provision_blk_physical_block_size(int fd, unsigned int *bytes) { return ioctl(fd, BLKPBSZGET, bytes); }
int provision_blk_readonly(int fd, int *readonly) { return ioctl(fd, BLKROGET, readonly); }
int provision_blk_diskseq(int fd, uint64_t *seq) { return ioctl(fd, BLKGETDISKSEQ, seq); }
int provision_blk_flush_buffers(int fd) { return ioctl(fd, BLKFLSBUF, 0); }
int provision_blk_reread_partitions(int fd) { return ioctl(fd, BLKRRPART, 0); }

int provision_peer_credentials(int fd, pid_t *pid, uid_t *uid, gid_t *gid) {
    struct ucred cred;
    socklen_t len = sizeof(cred);
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) return -1;
    *pid = cred.pid;
    *uid = cred.uid;
    *gid = cred.gid;
    return 0;
}

int provision_sd_notify(const char *state) {
    int r = sd_notify(0, state);
    if (r < 0) { errno = -r; return -1; }
    return r;
}

int provision_sd_listen_fds(void) {
    int r = sd_listen_fds(1);
    if (r < 0) { errno = -r; return -1; }
    return r;
}

uint64_t provision_sd_watchdog_usec(void) {
    uint64_t usec = 0;
    if (sd_watchdog_enabled(0, &usec) <= 0) return 0;
    return usec;
}

int provision_journal_send(const char *const *fields, int count) {
    struct iovec iov[16];
    if (count > 16) count = 16;
    for (int i = 0; i < count; i++) {
        iov[i].iov_base = (void *)fields[i];
        iov[i].iov_len = strlen(fields[i]);
    }
    int r = sd_journal_sendv(iov, count);
    if (r < 0) { errno = -r; return -1; }
    return 0;
}

int provision_journal_stream_connected(void) {
    // JOURNAL_STREAM is set by systemd when stderr is connected to the journal;
    // we then prefer structured sd_journal_sendv so fields survive.
    const char *stream = getenv("JOURNAL_STREAM");
    if (stream == NULL || *stream == '\0') return 0;
    struct stat st;
    if (fstat(STDERR_FILENO, &st) < 0) return 0;
    char expected[64];
    snprintf(expected, sizeof(expected), "%lu:%lu", (unsigned long)st.st_dev, (unsigned long)st.st_ino);
    return strcmp(expected, stream) == 0;
}

void provision_name_thread(const char *name) {
    char comm[16];
    strncpy(comm, name, sizeof comm - 1);
    comm[sizeof comm - 1] = 0;
    pthread_setname_np(pthread_self(), comm);
}

int provision_fix_mmap_threshold(int bytes) {
    return mallopt(M_MMAP_THRESHOLD, bytes);
}

int provision_pipe_cloexec(int fds[2]) {
    return pipe2(fds, O_CLOEXEC);
}

int provision_malloc_trim(void) {
    return malloc_trim(0);
}

int provision_open_tmpfile(const char *directory) {
    return open(directory, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
}

int provision_pipe_resize(int fd, int size) {
    (void)fcntl(fd, F_SETPIPE_SZ, size);
    return fcntl(fd, F_GETPIPE_SZ);
}

long provision_splice(int fd_in, long long off_in, int fd_out, long long off_out, unsigned long count) {
    loff_t in = off_in, out = off_out;
    return (long)splice(fd_in, off_in < 0 ? NULL : &in, fd_out, off_out < 0 ? NULL : &out, count, SPLICE_F_MOVE);
}

#include <linux/capability.h>
#include <sys/syscall.h>

int provision_drop_effective_capability(int capability) {
    struct __user_cap_header_struct header = { _LINUX_CAPABILITY_VERSION_3, 0 };
    struct __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3];
    if (capability < 0 || capability >= 32 * _LINUX_CAPABILITY_U32S_3) { errno = EINVAL; return -1; }
    if (syscall(SYS_capget, &header, data) != 0) return -1;
    data[capability / 32].effective &= ~(1u << (capability % 32));
    return (int)syscall(SYS_capset, &header, data);
}

int provision_has_effective_capability(int capability) {
    struct __user_cap_header_struct header = { _LINUX_CAPABILITY_VERSION_3, 0 };
    struct __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3];
    if (capability < 0 || capability >= 32 * _LINUX_CAPABILITY_U32S_3) return 0;
    if (syscall(SYS_capget, &header, data) != 0) return 0;
    return (data[capability / 32].effective >> (capability % 32)) & 1;
}

/* Places `from` ..< `to` one after another (no AIO, a depth of 1, or one place AIO refused),
   from `at` on; stops at the first that fails. */
static int transfer_places_in_turn(int fd, int write, const uint64_t *offsets, const uint32_t *lengths,
                                   int from, int to, char *at, int *failed) {
    for (int i = from; i < to; i++) {
        ssize_t n = write ? pwrite(fd, at, lengths[i], (off_t)offsets[i]) : pread(fd, at, lengths[i], (off_t)offsets[i]);
        if (n != (ssize_t)lengths[i]) {
            if (n >= 0) errno = EIO;
            *failed = i;
            return -1;
        }
        at += lengths[i];
    }
    return 0;
}

/* AIO contexts for provision_transfer_places, kept for the next call: io_destroy waits for an
   RCU grace period (some 30 ms here), longer than a probe's whole batch of blocks takes. At
   most AIO_CONTEXT_POOL stay (one per probe running at once; each counts 2 × AIO_CONTEXT_DEPTH
   towards the system's aio-max-nr, 65536 by default); more are destroyed when given back. */
#define AIO_CONTEXT_DEPTH 64
#define AIO_CONTEXT_POOL 64
static pthread_mutex_t aio_pool_lock = PTHREAD_MUTEX_INITIALIZER;
static aio_context_t aio_pool[AIO_CONTEXT_POOL];
static int aio_pool_count = 0;

static int take_aio_context(aio_context_t *ctx) {
    pthread_mutex_lock(&aio_pool_lock);
    int found = aio_pool_count > 0;
    if (found) *ctx = aio_pool[--aio_pool_count];
    pthread_mutex_unlock(&aio_pool_lock);
    if (found) return 1;
    *ctx = 0;
    return syscall(SYS_io_setup, AIO_CONTEXT_DEPTH, ctx) == 0;
}

/* `clean`: every request it carried was reaped (else it holds stale events, and goes). */
static void give_back_aio_context(aio_context_t ctx, int clean) {
    if (clean) {
        pthread_mutex_lock(&aio_pool_lock);
        int kept = aio_pool_count < AIO_CONTEXT_POOL;
        if (kept) aio_pool[aio_pool_count++] = ctx;
        pthread_mutex_unlock(&aio_pool_lock);
        if (kept) return;
    }
    syscall(SYS_io_destroy, ctx);
}

int provision_transfer_places(int fd, int write, const uint64_t *offsets, const uint32_t *lengths, int count,
                              void *buffer, int depth, int *failed, int *queued) {
    int unused;
    if (!queued) queued = &unused;
    *queued = 0;
    if (count <= 0) return 0;
    if (depth > AIO_CONTEXT_DEPTH) depth = AIO_CONTEXT_DEPTH;
    if (depth > count) depth = count;
    aio_context_t ctx = 0;
    if (depth <= 1 || !take_aio_context(&ctx))
        return transfer_places_in_turn(fd, write, offsets, lengths, 0, count, buffer, failed);
    int clean = 1;
    struct iocb *blocks = calloc((size_t)depth, sizeof *blocks);
    struct iocb **batch = calloc((size_t)depth, sizeof *batch);
    struct io_event *events = calloc((size_t)depth, sizeof *events);
    int *idle = calloc((size_t)depth, sizeof *idle);
    if (!blocks || !batch || !events || !idle) {
        free(blocks); free(batch); free(events); free(idle);
        give_back_aio_context(ctx, 1);
        return transfer_places_in_turn(fd, write, offsets, lengths, 0, count, buffer, failed);
    }
    int idleCount = depth;
    for (int s = 0; s < depth; s++) idle[s] = s;
    char *at = buffer;
    int next = 0, inFlight = 0, lowest = -1, error = 0;
    while ((lowest < 0 && next < count) || inFlight > 0) {
        /* As many as there are free slots, until one has failed. */
        int n = 0;
        while (lowest < 0 && next < count && idleCount > 0) {
            int slot = idle[--idleCount];
            struct iocb *cb = &blocks[slot];
            memset(cb, 0, sizeof *cb);
            cb->aio_fildes = (uint32_t)fd;
            cb->aio_lio_opcode = write ? IOCB_CMD_PWRITE : IOCB_CMD_PREAD;
            cb->aio_buf = (uint64_t)(uintptr_t)at;
            cb->aio_nbytes = lengths[next];
            cb->aio_offset = (int64_t)offsets[next];
            cb->aio_data = ((uint64_t)(uint32_t)slot << 32) | (uint32_t)next;
            batch[n++] = cb;
            at += lengths[next];
            next++;
        }
        for (int done = 0; done < n;) {
            long r = syscall(SYS_io_submit, ctx, (long)(n - done), batch + done);
            if (r > 0) { done += (int)r; inFlight += (int)r; *queued += (int)r; continue; }
            if (r < 0 && errno == EINTR) continue;
            /* Refused (EAGAIN, or a descriptor AIO cannot take): this one in turn, then the rest. */
            struct iocb *cb = batch[done];
            int index = (int)(uint32_t)cb->aio_data, unusedIndex;
            if (transfer_places_in_turn(fd, write, offsets, lengths, index, index + 1, (char *)(uintptr_t)cb->aio_buf, &unusedIndex) != 0
                && (lowest < 0 || index < lowest)) {
                lowest = index;
                error = errno;
            }
            idle[idleCount++] = (int)(cb->aio_data >> 32);
            done++;
        }
        if (inFlight == 0) continue;
        long got = syscall(SYS_io_getevents, ctx, 1L, (long)depth, events, NULL);
        if (got < 0) {
            if (errno == EINTR) continue;
            /* Cannot wait here: io_destroy (below) waits for what is still in flight. */
            if (lowest < 0) { lowest = next - 1; error = errno; }
            clean = 0;
            break;
        }
        for (long e = 0; e < got; e++) {
            int slot = (int)(events[e].data >> 32), index = (int)(uint32_t)events[e].data;
            if (events[e].res != (int64_t)lengths[index] && (lowest < 0 || index < lowest)) {
                lowest = index;
                error = events[e].res < 0 ? (int)-events[e].res : EIO;
            }
            idle[idleCount++] = slot;
        }
        inFlight -= (int)got;
    }
    /* Returns once nothing is in flight: every request was reaped, or io_destroy waits for it. */
    give_back_aio_context(ctx, clean);
    free(blocks); free(batch); free(events); free(idle);
    if (lowest >= 0) {
        *failed = lowest;
        errno = error;
        return -1;
    }
    return 0;
}
