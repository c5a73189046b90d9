import SystemPackage

/// How a profile names the root partition on a written card.
public enum RootLocator: Sendable, Equatable, CustomStringConvertible {
    /// Partition number as Linux counts it (p1, p2; MBR logical partitions from 5).
    case partition(Int)
    /// ext2/3/4 volume label (`e2label`), e.g. "rootfs" on Raspberry Pi OS.
    case label(String)
    /// The only ext2/3/4 partition on the disk; an error when there are several.
    case onlyExtPartition

    public var description: String {
        switch self {
        case .partition(let n): "partition \(n)"
        case .label(let l): "label \"\(l)\""
        case .onlyExtPartition: "the only ext2/3/4 partition"
        }
    }
}

/// A partition resolved for editing: where it is and what it holds.
public struct LocatedPartition: Sendable, Equatable {
    public var partition: Partition
    public var filesystem: FilesystemProbe
    public var table: PartitionTable.Scheme
}

enum PartitionLocator {
    /// Reads the table, probes every partition's superblock, and picks the root.
    /// Errors say what was found instead ("partition 1 is vfat, not ext4").
    static func locate(_ locator: RootLocator, in path: String, requireExt: Bool = true) throws(AccountsError) -> LocatedPartition {
        let fd: FileDescriptor
        do { fd = try FileDescriptor.open(FilePath(path), .readOnly, options: [.closeOnExec]) } catch {
            throw AccountsError(.io, "cannot open \(path): \(error)")
        }
        defer { try? fd.close() }
        let table = try PartitionTable.parse(fileDescriptor: fd, path: path)
        return try choose(locator, table: table, source: path, requireExt: requireExt) { p in
            let length = Int(min(UInt64(FilesystemProbe.probeLength), p.size))
            var buffer = [UInt8](repeating: 0, count: length)
            let got = (try? buffer.withUnsafeMutableBytes {
                try fd.read(fromAbsoluteOffset: Int64(p.start), into: $0)
            }) ?? 0
            return Array(buffer.prefix(got))
        }
    }

    /// The rule itself, on a table already read and a way to read each partition's first
    /// bytes: shared by injection (a card or image file) and the config check (the
    /// decompressed start of a profile's image), so the two cannot disagree.
    static func choose(_ locator: RootLocator, table: PartitionTable, source path: String, requireExt: Bool,
                       partitionStart: (Partition) -> [UInt8]) throws(AccountsError) -> LocatedPartition {
        var probes: [Int: FilesystemProbe] = [:]
        func probe(_ p: Partition) -> FilesystemProbe {
            if let known = probes[p.number] { return known }
            let found = FilesystemProbe(partitionStart: partitionStart(p))
            probes[p.number] = found
            return found
        }
        let usable = table.partitions.filter { !$0.isExtendedContainer }
        let summary = usable.map { "\($0.number) (\(probe($0).kind.rawValue))" }.joined(separator: ", ")
        let chosen: Partition
        switch locator {
        case .partition(let number):
            guard let p = table.partition(number: number) else {
                throw AccountsError(.partitionNotFound, """
                    \(path) has no partition \(number) (\(table.scheme.rawValue) partitions: \
                    \(summary.isEmpty ? "none" : summary)); fix the profile's root partition
                    """)
            }
            chosen = p
        case .label(let label):
            let matches = usable.filter { probe($0).label == label }
            guard matches.count == 1 else {
                let labels = usable.map { "\($0.number)=\"\(probe($0).label)\"" }.joined(separator: ", ")
                throw AccountsError(matches.isEmpty ? .partitionNotFound : .conflict, matches.isEmpty
                    ? "no partition of \(path) has the filesystem label \"\(label)\" (labels: \(labels))"
                    : "\(matches.count) partitions of \(path) have the label \"\(label)\": \(matches.map(\.number)); name the partition by number")
            }
            chosen = matches[0]
        case .onlyExtPartition:
            let ext = usable.filter { probe($0).kind.isExt }
            guard ext.count == 1 else {
                throw AccountsError(ext.isEmpty ? .partitionNotFound : .conflict, ext.isEmpty
                    ? "\(path) has no ext2/3/4 partition (partitions: \(summary.isEmpty ? "none" : summary))"
                    : "\(path) has several ext partitions (\(ext.map(\.number))): name the root partition by number or label")
            }
            chosen = ext[0]
        }
        let found = probe(chosen)
        guard found.kind.isExt || !requireExt else {
            throw AccountsError(.notExt, """
                partition \(chosen.number) of \(path) is \(found.kind == .unknown ? "not a recognised filesystem" : found.kind.rawValue), \
                not ext4: the root filesystem must be ext2/3/4 (partitions: \(summary))
                """)
        }
        return LocatedPartition(partition: chosen, filesystem: found, table: table.scheme)
    }
}
