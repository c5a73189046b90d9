import ProvisionCShims
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// The one fact about block devices Accounts needs: the logical sector size, because a
/// GPT on a 4Kn card counts LBAs in 4096-byte sectors.
enum BlockDeviceGeometry {
    /// nil for a regular file (an image), the kernel's BLKSSZGET value for a block device.
    static func logicalBlockSize(_ fd: FileDescriptor) -> Int? {
        var st = stat()
        guard fstat(fd.rawValue, &st) == 0, (st.st_mode & S_IFMT) == S_IFBLK else { return nil }
        var size: Int32 = 0
        guard provision_blk_logical_block_size(fd.rawValue, &size) == 0, size > 0 else { return nil }
        return Int(size)
    }
}
