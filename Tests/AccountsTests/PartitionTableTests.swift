import Foundation
import Testing
@testable import Accounts
import TestSupport

@Suite("MBR and GPT partition tables, checked against sfdisk")
struct PartitionTableTests {
    /// sfdisk's own reading of the table: (number, start sector, sectors).
    static func sfdiskView(_ path: String) throws -> [(Int, UInt64, UInt64)] {
        let json = try Shell.must(["sfdisk", "--json", path])
        struct Dump: Decodable { struct Table: Decodable { var partitions: [Part] }; var partitiontable: Table }
        struct Part: Decodable { var node: String; var start: UInt64; var size: UInt64 }
        let dump = try JSONDecoder().decode(Dump.self, from: Data(json.utf8))
        return dump.partitiontable.partitions.map { part in
            let digits = part.node.reversed().prefix { $0.isNumber }.reversed()
            return (Int(String(digits))!, part.start, part.size)
        }
    }

    @Test(arguments: ["dos", "gpt"])
    func tableMatchesSfdisk(label: String) throws {
        var options = DiskImage.Options()
        options.label = label
        let image = try DiskImage(options)
        let table = try PartitionTable.parse(path: image.path)
        #expect(table.scheme == (label == "gpt" ? .gpt : .mbr))
        let expected = try Self.sfdiskView(image.path)
        #expect(table.partitions.map(\.number) == expected.map(\.0))
        #expect(table.partitions.map(\.start) == expected.map { $0.1 * 512 })
        #expect(table.partitions.map(\.size) == expected.map { $0.2 * 512 })
        if label == "gpt" {
            #expect(table.partitions[1].kind == .gpt("0FC63DAF-8483-4772-8E79-3D69D8477DE4"))
        } else {
            #expect(table.partitions.map(\.kind) == [.mbr(0x0c), .mbr(0x83)])
        }
        // The first MiB is enough for the lead's overlap check, and gives the same answer.
        let handle = try FileHandle(forReadingFrom: URL(fileURLWithPath: image.path))
        let firstMiB = [UInt8](try handle.read(upToCount: 1 << 20)!)
        try handle.close()
        #expect(try PartitionTable.parse(bytes: firstMiB, sectorSize: 512) == table)
    }

    @Test func filesystemsAndLabelsAreProbed() throws {
        let image = try DiskImage()
        let boot = try PartitionLocator.locate(.label("BOOT"), in: image.path, requireExt: false)
        #expect(boot.partition.number == 1 && boot.filesystem.kind == .vfat && boot.filesystem.label == "BOOT")
        let root = try Injector.locate(target: image.path, root: .label("rootfs"))
        #expect(root.partition.number == 2 && root.filesystem.kind == .ext4 && root.partition.start == image.rootOffset)
        #expect(try Injector.locate(target: image.path, root: .onlyExtPartition).partition.number == 2)
    }

    @Test func logicalPartitionsAreNumberedFromFive() throws {
        let dir = try TemporaryDirectory()
        let path = dir.file("ext.img")
        try Shell.must(["truncate", "-s", "64M", path])
        try Shell.must(["sfdisk", "-q", path], stdin: """
            label: dos
            start=2048, size=8192, type=83
            start=10240, size=100000, type=5
            start=12288, size=8192, type=83
            start=22528, size=8192, type=82

            """)
        let table = try PartitionTable.parse(path: path)
        #expect(table.partitions.map(\.number) == [1, 2, 5, 6])
        #expect(table.partitions.map(\.start) == [2048, 10240, 12288, 22528].map { UInt64($0) * 512 })
        #expect(table.partitions[1].isExtendedContainer)
        #expect(try Self.sfdiskView(path).map(\.0) == [1, 2, 5, 6])
    }

    @Test func missingSignatureIsNotAPartitionTable() throws {
        #expect { _ = try PartitionTable.parse(bytes: [UInt8](repeating: 0, count: 4096)) }
            throws: { (($0 as? AccountsError)?.message.contains("no MBR signature") == true) }
        #expect(throws: AccountsError.self) { _ = try PartitionTable.parse(bytes: [0x55, 0xAA]) }
    }

    @Test func damagedGPTIsAnErrorNotAGuess() throws {
        var options = DiskImage.Options()
        options.label = "gpt"
        let image = try DiskImage(options)
        let handle = try FileHandle(forReadingFrom: URL(fileURLWithPath: image.path))
        let good = [UInt8](try handle.read(upToCount: 1 << 20)!)
        try handle.close()
        var badHeader = good
        badHeader[512 + 40] ^= 0xFF // first usable LBA: covered by the header CRC
        #expect { _ = try PartitionTable.parse(bytes: badHeader) } throws: { (($0 as? AccountsError)?.message.contains("header CRC") == true) }
        var badEntries = good
        badEntries[1024 + 128 + 32] ^= 0x01 // second entry's first LBA
        #expect { _ = try PartitionTable.parse(bytes: badEntries) } throws: { (($0 as? AccountsError)?.message.contains("entries CRC") == true) }
        var noSignature = good
        noSignature[512] = UInt8(ascii: "X")
        #expect { _ = try PartitionTable.parse(bytes: noSignature) } throws: { (($0 as? AccountsError)?.message.contains("EFI PART") == true) }
        #expect(throws: AccountsError.self) { _ = try PartitionTable.parse(bytes: Array(good.prefix(600))) }
    }

    /// An sfdisk-made GPT whose first entry (or the header's entries LBA) python rewrites,
    /// CRCs recomputed with zlib: a table as a hostile or broken tool could write it.
    static func craftedGPT(first: UInt64, last: UInt64, entriesLBA: UInt64? = nil) throws -> DiskImage {
        var options = DiskImage.Options()
        options.label = "gpt"
        let image = try DiskImage(options)
        try Shell.must(["python3", "-", image.path, String(first), String(last), entriesLBA.map(String.init) ?? "-"], stdin: """
            import struct, sys, zlib
            path, first, last, lba = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
            with open(path, "r+b") as f:
                f.seek(512); header = bytearray(f.read(92))
                entries_at, count, size = struct.unpack_from("<QII", header, 72)
                f.seek(entries_at * 512); entries = bytearray(f.read(count * size))
                struct.pack_into("<QQ", entries, 32, first, last)
                if lba != "-": struct.pack_into("<Q", header, 72, int(lba))
                struct.pack_into("<I", header, 88, zlib.crc32(entries))
                struct.pack_into("<I", header, 16, 0); struct.pack_into("<I", header, 16, zlib.crc32(header))
                f.seek(512); f.write(header)
                f.seek(entries_at * 512); f.write(entries)
            """)
        return image
    }

    /// The CRCs say only that the table is as its writer made it: LBAs whose bytes are no
    /// file offset (past 2^63) are a damaged table, named, not an arithmetic trap.
    @Test(arguments: [
        (UInt64(1) << 60, (UInt64(1) << 60) + 10, nil),  // LBA × 512 overflows 64 bits
        (0, UInt64.max, nil),                            // last + 1 overflows
        (UInt64(1) << 54, (UInt64(1) << 54) + 8, nil),   // starts at byte 2^63
        (2048, 4095, UInt64(1) << 56),                   // the entries' LBA × 512 overflows
    ] as [(UInt64, UInt64, UInt64?)])
    func gptBeyondAnyDiskIsAnError(first: UInt64, last: UInt64, entriesLBA: UInt64?) throws {
        let image = try Self.craftedGPT(first: first, last: last, entriesLBA: entriesLBA), path = image.path
        #expect { _ = try PartitionTable.parse(path: path) } throws: { (($0 as? AccountsError)?.message.contains("beyond any disk") == true) }
        let bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)).prefix(1 << 20))
        #expect { _ = try PartitionTable.parse(bytes: bytes) } throws: { (($0 as? AccountsError)?.message.contains("beyond any disk") == true) }
    }

    @Test func craftedGPTWithinTheDiskIsRead() throws {
        let image = try Self.craftedGPT(first: 2048, last: 4095), path = image.path
        let table = try PartitionTable.parse(path: path)
        #expect(table.partitions.first?.start == 2048 * 512)
        #expect(table.partitions.first?.size == 2048 * 512)
        #expect(try Self.sfdiskView(path).first.map { [$0.1, $0.2] } == [2048, 2048], "sfdisk reads the crafted table the same")
    }

    @Test func crc32MatchesTheStandardCheckValue() {
        #expect(CRC32.checksum(Array("123456789".utf8)) == 0xCBF4_3926)
    }
}

@Suite("4Kn GPT")
struct NativeSectorGPTTests {
    @Test func gptWith4096ByteSectorsIsFoundInAnImageFile() throws {
        let dir = try TemporaryDirectory()
        let path = dir.file("4kn.img")
        try Shell.must(["truncate", "-s", "64M", path])
        // A loop device with 4096-byte logical blocks is a 4Kn disk: sfdisk writes its GPT
        // in 4096-byte LBAs, and the device path is read with BLKSSZGET.
        let loop = try Shell.must(["losetup", "--find", "--show", "--sector-size", "4096", path])
            .trimmingCharacters(in: .whitespacesAndNewlines)
        defer { _ = try? Shell.run(["losetup", "-d", loop]) }
        try Shell.must(["sfdisk", "-q", "--no-reread", loop], stdin: "label: gpt\nstart=256, size=2048, type=L\nstart=2304, type=L\n")
        for source in [loop, path] {
            let table = try PartitionTable.parse(path: source)
            #expect(table.scheme == .gpt && table.sectorSize == 4096, "\(source)")
            #expect(table.partitions.map(\.start) == [256 * 4096, 2304 * 4096], "\(source)")
            #expect(table.partitions[0].size == 2048 * 4096, "\(source)")
        }
    }
}
