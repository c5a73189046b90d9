// libext2fs declares its I/O managers as mutable C globals; nothing here writes them,
// and @preconcurrency is the only way Swift 6 lets us name `unix_io_manager`.
@preconcurrency import CExt2fs
#if canImport(Glibc)
import Glibc
#endif

/// An ext2/3/4 filesystem opened through libext2fs at a byte offset inside an image or
/// whole-disk device, never mounted. The only file in Accounts that calls libext2fs.
///
/// Not Sendable: libext2fs handles are single-threaded; one injection owns one instance
/// on its own thread.
final class Ext2Filesystem {
    private var fs: ext2_filsys?
    let source: String

    /// Loads the ext2 error table once so `error_message` says "Could not allocate
    /// inode…" rather than "Unknown code ext2 142".
    private static let errorTable: Void = initialize_ext2_error_table()

    /// Opens read-write (or read-only), exclusively when writable so a mounted
    /// filesystem's device (O_EXCL refused by the kernel) is never edited under the kernel.
    init(path: String, offset: UInt64, writable: Bool) throws(AccountsError) {
        _ = Self.errorTable
        source = offset == 0 ? path : "\(path) at offset \(offset)"
        var flags = EXT2_FLAG_64BITS
        if writable { flags |= EXT2_FLAG_RW | EXT2_FLAG_EXCLUSIVE }
        var handle: ext2_filsys?
        var code = ext2fs_open2(path, "offset=\(offset)", flags, 0, 0, unix_io_manager, &handle)
        // EBUSY for a while after the card was written: closing the writer's descriptor makes
        // udev re-read the partition table, and the kernel holds the disk exclusively while it
        // scans (seen in CI as "Device or resource busy" on a card written a moment before).
        // A mounted filesystem stays busy, and is refused after the deadline as before.
        let deadline = ContinuousClock.now + .seconds(5)
        while writable && code == errcode_t(EBUSY) && ContinuousClock.now < deadline {
            usleep(50_000)
            handle = nil
            code = ext2fs_open2(path, "offset=\(offset)", flags, 0, 0, unix_io_manager, &handle)
        }
        guard code == 0, let handle else {
            // A read-write open of an mmp filesystem fails inside libext2fs ("MMP: invalid magic
            // number"): said the way the read-only check below says it.
            if writable, let refusal = Self.featureRefusal(path: path, offset: offset, source: source) { throw refusal }
            throw AccountsError(.filesystem, "cannot open the ext filesystem in \(source): \(Self.message(code))")
        }
        fs = handle
        if superblock.s_feature_incompat & UInt32(EXT3_FEATURE_INCOMPAT_RECOVER) != 0 {
            discard()
            throw AccountsError(.filesystem, """
                the filesystem in \(source) has a journal that needs recovery (it was not cleanly \
                unmounted): run e2fsck -fy on it first
                """)
        }
        // What only a read-write open refuses is refused here too, so that `config check`'s
        // read-only rehearsal fails as every card would.
        if let refusal = Self.uneditable(superblock, source: source) {
            discard()
            throw refusal
        }
        let bitmaps = ext2fs_read_bitmaps(handle)
        guard bitmaps == 0 else {
            discard()
            throw AccountsError(.filesystem, "cannot read the allocation bitmaps of \(source): \(Self.message(bitmaps))")
        }
    }

    deinit { discard() }

    /// Why the filesystem whose superblock this is cannot be edited, for its features: mmp
    /// (libext2fs reads the MMP block without the partition's offset), or read-only-compatible
    /// features this libext2fs cannot write. Nil when they allow it.
    private static func uneditable(_ superblock: ext2_super_block, source: String) -> AccountsError? {
        if superblock.s_feature_incompat & UInt32(EXT4_FEATURE_INCOMPAT_MMP) != 0 {
            return AccountsError(.filesystem, """
                the filesystem in \(source) has the mmp feature (multi-mount protection): libext2fs \
                reads its MMP block without the partition's offset, so it cannot be edited inside an \
                image or a card; turn it off in the image (tune2fs -O ^mmp)
                """)
        }
        let unknown = provision_ext2_ro_compat_unsupported(superblock.s_feature_ro_compat)
        guard unknown != 0 else { return nil }
        return AccountsError(.filesystem, "the filesystem in \(source) has read-only-compatible features this libext2fs cannot write (feature bits 0x\(String(unknown, radix: 16)) of s_feature_ro_compat): it can be read, not edited; build the image without them")
    }

    /// `uneditable` for a filesystem a read-write open refused (libext2fs says only "MMP:
    /// invalid magic number"): its superblock, read by a read-only open.
    private static func featureRefusal(path: String, offset: UInt64, source: String) -> AccountsError? {
        var handle: ext2_filsys?
        guard ext2fs_open2(path, "offset=\(offset)", EXT2_FLAG_64BITS, 0, 0, unix_io_manager, &handle) == 0, let handle else { return nil }
        defer { ext2fs_free(handle) }
        return uneditable(handle.pointee.super.pointee, source: source)
    }

    /// Flushes superblock, group descriptors and bitmaps, then closes.
    func close() throws(AccountsError) {
        guard let fs else { return }
        self.fs = nil
        let code = ext2fs_close2(fs, 0)
        guard code == 0 else {
            ext2fs_free(fs)
            throw AccountsError(.filesystem, "flushing \(source) failed: \(Self.message(code))")
        }
    }

    /// Drops the handle without writing anything back: the path taken on every error
    /// found before the first write, so the filesystem stays byte-identical.
    func discard() {
        if let fs { ext2fs_free(fs) }
        fs = nil
    }

    private var handle: ext2_filsys { fs! }
    var superblock: ext2_super_block { handle.pointee.super.pointee }
    var blockSize: Int { Int(handle.pointee.blocksize) }
    var freeBlocks: UInt64 { UInt64(ext2fs_free_blocks_count(handle.pointee.super)) }
    var freeInodes: UInt64 { UInt64(superblock.s_free_inodes_count) }
    /// Bytes the filesystem claims to span, from its superblock.
    var byteSize: UInt64 { UInt64(ext2fs_blocks_count(handle.pointee.super)) * UInt64(blockSize) }
    static let rootInode = ext2_ino_t(EXT2_ROOT_INO)

    static func message(_ code: errcode_t) -> String {
        String(cString: error_message(code))
    }

    private func check(_ code: errcode_t, _ what: @autoclosure () -> String) throws(AccountsError) {
        guard code == 0 else {
            let text = code == errcode_t(EXT2_ET_BLOCK_ALLOC_FAIL) || code == errcode_t(EXT2_ET_INODE_ALLOC_FAIL)
                ? "\(Self.message(code)) (filesystem full)" : Self.message(code)
            throw AccountsError(.filesystem, "\(what()) in \(source): \(text)")
        }
    }

    // MARK: Lookup and inodes

    /// The inode at an absolute path, following symlinks on the way (relative to this
    /// filesystem's root, never the host's). nil when it does not exist.
    func lookup(_ path: String) throws(AccountsError) -> ext2_ino_t? {
        var ino: ext2_ino_t = 0
        let code = ext2fs_namei_follow(handle, Self.rootInode, Self.rootInode, path, &ino)
        if code == errcode_t(EXT2_ET_FILE_NOT_FOUND) || code == errcode_t(EXT2_ET_NO_DIRECTORY) { return nil }
        try check(code, "looking up \(path)")
        return ino
    }

    /// The file type bits (LINUX_S_IFMT) of what is at `path`, without following a
    /// symlink in the last component; nil when nothing is there.
    func fileType(at path: String) throws(AccountsError) -> UInt16? {
        var ino: ext2_ino_t = 0
        let code = ext2fs_namei(handle, Self.rootInode, Self.rootInode, path, &ino)
        if code == errcode_t(EXT2_ET_FILE_NOT_FOUND) || code == errcode_t(EXT2_ET_NO_DIRECTORY) { return nil }
        try check(code, "looking up \(path)")
        return try inode(ino).i_mode & UInt16(LINUX_S_IFMT)
    }

    func inode(_ ino: ext2_ino_t) throws(AccountsError) -> ext2_inode {
        var inode = ext2_inode()
        try check(ext2fs_read_inode(handle, ino, &inode), "reading inode \(ino)")
        return inode
    }

    func writeInode(_ ino: ext2_ino_t, _ inode: ext2_inode) throws(AccountsError) {
        var copy = inode
        try check(ext2fs_write_inode(handle, ino, &copy), "writing inode \(ino)")
    }

    /// Permission bits, owner and group of an inode (uid/gid are split into 16-bit halves).
    func attributes(_ ino: ext2_ino_t) throws(AccountsError) -> (mode: UInt16, uid: UInt32, gid: UInt32) {
        let node = try inode(ino)
        let uid = UInt32(node.i_uid) | UInt32(node.osd2.linux2.l_i_uid_high) << 16
        let gid = UInt32(node.i_gid) | UInt32(node.osd2.linux2.l_i_gid_high) << 16
        return (node.i_mode, uid, gid)
    }

    func setAttributes(_ ino: ext2_ino_t, permissions: UInt16, uid: UInt32, gid: UInt32) throws(AccountsError) {
        var node = try inode(ino)
        node.i_mode = (node.i_mode & UInt16(LINUX_S_IFMT)) | (permissions & 0o7777)
        node.i_uid = UInt16(truncatingIfNeeded: uid)
        node.osd2.linux2.l_i_uid_high = UInt16(truncatingIfNeeded: uid >> 16)
        node.i_gid = UInt16(truncatingIfNeeded: gid)
        node.osd2.linux2.l_i_gid_high = UInt16(truncatingIfNeeded: gid >> 16)
        node.i_ctime = UInt32(truncatingIfNeeded: time(nil))
        try writeInode(ino, node)
    }

    // MARK: Files

    func readFile(_ ino: ext2_ino_t, path: String) throws(AccountsError) -> [UInt8] {
        var file: ext2_file_t?
        try check(ext2fs_file_open(handle, ino, 0, &file), "opening \(path)")
        defer { ext2fs_file_close(file) }
        var size: UInt64 = 0
        try check(ext2fs_file_get_lsize(file, &size), "sizing \(path)")
        guard size <= 64 << 20 else {
            throw AccountsError(.filesystem, "\(path) in \(source) is \(size) bytes: too large for an account file")
        }
        var bytes = [UInt8](repeating: 0, count: Int(size))
        var done = 0
        while done < bytes.count {
            var got: UInt32 = 0
            let code = bytes.withUnsafeMutableBytes {
                ext2fs_file_read(file, $0.baseAddress! + done, UInt32($0.count - done), &got)
            }
            try check(code, "reading \(path)")
            guard got > 0 else { break }
            done += Int(got)
        }
        return Array(bytes.prefix(done))
    }

    /// Reads a file by path; nil when it does not exist.
    func readFile(_ path: String) throws(AccountsError) -> [UInt8]? {
        guard let ino = try lookup(path) else { return nil }
        return try readFile(ino, path: path)
    }

    /// Replaces a regular file's contents (truncate, then write), or creates it.
    /// Owner and mode are set either way, because shadow's must be right even when the
    /// image had them wrong.
    @discardableResult
    func writeFile(in directory: ext2_ino_t, name: String, path: String, contents: [UInt8],
                   permissions: UInt16, uid: UInt32, gid: UInt32) throws(AccountsError) -> ext2_ino_t {
        var ino = try child(named: name, of: directory)
        if let existing = ino {
            let mode = try inode(existing).i_mode & UInt16(LINUX_S_IFMT)
            guard mode == UInt16(LINUX_S_IFREG) else {
                throw AccountsError(.filesystem, "\(path) in \(source) exists but is not a regular file")
            }
        } else {
            ino = try createInode(in: directory, name: name, path: path,
                                  mode: UInt16(LINUX_S_IFREG) | permissions, fileType: EXT2_FT_REG_FILE)
        }
        var file: ext2_file_t?
        try check(ext2fs_file_open(handle, ino!, EXT2_FILE_WRITE, &file), "opening \(path) for writing")
        do throws(AccountsError) {
            try check(ext2fs_file_set_size2(file, 0), "truncating \(path)")
            var done = 0
            while done < contents.count {
                var wrote: UInt32 = 0
                let code = contents.withUnsafeBytes {
                    ext2fs_file_write(file, $0.baseAddress! + done, UInt32($0.count - done), &wrote)
                }
                try check(code, "writing \(path)")
                guard wrote > 0 else {
                    throw AccountsError(.filesystem, "writing \(path) in \(source) made no progress at byte \(done)")
                }
                done += Int(wrote)
            }
            // ext2fs_file_write grows i_size itself (inline-data files refuse a second
            // set_size), so only an unexpected size is corrected.
            var size: UInt64 = 0
            try check(ext2fs_file_get_lsize(file, &size), "sizing \(path)")
            if size != UInt64(contents.count) {
                try check(ext2fs_file_set_size2(file, Int64(contents.count)), "sizing \(path)")
            }
        } catch {
            ext2fs_file_close(file)
            throw error
        }
        try check(ext2fs_file_close(file), "closing \(path)")
        try setAttributes(ino!, permissions: permissions, uid: uid, gid: gid)
        return ino!
    }

    /// A new directory with the given owner and mode; an existing one is left as it is.
    /// Returns the inode and whether it was created.
    func makeDirectory(in parent: ext2_ino_t, name: String, path: String, permissions: UInt16,
                       uid: UInt32, gid: UInt32) throws(AccountsError) -> (ino: ext2_ino_t, created: Bool) {
        if let existing = try child(named: name, of: parent) {
            guard try inode(existing).i_mode & UInt16(LINUX_S_IFMT) == UInt16(LINUX_S_IFDIR) else {
                throw AccountsError(.filesystem, "\(path) in \(source) exists but is not a directory")
            }
            return (existing, false)
        }
        var code = ext2fs_mkdir(handle, parent, 0, name)
        if code == errcode_t(EXT2_ET_DIR_NO_SPACE) {
            try check(ext2fs_expand_dir(handle, parent), "growing the directory holding \(path)")
            code = ext2fs_mkdir(handle, parent, 0, name)
        }
        try check(code, "creating directory \(path)")
        guard let ino = try child(named: name, of: parent) else {
            throw AccountsError(.filesystem, "directory \(path) vanished right after creating it in \(source)")
        }
        try setAttributes(ino, permissions: permissions, uid: uid, gid: gid)
        return (ino, true)
    }

    func makeSymlink(in parent: ext2_ino_t, name: String, path: String, target: String,
                     uid: UInt32, gid: UInt32) throws(AccountsError) {
        var code = ext2fs_symlink(handle, parent, 0, name, target)
        if code == errcode_t(EXT2_ET_DIR_NO_SPACE) {
            try check(ext2fs_expand_dir(handle, parent), "growing the directory holding \(path)")
            code = ext2fs_symlink(handle, parent, 0, name, target)
        }
        try check(code, "creating symlink \(path)")
        guard let ino = try child(named: name, of: parent) else { return }
        try setAttributes(ino, permissions: 0o777, uid: uid, gid: gid)
    }

    /// A symlink's target: fast symlinks keep it in the inode's block array, others in a
    /// data block read like a file.
    func symlinkTarget(_ ino: ext2_ino_t, path: String) throws(AccountsError) -> String {
        var node = try inode(ino)
        if ext2fs_is_fast_symlink(&node) != 0 {
            let length = Int(node.i_size)
            let bytes = withUnsafeBytes(of: &node.i_block) { Array($0.prefix(length)) }
            return String(decoding: bytes, as: UTF8.self)
        }
        return String(decoding: try readFile(ino, path: path), as: UTF8.self)
    }

    /// New inode linked into `directory`, as mke2fs's create_inode.c does it.
    private func createInode(in directory: ext2_ino_t, name: String, path: String, mode: UInt16,
                             fileType: Int32) throws(AccountsError) -> ext2_ino_t {
        var ino: ext2_ino_t = 0
        try check(ext2fs_new_inode(handle, directory, Int32(mode), nil, &ino), "allocating an inode for \(path)")
        var code = ext2fs_link(handle, directory, name, ino, fileType)
        if code == errcode_t(EXT2_ET_DIR_NO_SPACE) {
            try check(ext2fs_expand_dir(handle, directory), "growing the directory holding \(path)")
            code = ext2fs_link(handle, directory, name, ino, fileType)
        }
        try check(code, "linking \(path)")
        ext2fs_inode_alloc_stats2(handle, ino, 1, 0)
        var node = ext2_inode()
        let now = UInt32(truncatingIfNeeded: time(nil))
        node.i_mode = mode
        node.i_atime = now; node.i_ctime = now; node.i_mtime = now
        node.i_links_count = 1
        let incompat = superblock.s_feature_incompat
        if incompat & UInt32(EXT4_FEATURE_INCOMPAT_INLINE_DATA) != 0 {
            node.i_flags |= UInt32(EXT4_INLINE_DATA_FL)
        } else if incompat & UInt32(EXT3_FEATURE_INCOMPAT_EXTENTS) != 0 {
            // An empty extent tree header in i_block, so the file gets extents like mkfs -d makes.
            var extents: ext2_extent_handle_t?
            try check(ext2fs_extent_open2(handle, ino, &node, &extents), "starting the extent tree of \(path)")
            ext2fs_extent_free(extents)
        }
        try check(ext2fs_write_new_inode(handle, ino, &node), "writing the inode of \(path)")
        if node.i_flags & UInt32(EXT4_INLINE_DATA_FL) != 0 {
            try check(ext2fs_inline_data_init(handle, ino), "initialising inline data of \(path)")
        }
        return ino
    }

    // MARK: Directories

    struct Entry {
        var name: String
        var ino: ext2_ino_t
        var fileType: Int
    }

    /// Entries of a directory except "." and "..".
    func entries(of directory: ext2_ino_t) throws(AccountsError) -> [Entry] {
        final class Box { var entries: [Entry] = [] }
        let box = Box()
        let code = withExtendedLifetime(box) {
            ext2fs_dir_iterate(handle, directory, 0, nil, { dirent, _, _, _, context in
                guard let dirent, let context else { return 0 }
                let box = Unmanaged<Box>.fromOpaque(context).takeUnretainedValue()
                let length = Int(ext2fs_dirent_name_len(dirent))
                let name = withUnsafeBytes(of: &dirent.pointee.name) { String(decoding: $0.prefix(length), as: UTF8.self) }
                if name != "." && name != ".." {
                    box.entries.append(Entry(name: name, ino: dirent.pointee.inode,
                                             fileType: Int(ext2fs_dirent_file_type(dirent))))
                }
                return 0
            }, Unmanaged.passUnretained(box).toOpaque())
        }
        try check(code, "listing directory inode \(directory)")
        return box.entries
    }

    func child(named name: String, of directory: ext2_ino_t) throws(AccountsError) -> ext2_ino_t? {
        var ino: ext2_ino_t = 0
        let code = ext2fs_lookup(handle, directory, name, Int32(name.utf8.count), nil, &ino)
        if code == errcode_t(EXT2_ET_FILE_NOT_FOUND) { return nil }
        try check(code, "looking up \(name)")
        return ino
    }
}
