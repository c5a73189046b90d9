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
#include <sys/uio.h>
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
