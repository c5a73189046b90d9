import BlockDevices
import Foundation

extension Profile {
    /// The partition table format of an image, which decides the bytes at the start (and end)
    /// of the card that a raw blob must never touch.
    public enum PartitionTableKind: String, Sendable {
        /// Sector 0 (boot code, table and signature).
        case mbr
        /// Sectors 0–33 (protective MBR, header, 128 entries) and the last 33 sectors (backup).
        case gpt
    }

    /// One blob with its length, as `checkBlobPlacements` needs it.
    public struct BlobPlacement: Sendable, Equatable {
        public var file: String
        public var offset: UInt64
        public var length: UInt64
        public var location: ConfigLocation

        public init(file: String, offset: UInt64, length: UInt64, location: ConfigLocation) {
            self.file = file
            self.offset = offset
            self.length = length
            self.location = location
        }

        var end: UInt64 { offset + length }
    }

    /// Refuses this profile's blobs if any would overwrite a partition, the partition table or
    /// another blob — before anything is written, because a U-Boot written over the FAT
    /// partition (or the GPT) gives a card that fails to boot with no hint why.
    ///
    /// - Parameters:
    ///   - partitions: the partitions read from the image's first MiB (byte extents).
    ///   - partitionTable: the table format of the image.
    ///   - diskSizeBytes: the size of the image (or card) whose last sectors hold the backup
    ///     GPT, when known; blobs must also end before it.
    /// The blob lengths are the sizes of the blob files (the only file access here); an
    /// unreadable or empty blob is an error at its `[[blobs]]` line.
    public func checkBlobs(against partitions: [(number: Int, startByte: UInt64, sizeBytes: UInt64)],
                           partitionTable: PartitionTableKind = .mbr,
                           diskSizeBytes: UInt64? = nil) throws {
        let placements = try blobs.map { blob -> BlobPlacement in
            let attributes: [FileAttributeKey: Any]
            do {
                attributes = try FileManager.default.attributesOfItem(atPath: blob.file)
            } catch {
                throw blob.location.error("blob file not found or unreadable: \(blob.file)")
            }
            let length = (attributes[.size] as? NSNumber)?.uint64Value ?? 0
            return BlobPlacement(file: blob.file, offset: blob.offset, length: length, location: blob.location)
        }
        try Self.checkBlobPlacements(placements, against: partitions, partitionTable: partitionTable,
                                     diskSizeBytes: diskSizeBytes)
    }

    /// The pure rule behind `checkBlobs`: every blob is non-empty, lies outside the partition
    /// table area and every partition, inside the disk, and apart from every other blob.
    public static func checkBlobPlacements(_ blobs: [BlobPlacement],
                                           against partitions: [(number: Int, startByte: UInt64, sizeBytes: UInt64)],
                                           partitionTable: PartitionTableKind = .mbr,
                                           diskSizeBytes: UInt64? = nil) throws {
        let sector: UInt64 = 512
        var reserved: [(what: String, start: UInt64, end: UInt64)] = []
        switch partitionTable {
        case .mbr:
            reserved.append(("the MBR (sector 0)", 0, sector))
        case .gpt:
            reserved.append(("the GPT (sectors 0–33)", 0, 34 * sector))
            if let size = diskSizeBytes, size >= 33 * sector {
                reserved.append(("the backup GPT (last 33 sectors)", size - 33 * sector, size))
            }
        }
        for partition in partitions where partition.sizeBytes > 0 {
            reserved.append(("partition \(partition.number) (\(range(partition.startByte, partition.startByte + partition.sizeBytes)))",
                             partition.startByte, partition.startByte + partition.sizeBytes))
        }
        for blob in blobs {
            let name = URL(fileURLWithPath: blob.file).lastPathComponent
            guard blob.length > 0 else { throw blob.location.error("blob \(name) is empty") }
            let (end, overflow) = blob.offset.addingReportingOverflow(blob.length)
            if overflow { throw blob.location.error("blob \(name) at offset \(blob.offset) is too large") }
            let bytes = "\(name) (\(range(blob.offset, end)), \(ByteCount.exact(blob.length)))"
            if let size = diskSizeBytes, end > size {
                throw blob.location.error("blob \(bytes) ends after the end of the disk (\(size) bytes)")
            }
            for area in reserved where blob.offset < area.end && area.start < end {
                throw blob.location.error("blob \(bytes) would overwrite \(area.what); move the blob or the partition")
            }
        }
        let sorted = blobs.sorted { $0.offset < $1.offset }
        for (first, second) in zip(sorted, sorted.dropFirst()) where first.end > second.offset {
            let firstName = URL(fileURLWithPath: first.file).lastPathComponent
            let secondName = URL(fileURLWithPath: second.file).lastPathComponent
            throw second.location.error("blob \(secondName) at \(range(second.offset, second.end)) overlaps blob \(firstName) at \(range(first.offset, first.end)) (\(first.location.keyPath))")
        }
    }

    /// Parse-time check, before lengths are known: two blobs at the same offset, or a blob
    /// starting inside a partition whose extent the profile states.
    func validateBlobsAmongThemselves() throws {
        var offsets: [UInt64: Blob] = [:]
        for blob in blobs {
            if let other = offsets[blob.offset] {
                throw blob.location.error("blob at offset \(blob.offset) overlaps \(other.location.keyPath) at the same offset")
            }
            offsets[blob.offset] = blob
            for partition in partitions {
                guard let start = partition.start, let size = partition.size else { continue }
                if blob.offset >= start && blob.offset < start + size {
                    throw blob.location.error("blob at offset \(blob.offset) lies inside partition \(partition.number) (\(range(start, start + size))) stated in \(partition.location.keyPath)")
                }
            }
        }
    }
}

/// "bytes 8192–540671": inclusive, as people count.
func range(_ start: UInt64, _ end: UInt64) -> String {
    "bytes \(start)–\(end - 1)"
}

import Accounts

extension Profile {
    /// `checkBlobs` against the partition table found in the image's first bytes (the
    /// write engine hands over its first chunk before writing anything).
    public func checkBlobs(againstImageStart bytes: UnsafeRawBufferPointer) throws {
        let head = [UInt8](bytes.prefix(1 << 20))
        guard let table = try? PartitionTable.parse(bytes: head) else {
            try checkBlobs(against: [], partitionTable: .mbr)
            return
        }
        try checkBlobs(against: table.partitions.map { ($0.number, $0.start, $0.size) },
                       partitionTable: table.scheme == .gpt ? .gpt : .mbr)
    }
}
