// A lying SD card for tests: a FUSE file system with one file, `card`, that claims
// `--claimed` bytes and stores them in `--store` (a sparse file). The TestSupport
// FakeCard fixture attaches a loop device to it (O_DIRECT), so the code under test sees a
// block device that lies the way counterfeit and worn cards do:
//
//   --lie=honest   every byte is kept (a control, and the base for the flip variants)
//   --lie=wrap     only --real bytes exist; byte P lands on P mod real (the usual
//                  counterfeit: the controller ignores the high address bits)
//   --lie=drop     bytes at or past --real are dropped on write and read as zeros
//   --flip=once:OFFSET    the first read covering OFFSET after it was written returns
//                         that byte inverted (a marginal cell that settles)
//   --flip=always:OFFSET  every read covering OFFSET after it was written does
//
// Every open is direct_io, so the kernel keeps no page cache of the file: each read
// reaches this program and cannot be answered from what was written a moment ago.
// Single-threaded (-s): the flip state needs no lock.
#define FUSE_USE_VERSION 31
#include <fuse.h>
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

enum lie { HONEST, WRAP, DROP };
struct options {
    char *store, *lie_name, *flip, *name;
    long long claimed, real;
};
static struct options opt;
static const struct fuse_opt specs[] = {
    {"--store=%s", offsetof(struct options, store), 0},
    {"--lie=%s", offsetof(struct options, lie_name), 0},
    {"--flip=%s", offsetof(struct options, flip), 0},
    {"--name=%s", offsetof(struct options, name), 0},
    {"--claimed=%lld", offsetof(struct options, claimed), 0},
    {"--real=%lld", offsetof(struct options, real), 0},
    FUSE_OPT_END,
};
static int store_fd = -1;
static enum lie lie = HONEST;
static long long flip_at = -1;
static int flip_always, flip_armed, flip_spent;
static char file_path[512];

static int fc_getattr(const char *path, struct stat *st, struct fuse_file_info *fi) {
    (void)fi;
    memset(st, 0, sizeof *st);
    if (strcmp(path, "/") == 0) { st->st_mode = S_IFDIR | 0755; st->st_nlink = 2; return 0; }
    if (strcmp(path, file_path) != 0) return -ENOENT;
    st->st_mode = S_IFREG | 0600;
    st->st_nlink = 1;
    st->st_size = opt.claimed;
    st->st_blksize = 4096;
    return 0;
}

static int fc_readdir(const char *path, void *buf, fuse_fill_dir_t fill, off_t off,
                      struct fuse_file_info *fi, enum fuse_readdir_flags flags) {
    (void)off; (void)fi; (void)flags;
    if (strcmp(path, "/") != 0) return -ENOENT;
    fill(buf, ".", NULL, 0, 0);
    fill(buf, "..", NULL, 0, 0);
    fill(buf, file_path + 1, NULL, 0, 0);
    return 0;
}

static int fc_open(const char *path, struct fuse_file_info *fi) {
    if (strcmp(path, file_path) != 0) return -ENOENT;
    fi->direct_io = 1;
    fi->keep_cache = 0;
    return 0;
}

// Where byte `pos` of the card really lives; -1 when it does not exist (drop). `*run` is
// how many bytes from `pos` on map contiguously.
static long long place(long long pos, long long want, long long *run) {
    if (lie == HONEST || pos < opt.real) {
        long long end = lie == HONEST ? opt.claimed : opt.real;
        *run = want < end - pos ? want : end - pos;
        return pos;
    }
    if (lie == DROP) { *run = want < opt.claimed - pos ? want : opt.claimed - pos; return -1; }
    long long p = pos % opt.real;
    *run = want < opt.real - p ? want : opt.real - p;
    return p;
}

static int fc_read(const char *path, char *buf, size_t size, off_t off, struct fuse_file_info *fi) {
    (void)path; (void)fi;
    if (off >= opt.claimed) return 0;
    if ((long long)size > opt.claimed - off) size = opt.claimed - off;
    size_t done = 0;
    while (done < size) {
        long long run;
        long long at = place(off + done, size - done, &run);
        if (at < 0) memset(buf + done, 0, run);
        else {
            ssize_t n = pread(store_fd, buf + done, run, at);
            if (n < 0) return -errno;
            if (n < run) memset(buf + done + n, 0, run - n);
        }
        done += run;
    }
    if (flip_armed && !flip_spent && flip_at >= off && flip_at < off + (long long)size) {
        buf[flip_at - off] ^= 0xFF;
        if (!flip_always) flip_spent = 1;
    }
    return size;
}

static int fc_write(const char *path, const char *buf, size_t size, off_t off, struct fuse_file_info *fi) {
    (void)path; (void)fi;
    if (off >= opt.claimed) return -ENOSPC;
    if ((long long)size > opt.claimed - off) size = opt.claimed - off;
    size_t done = 0;
    while (done < size) {
        long long run;
        long long at = place(off + done, size - done, &run);
        if (at >= 0) {
            ssize_t n = pwrite(store_fd, buf + done, run, at);
            if (n < 0) return -errno;
            if (n < run) return -EIO;
        }
        done += run;
    }
    if (flip_at >= off && flip_at < off + (long long)size) flip_armed = 1;
    return size;
}

static int fc_truncate(const char *path, off_t size, struct fuse_file_info *fi) {
    (void)path; (void)fi;
    return size == opt.claimed ? 0 : -EPERM;
}

static int fc_fsync(const char *path, int datasync, struct fuse_file_info *fi) {
    (void)path; (void)datasync; (void)fi;
    return fdatasync(store_fd) == 0 ? 0 : -errno;
}

static const struct fuse_operations ops = {
    .getattr = fc_getattr, .readdir = fc_readdir, .open = fc_open, .read = fc_read,
    .write = fc_write, .truncate = fc_truncate, .fsync = fc_fsync,
};

int main(int argc, char **argv) {
    struct fuse_args args = FUSE_ARGS_INIT(argc, argv);
    if (fuse_opt_parse(&args, &opt, specs, NULL) != 0) return 2;
    if (!opt.store || !opt.name || opt.claimed <= 0 || opt.claimed % 512) {
        fprintf(stderr, "fake-card-fuse: --store, --name and --claimed (a multiple of 512) are required\n");
        return 2;
    }
    if (!opt.lie_name || strcmp(opt.lie_name, "honest") == 0) lie = HONEST;
    else if (strcmp(opt.lie_name, "wrap") == 0) lie = WRAP;
    else if (strcmp(opt.lie_name, "drop") == 0) lie = DROP;
    else { fprintf(stderr, "fake-card-fuse: unknown --lie=%s (honest, wrap, drop)\n", opt.lie_name); return 2; }
    if (lie != HONEST && (opt.real <= 0 || opt.real >= opt.claimed || opt.real % 512)) {
        fprintf(stderr, "fake-card-fuse: --real must be a multiple of 512 below --claimed\n");
        return 2;
    }
    if (lie == HONEST) opt.real = opt.claimed;
    if (opt.flip) {
        if (strncmp(opt.flip, "once:", 5) == 0) flip_always = 0;
        else if (strncmp(opt.flip, "always:", 7) == 0) flip_always = 1;
        else { fprintf(stderr, "fake-card-fuse: --flip=once:OFFSET or --flip=always:OFFSET\n"); return 2; }
        flip_at = atoll(strchr(opt.flip, ':') + 1);
    }
    snprintf(file_path, sizeof file_path, "/%s", opt.name);
    store_fd = open(opt.store, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (store_fd < 0) { perror(opt.store); return 1; }
    if (ftruncate(store_fd, opt.real) != 0) { perror("ftruncate"); return 1; }
    return fuse_main(args.argc, args.argv, &ops, NULL);
}
