// What Swift's Glibc overlay cannot import: O_DIRECT (behind _GNU_SOURCE), the block
// device ioctls (ioctl is variadic), SO_PEERCRED's struct ucred, and sd_notify without
// printf-style arguments. Each function is a thin, errno-preserving wrapper: it returns
// -1 and leaves errno set on failure, like the call it wraps.
#ifndef PROVISION_C_SHIMS_H
#define PROVISION_C_SHIMS_H

#include <stdint.h>
#include <sys/types.h>

/// open(2) flag bits that Glibc's Swift overlay hides.
int provision_o_direct(void);
int provision_o_excl(void);
int provision_o_cloexec(void);

/// BLKGETSIZE64: size of a block device in bytes.
int provision_blk_getsize64(int fd, uint64_t *bytes);
/// BLKSSZGET: logical block size.
int provision_blk_logical_block_size(int fd, int *bytes);
/// BLKPBSZGET: physical block size.
int provision_blk_physical_block_size(int fd, unsigned int *bytes);
/// BLKROGET: non-zero when the kernel considers the device read-only.
int provision_blk_readonly(int fd, int *readonly);
/// BLKGETDISKSEQ (Linux 5.15+): a number that changes whenever new media appear
/// behind the same device node. Returns -1/ENOTTY on older kernels.
int provision_blk_diskseq(int fd, uint64_t *seq);
/// BLKFLSBUF: drop the device's buffer cache (used before a buffered read-back in tests).
int provision_blk_flush_buffers(int fd);
/// BLKRRPART: ask the kernel to re-read the partition table after a write.
int provision_blk_reread_partitions(int fd);

/// getsockopt(SO_PEERCRED): who is on the other end of a Unix socket.
int provision_peer_credentials(int fd, pid_t *pid, uid_t *uid, gid_t *gid);

/// sd_notify(3) with a plain string (the Swift side formats it).
int provision_sd_notify(const char *state);
/// sd_listen_fds(3): number of sockets passed by systemd, starting at fd 3.
int provision_sd_listen_fds(void);
/// sd_watchdog_enabled(3): the watchdog interval in microseconds, 0 if none.
uint64_t provision_sd_watchdog_usec(void);
/// sd_journal_sendv(3) with up to 8 "FIELD=value" strings.
int provision_journal_send(const char *const *fields, int count);
/// sd_booted-like check for journald: is the journal socket there and are we under systemd?
int provision_journal_stream_connected(void);

/// Names the calling thread in /proc (comm, as top -H, ps -L and perf show it): at most 15
/// bytes are kept. Foundation's Thread.name does not reach the kernel on Linux.
void provision_name_thread(const char *name);

/// Takes `capability` (a CAP_* number) out of the calling thread's effective set; threads it
/// starts afterwards inherit that. For tests that run a piece of the daemon as the packaged
/// unit would, e.g. without CAP_SYS_RESOURCE. 0, or -1 with errno.
int provision_drop_effective_capability(int capability);

/// Whether `capability` (a CAP_* number) is in the calling thread's effective set (0 when it
/// cannot be read).
int provision_has_effective_capability(int capability);

/* Fixes glibc's mmap threshold at `bytes` (mallopt M_MMAP_THRESHOLD), which also turns off
   its dynamic raising: every allocation at least that large is its own mapping and goes back
   to the kernel when freed. Returns 1 on success. */
int provision_fix_mmap_threshold(int bytes);

/* pipe2(fds, O_CLOEXEC): a pipe whose ends no concurrently spawned child inherits. */
int provision_pipe_cloexec(int fds[2]);

/// malloc_trim(0): hands the free pages of every glibc arena back to the kernel (glibc keeps
/// what threads freed, so a burst of clients would otherwise stay in the daemon's RSS).
/// Returns 1 when memory was released.
int provision_malloc_trim(void);

/* open(directory, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600): an unnamed file that disappears with
   its last descriptor (Swift does not import the O_TMPFILE macro). -1 with errno on failure. */
int provision_open_tmpfile(const char *directory);

/* fcntl(fd, F_SETPIPE_SZ, size), then F_GETPIPE_SZ: the capacity the pipe has now (the kernel
   rounds up, and refuses more than /proc/sys/fs/pipe-max-size without CAP_SYS_RESOURCE: the
   pipe then keeps what it had). -1 with errno when even the query fails. */
int provision_pipe_resize(int fd, int size);

/* splice(2) with explicit offsets on whichever side is a file (off_in / off_out < 0: that side
   is the pipe). Moves page references, not bytes: page-cache pages of a file go through the
   pipe to an O_DIRECT device without a copy. -1 with errno on failure. */
long provision_splice(int fd_in, long long off_in, int fd_out, long long off_out, unsigned long count);

/* Reads (write = 0) or writes (write = 1) `count` places of `fd` at once: place i is
   lengths[i] bytes at offsets[i], to or from the next lengths[i] bytes of `buffer` (the places'
   buffers lie back to back, in order). All are in flight together (Linux native AIO, up to
   `depth` at a time, 64 at most; for an O_DIRECT descriptor the device queues them), in no
   particular order: the caller must not need one before another. Returns only when none is in
   flight any more. The AIO context is kept for the next call (up to 64 of them, one per call
   running at once). Where AIO is not available (io_setup refused: a seccomp filter, the system's aio-max-nr
   reached) or `depth` is 1, the places go one by one with pread/pwrite instead. 0 when every
   place moved all its bytes; else -1 with errno (EIO for a short transfer) and *failed the
   index of the lowest place that failed. *queued (when not NULL): how many places went through
   AIO (0: all in turn). */
int provision_transfer_places(int fd, int write, const uint64_t *offsets, const uint32_t *lengths, int count,
                              void *buffer, int depth, int *failed, int *queued);

#endif
