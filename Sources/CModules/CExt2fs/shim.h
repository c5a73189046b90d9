#include <ext2fs/ext2fs.h>

/// The read-only-compatible features this libext2fs cannot write (macros Swift does not import).
static inline __u32 provision_ext2_ro_compat_unsupported(__u32 ro_compat) {
    return ro_compat & ~(__u32)EXT2_LIB_FEATURE_RO_COMPAT_SUPP;
}
