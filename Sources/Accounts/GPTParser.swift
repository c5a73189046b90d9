/// GUID partition table: header at LBA 1, entries where the header says.
enum GPTParser {
    static func parse(sectorSize: Int, source: String, read: PartitionTable.Reader) throws(AccountsError) -> PartitionTable {
        let sector = UInt64(sectorSize)
        guard let header = try read(sector, 92) else {
            throw AccountsError(.partitionTable, "\(source): protective MBR but no GPT header at LBA 1 (truncated)")
        }
        guard header.starts(with: Array("EFI PART".utf8)) else {
            throw AccountsError(.partitionTable,
                "\(source): protective MBR but no \"EFI PART\" signature at LBA 1 (sector size \(sectorSize)): damaged GPT")
        }
        let headerSize = Int(le32(header, 12))
        guard (92...sectorSize).contains(headerSize), let fullHeader = try read(sector, headerSize) else {
            throw AccountsError(.partitionTable, "\(source): GPT header size \(headerSize) is invalid")
        }
        var zeroed = fullHeader
        for i in 16..<20 { zeroed[i] = 0 }
        guard CRC32.checksum(zeroed) == le32(fullHeader, 16) else {
            throw AccountsError(.partitionTable, "\(source): GPT header CRC does not match: damaged GPT")
        }
        let entriesLBA = le64(header, 72)
        let count = Int(le32(header, 80)), entrySize = Int(le32(header, 84))
        guard count <= 1024, entrySize >= 128, entrySize <= 4096, entrySize % 8 == 0 else {
            throw AccountsError(.partitionTable,
                "\(source): GPT header declares \(count) entries of \(entrySize) bytes: not plausible")
        }
        guard let entriesOffset = byteOffset(entriesLBA, sector) else {
            throw AccountsError(.partitionTable, "\(source): GPT entries at LBA \(entriesLBA) lie beyond any disk: damaged GPT")
        }
        guard let entries = try read(entriesOffset, count * entrySize) else {
            throw AccountsError(.partitionTable,
                "\(source): GPT entries at LBA \(entriesLBA) lie beyond the data available")
        }
        guard CRC32.checksum(entries) == le32(header, 88) else {
            throw AccountsError(.partitionTable, "\(source): GPT partition entries CRC does not match: damaged GPT")
        }
        var partitions: [Partition] = []
        for i in 0..<count {
            let o = i * entrySize
            let type = Array(entries[o..<o + 16])
            guard type.contains(where: { $0 != 0 }) else { continue }
            let first = le64(entries, o + 32), last = le64(entries, o + 40)
            guard last >= first else {
                throw AccountsError(.partitionTable, "\(source): GPT entry \(i + 1) ends before it starts")
            }
            // The CRCs only say that the table is as its writer made it: LBAs are checked too,
            // so that every partition's bytes are a file offset (a disk of 2^63 bytes is none).
            guard let start = byteOffset(first, sector), last < UInt64.max, let end = byteOffset(last + 1, sector) else {
                throw AccountsError(.partitionTable, "\(source): GPT entry \(i + 1) (LBA \(first)–\(last)) lies beyond any disk: damaged GPT")
            }
            let nameUnits = (0..<36).map { le16(entries, o + 56 + 2 * $0) }.prefix { $0 != 0 }
            partitions.append(Partition(number: i + 1, start: start, size: end - start,
                                        kind: .gpt(guidString(type)), name: String(decoding: nameUnits, as: UTF16.self)))
        }
        return PartitionTable(scheme: .gpt, sectorSize: sectorSize, partitions: partitions)
    }

    /// `lba` sectors in bytes, or nil when that is no file offset (more than Int64.max).
    static func byteOffset(_ lba: UInt64, _ sector: UInt64) -> UInt64? {
        let (bytes, overflow) = lba.multipliedReportingOverflow(by: sector)
        return overflow || bytes > UInt64(Int64.max) ? nil : bytes
    }

    /// GPT stores the first three GUID fields little-endian.
    static func guidString(_ b: [UInt8]) -> String {
        let order = [3, 2, 1, 0, -1, 5, 4, -1, 7, 6, -1, 8, 9, -1, 10, 11, 12, 13, 14, 15]
        return order.map { $0 < 0 ? "-" : hex2(b[$0]) }.joined()
    }

    static func hex2(_ v: UInt8) -> String {
        let digits = Array("0123456789ABCDEF")
        return String([digits[Int(v >> 4)], digits[Int(v & 15)]])
    }
}

/// CRC-32 (IEEE 802.3, reflected), as GPT uses.
enum CRC32 {
    static let table: [UInt32] = (0..<256).map { n in
        (0..<8).reduce(UInt32(n)) { c, _ in c & 1 != 0 ? 0xEDB8_8320 ^ (c >> 1) : c >> 1 }
    }

    static func checksum(_ bytes: [UInt8]) -> UInt32 {
        ~bytes.reduce(~UInt32(0)) { table[Int(($0 ^ UInt32($1)) & 0xFF)] ^ ($0 >> 8) }
    }
}
