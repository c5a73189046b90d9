import Foundation

/// Gives a written card (or image) its users: the entry point the daemon and
/// `provision inject` call. Blocking; call it from a dedicated thread.
public enum Injector {
    /// Adds or updates `users` in the root filesystem of `target` (a whole-disk image file
    /// or block device), without mounting it.
    ///
    /// Every check runs before the first write: partition table, filesystem type, the four
    /// account files, each user spec, each hash, free blocks and inodes. Any failure there
    /// leaves the target byte-identical.
    public static func inject(target: String, root: RootLocator, users: [UserSpec],
                              hashMethod: HashMethod = .sha512(rounds: nil),
                              now: Date = Date()) throws(AccountsError) -> InjectionReport {
        guard !users.isEmpty else { throw AccountsError(.invalidSpec, "no users to inject into \(target)") }
        let located = try PartitionLocator.locate(root, in: target)
        let fs = try Ext2Filesystem(path: target, offset: located.partition.start, writable: true)
        let plan: InjectionPlan
        do throws(AccountsError) {
            plan = try prepare(fs, located: located, target: target, users: users, hashMethod: hashMethod, now: now)
        } catch {
            fs.discard()
            throw error
        }
        // From here on the filesystem changes. A failure still flushes what was written,
        // so the bitmaps match the blocks in use and e2fsck finds a consistent filesystem.
        var written: [String] = []
        do throws(AccountsError) {
            for operation in plan.operations {
                try apply(operation, to: fs)
                written.append(operation.path)
            }
        } catch {
            try? fs.close()
            throw AccountsError(error.code, error.message
                + " (after writing \(written.count) of \(plan.operations.count) files; check the card with e2fsck)")
        }
        try fs.close()
        return InjectionReport(target: target, partition: located.partition.number, offset: located.partition.start,
                               filesystem: located.filesystem.kind, label: located.filesystem.label,
                               users: plan.users, filesWritten: written)
    }

    /// Every check `inject` makes before its first write — partition, filesystem, the four
    /// account files, each user against them (groups, shell, uid and name conflicts), each
    /// hash, free blocks and inodes — on a filesystem opened read-only, and nothing written.
    /// The config check runs it on raw images, so a card is never written for an injection
    /// the image itself already refuses.
    public static func rehearse(target: String, root: RootLocator, users: [UserSpec],
                                hashMethod: HashMethod = .sha512(rounds: nil), now: Date = Date()) throws(AccountsError) {
        guard !users.isEmpty else { return }
        let located = try PartitionLocator.locate(root, in: target)
        let fs = try Ext2Filesystem(path: target, offset: located.partition.start, writable: false)
        defer { fs.discard() }
        _ = try prepare(fs, located: located, target: target, users: users, hashMethod: hashMethod, now: now)
    }

    /// The plan, once every check that can be made before writing has passed.
    private static func prepare(_ fs: Ext2Filesystem, located: LocatedPartition, target: String, users: [UserSpec],
                                hashMethod: HashMethod, now: Date) throws(AccountsError) -> InjectionPlan {
        // A filesystem that claims more bytes than its partition holds would have
        // libext2fs write into the next partition: a damaged table or a wrong image.
        guard fs.byteSize <= located.partition.size else {
            throw AccountsError(.filesystem, """
                the filesystem in partition \(located.partition.number) of \(target) spans \(fs.byteSize) bytes \
                but the partition holds \(located.partition.size): refusing to write past the partition
                """)
        }
        let plan = try InjectionPlan.build(filesystem: fs, users: users, hashMethod: hashMethod, now: now)
        try refuseUnverifiableHashes(plan.users, in: fs)
        try plan.preflight(fs)
        let need = plan.worstCase(blockSize: fs.blockSize)
        guard need.blocks <= fs.freeBlocks, need.inodes <= fs.freeInodes else {
            throw AccountsError(.noSpace, """
                partition \(located.partition.number) of \(target) is too full: injection needs up to \
                \(need.blocks) blocks and \(need.inodes) inodes, the filesystem has \(fs.freeBlocks) free \
                blocks and \(fs.freeInodes) free inodes; grow the partition or shrink /etc/skel
                """)
        }
        return plan
    }

    /// A user whose hash the image's login cannot check could never log in (LoginCapabilities).
    /// Refused before anything is written; unknown capabilities let the users through.
    static func refuseUnverifiableHashes(_ users: [InjectedUser], in fs: Ext2Filesystem) throws(AccountsError) {
        let capabilities = try LoginCapabilities.inspect(fs)
        for user in users {
            if case .notVerifiable(let reason) = capabilities.verdict(forHash: user.hash) {
                throw AccountsError(.invalidHash, "user \(user.name): \(reason)")
            }
        }
    }

    /// Finds the root partition and says what it holds, without changing anything.
    public static func locate(target: String, root: RootLocator) throws(AccountsError) -> LocatedPartition {
        try PartitionLocator.locate(root, in: target)
    }

    /// Finds the root partition in a partition table read elsewhere (the config check reads
    /// it from a compressed image's decompressed start), by the same rule as `inject`.
    /// `partitionStart` gives the first `FilesystemProbe.probeLength` bytes of a partition.
    public static func locate(root: RootLocator, table: PartitionTable, source: String,
                              partitionStart: (Partition) -> [UInt8]) throws(AccountsError) -> LocatedPartition {
        try PartitionLocator.choose(root, table: table, source: source, requireExt: true, partitionStart: partitionStart)
    }

    /// Runs `e2fsck -fn` on the root partition (read-only, forced full check).
    public static func check(target: String, root: RootLocator) throws(AccountsError) -> FilesystemCheck {
        let located = try PartitionLocator.locate(root, in: target)
        return try FilesystemCheck.run(target: target, offset: located.partition.start)
    }

    private static func apply(_ operation: InjectionPlan.Operation, to fs: Ext2Filesystem) throws(AccountsError) {
        let path = operation.path
        let name = String(path.split(separator: "/").last ?? "")
        let parentPath = String(path.dropLast(name.count + 1))
        guard let parent = try fs.lookup(parentPath.isEmpty ? "/" : parentPath) else {
            throw AccountsError(.filesystem, "directory \(parentPath) does not exist in \(fs.source)")
        }
        switch operation {
        case .file(_, let contents, let permissions, let uid, let gid):
            try fs.writeFile(in: parent, name: name, path: path, contents: contents,
                             permissions: permissions, uid: uid, gid: gid)
        case .directory(_, let permissions, let uid, let gid):
            _ = try fs.makeDirectory(in: parent, name: name, path: path, permissions: permissions, uid: uid, gid: gid)
        case .symlink(_, let target, let uid, let gid):
            try fs.makeSymlink(in: parent, name: name, path: path, target: target, uid: uid, gid: gid)
        }
    }
}
