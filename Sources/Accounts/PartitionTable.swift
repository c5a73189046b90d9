import SystemPackage

/// One partition: where it is in bytes, what the table calls it.
public struct Partition: Sendable, Equatable {
    public enum Kind: Sendable, Equatable {
        /// MBR type byte (0x83 Linux, 0x0c FAT32 LBA, 0x05/0x0f extended, …).
        case mbr(UInt8)
        /// GPT partition type GUID, upper-case canonical text form.
        case gpt(String)
    }
    /// 1-based, as Linux names them (`p1`); MBR logical partitions start at 5.
    public var number: Int
    public var start: UInt64
    public var size: UInt64
    public var kind: Kind
    /// GPT partition name (empty for MBR).
    public var name: String

    public var end: UInt64 { start + size }

    /// An MBR extended container holds logical partitions; it has no filesystem itself.
    public var isExtendedContainer: Bool {
        if case .mbr(let t) = kind { return t == 0x05 || t == 0x0f || t == 0x85 }
        return false
    }
}

/// MBR or GPT partition table of a whole-disk image or block device.
///
/// A protective MBR (type 0xEE) sends parsing to the GPT header at LBA 1; the header's
/// signature is required and its CRCs are checked, so a stale GPT after an MBR rewrite
/// is not trusted.
public struct PartitionTable: Sendable, Equatable {
    public enum Scheme: String, Sendable { case mbr = "MBR", gpt = "GPT" }

    public var scheme: Scheme
    public var sectorSize: Int
    public var partitions: [Partition]

    public func partition(number: Int) -> Partition? { partitions.first { $0.number == number } }

    /// Parses from bytes already read from the start of the disk (the first MiB is enough
    /// for any common layout). MBR logical partitions whose boot records lie past the end
    /// of `bytes` are left out; their extended container is still listed.
    public static func parse(bytes: [UInt8], sectorSize: Int = 512) throws(AccountsError) -> PartitionTable {
        try parse(sectorSize: sectorSize, source: "the given bytes") { offset, count in
            guard offset <= UInt64(bytes.count), UInt64(count) <= UInt64(bytes.count) - offset else { return nil }
            return Array(bytes[Int(offset)..<Int(offset) + count])
        }
    }

    /// Parses from an open image file or whole-disk block device. For a block device the
    /// sector size is the logical block size the kernel reports; for a file, 512 unless a
    /// GPT header is found only at 4096.
    public static func parse(fileDescriptor fd: FileDescriptor, path: String) throws(AccountsError) -> PartitionTable {
        let reader: (UInt64, Int) throws(AccountsError) -> [UInt8]? = { offset, count throws(AccountsError) in
            var buffer = [UInt8](repeating: 0, count: count)
            let got: Int
            do {
                got = try buffer.withUnsafeMutableBytes { try fd.read(fromAbsoluteOffset: Int64(offset), into: $0) }
            } catch {
                throw AccountsError(.io, "cannot read \(path) at offset \(offset): \(error)")
            }
            return got == count ? buffer : nil
        }
        if let sectorSize = BlockDeviceGeometry.logicalBlockSize(fd) {
            return try parse(sectorSize: sectorSize, source: path, read: reader)
        }
        do {
            return try parse(sectorSize: 512, source: path, read: reader)
        } catch let first {
            // 4Kn images carry the GPT header at byte 4096.
            if let table = try? parse(sectorSize: 4096, source: path, read: reader), table.scheme == .gpt {
                return table
            }
            throw first
        }
    }

    public static func parse(path: String) throws(AccountsError) -> PartitionTable {
        let fd: FileDescriptor
        do { fd = try FileDescriptor.open(FilePath(path), .readOnly, options: [.closeOnExec]) } catch {
            throw AccountsError(.io, "cannot open \(path): \(error)")
        }
        defer { try? fd.close() }
        return try parse(fileDescriptor: fd, path: path)
    }

    typealias Reader = (UInt64, Int) throws(AccountsError) -> [UInt8]?

    static func parse(sectorSize: Int, source: String, read: Reader) throws(AccountsError) -> PartitionTable {
        guard let mbr = try read(0, 512) else {
            throw AccountsError(.partitionTable, "\(source) is shorter than one sector: no partition table")
        }
        guard mbr[510] == 0x55, mbr[511] == 0xAA else {
            throw AccountsError(.partitionTable,
                "\(source) has no MBR signature (55 AA at byte 510): not a partitioned disk image")
        }
        let entries = (0..<4).map { i -> (type: UInt8, start: UInt64, count: UInt64) in
            let o = 446 + 16 * i
            return (mbr[o + 4], UInt64(le32(mbr, o + 8)), UInt64(le32(mbr, o + 12)))
        }
        if entries.contains(where: { $0.type == 0xEE }) {
            return try GPTParser.parse(sectorSize: sectorSize, source: source, read: read)
        }
        let sector = UInt64(sectorSize)
        var partitions: [Partition] = []
        for (i, e) in entries.enumerated() where e.type != 0 && e.count != 0 {
            let p = Partition(number: i + 1, start: e.start * sector, size: e.count * sector,
                              kind: .mbr(e.type), name: "")
            partitions.append(p)
            if p.isExtendedContainer {
                partitions += try logicalPartitions(in: p, sector: sector, read: read)
            }
        }
        return PartitionTable(scheme: .mbr, sectorSize: sectorSize, partitions: partitions)
    }

    /// Walks the chain of extended boot records; each holds one logical partition
    /// (relative to its EBR) and a link (relative to the container's start).
    static func logicalPartitions(in container: Partition, sector: UInt64, read: Reader) throws(AccountsError) -> [Partition] {
        var out: [Partition] = []
        var ebr = container.start
        var seen = Set<UInt64>()
        while out.count < 128, seen.insert(ebr).inserted {
            guard let record = try read(ebr, 512), record[510] == 0x55, record[511] == 0xAA else { break }
            let type = record[446 + 4]
            let start = UInt64(le32(record, 446 + 8)), count = UInt64(le32(record, 446 + 12))
            if type != 0 && count != 0 {
                out.append(Partition(number: 5 + out.count, start: ebr + start * sector,
                                     size: count * sector, kind: .mbr(type), name: ""))
            }
            let next = UInt64(le32(record, 462 + 8))
            guard record[462 + 4] != 0, next != 0 else { break }
            ebr = container.start + next * sector
        }
        return out
    }
}

func le16(_ b: [UInt8], _ o: Int) -> UInt16 { UInt16(b[o]) | UInt16(b[o + 1]) << 8 }
func le32(_ b: [UInt8], _ o: Int) -> UInt32 { (0..<4).reduce(0) { $0 | UInt32(b[o + $1]) << (8 * $1) } }
func le64(_ b: [UInt8], _ o: Int) -> UInt64 { (0..<8).reduce(0) { $0 | UInt64(b[o + $1]) << (8 * $1) } }
