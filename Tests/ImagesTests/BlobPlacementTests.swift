import Foundation
import Station
import Testing

/// Raw blobs must never land on a partition, the partition table or another blob.
struct BlobPlacementTests {
    typealias Placement = Profile.BlobPlacement
    static let mib: UInt64 = 1 << 20
    /// The test image's layout: boot 1–99 MiB, root 100–249 MiB.
    static let partitions: [(number: Int, startByte: UInt64, sizeBytes: UInt64)] = [
        (1, 1 * mib, 98 * mib), (2, 100 * mib, 149 * mib),
    ]

    func blob(_ name: String, at offset: UInt64, length: UInt64, index: Int = 0) -> Placement {
        Placement(file: "/x/\(name)", offset: offset, length: length,
                  location: ConfigLocation(file: "board/profile.toml", line: 10 + index, keyPath: "blobs[\(index)]"))
    }

    func refusal(_ blobs: [Placement], table: Profile.PartitionTableKind = .mbr, disk: UInt64? = nil) -> ConfigError? {
        do {
            try Profile.checkBlobPlacements(blobs, against: Self.partitions, partitionTable: table, diskSizeBytes: disk)
            return nil
        } catch {
            return error as? ConfigError
        }
    }

    @Test func sunxiUBootAt8KiBFitsBeforeTheFirstPartition() {
        #expect(refusal([blob("u-boot-sunxi-with-spl.bin", at: 8192, length: 600 << 10)]) == nil)
    }

    @Test func blobReachingTheFirstPartitionIsRefused() throws {
        let error = try #require(refusal([blob("u-boot.bin", at: 8192, length: 2 * Self.mib)]))
        #expect(error.line == 10 && error.keyPath == "blobs[0]")
        #expect(error.message.contains("would overwrite partition 1 (bytes 1048576–103809023)"))
        #expect(error.message.contains("bytes 8192–2105343"))
    }

    @Test func blobInsideTheRootPartitionIsRefused() throws {
        let error = try #require(refusal([blob("x.bin", at: 120 * Self.mib, length: 512)]))
        #expect(error.message.contains("partition 2"))
    }

    @Test func blobOverTheMBRIsRefused() throws {
        let error = try #require(refusal([blob("boot0.bin", at: 0, length: 446)]))
        #expect(error.message.contains("the MBR (sector 0)"))
        #expect(refusal([blob("spl.bin", at: 512, length: 512)]) == nil)
    }

    @Test func blobOverTheGPTEntriesIsRefused() throws {
        // 8 KiB is fine with an MBR but lies inside GPT's 128 partition entries (sectors 2–33).
        let error = try #require(refusal([blob("u-boot.bin", at: 8192, length: 4096)], table: .gpt))
        #expect(error.message.contains("the GPT (sectors 0–33)"))
        #expect(refusal([blob("u-boot.bin", at: 34 * 512, length: 4096)], table: .gpt) == nil)
    }

    @Test func blobOverTheBackupGPTIsRefused() throws {
        let disk: UInt64 = 250 * Self.mib
        let error = try #require(refusal([blob("tail.bin", at: disk - 8192, length: 4096)], table: .gpt, disk: disk))
        #expect(error.message.contains("backup GPT"))
    }

    @Test func blobPastTheEndOfTheDiskIsRefused() throws {
        let error = try #require(refusal([blob("big.bin", at: 249 * Self.mib + 512, length: 2 * Self.mib)], disk: 250 * Self.mib))
        #expect(error.message.contains("ends after the end of the disk"))
    }

    @Test func overlappingBlobsAreRefusedNamingBoth() throws {
        let error = try #require(refusal([
            blob("spl.bin", at: 8192, length: 64 << 10, index: 0),
            blob("u-boot.itb", at: 40 << 10, length: 512 << 10, index: 1),
        ]))
        #expect(error.keyPath == "blobs[1]" && error.line == 11)
        #expect(error.message.contains("overlaps blob spl.bin"))
        // Touching end to start is fine.
        #expect(refusal([blob("a", at: 8192, length: 8192, index: 0), blob("b", at: 16384, length: 8192, index: 1)]) == nil)
    }

    @Test func emptyBlobIsRefused() throws {
        let error = try #require(refusal([blob("empty.bin", at: 8192, length: 0)]))
        #expect(error.message.contains("empty"))
    }

    @Test func checkBlobsReadsTheBlobFileSizes() throws {
        let directory = try makeTemporaryDirectory("blobs")
        defer { try? FileManager.default.removeItem(at: directory) }
        let profile = try Profile.parse(toml: """
            name = "sunxi"
            image = "a.img"
            [[blobs]]
            file = "u-boot-sunxi-with-spl.bin"
            offset = 8192
            """, source: "sunxi/profile.toml", baseDirectory: directory.path)
        // Missing file: the error points at the [[blobs]] entry.
        #expect(throws: ConfigError.self) { try profile.checkBlobs(against: Self.partitions) }
        let blobPath = directory.appendingPathComponent("u-boot-sunxi-with-spl.bin")
        try Data(count: 600 << 10).write(to: blobPath)
        try profile.checkBlobs(against: Self.partitions)
        try Data(count: 1 << 20).write(to: blobPath)  // now 8 KiB + 1 MiB reaches partition 1
        do {
            try profile.checkBlobs(against: Self.partitions)
            Issue.record("a 1 MiB blob at 8 KiB must overlap partition 1")
        } catch let error as ConfigError {
            #expect(error.description.hasPrefix("sunxi/profile.toml:3: blobs[0]: blob u-boot-sunxi-with-spl.bin"))
        }
    }
}
