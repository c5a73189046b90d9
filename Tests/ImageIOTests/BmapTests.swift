import Crypto
import Foundation
@testable import ImageIO
import Testing
import TestSupport

/// bmap handling checked against the real bmaptool: its bmap files, its copies.
@Suite("bmap files, against bmaptool", .serialized)
struct BmapTests {
    let scratch: TemporaryDirectory
    init() throws { scratch = try TemporaryDirectory("provision-test") }

    /// A 32 MiB sparse image with data in three places, and its bmap by `bmaptool create`.
    func sparseImage() throws -> (image: String, bmap: String, data: [(UInt64, [UInt8])]) {
        let image = scratch.file("sparse.img")
        try run("truncate", "-s", "32M", image)
        let pieces: [(UInt64, [UInt8])] = [(0, patternBytes(64 << 10, seed: 1)), (5 << 20, patternBytes(3 << 20, seed: 2)), (30 << 20 + 4096, patternBytes(8192, seed: 3))]
        let h = FileHandle(forUpdatingAtPath: image)!
        for (offset, bytes) in pieces { try h.seek(toOffset: offset); h.write(Data(bytes)) }
        try h.close()
        let bmap = image + ".bmap"
        try run("bmaptool", "create", "-o", bmap, image)
        return (image, bmap, pieces)
    }

    /// A version 1.3 bmap (SHA-1 checksums, its own SHA-1 over itself) of `data` for the
    /// given block ranges (first and last block, inclusive), written to `name`.
    func writeV13Bmap(_ name: String, data: Data, blockSize: UInt64, ranges: [(first: UInt64, last: UInt64)]) throws -> String {
        let imageSize = UInt64(data.count)
        var xml = ""
        for r in ranges {
            let bytes = data[Int(r.first * blockSize)..<Int(min((r.last + 1) * blockSize, imageSize))]
            let sha1 = Insecure.SHA1.hash(data: bytes).map { String(format: "%02x", $0) }.joined()
            xml += "        <Range sha1=\"\(sha1)\"> \(r.first == r.last ? "\(r.first)" : "\(r.first)-\(r.last)") </Range>\n"
        }
        let mapped = ranges.reduce(UInt64(0)) { $0 + $1.last - $1.first + 1 }
        func doc(_ sum: String) -> String {
            """
            <?xml version="1.0" ?>
            <bmap version="1.3">
                <ImageSize> \(imageSize) </ImageSize>
                <BlockSize> \(blockSize) </BlockSize>
                <BlocksCount> \((imageSize + blockSize - 1) / blockSize) </BlocksCount>
                <MappedBlocksCount> \(mapped) </MappedBlocksCount>
                <BmapFileSHA1> \(sum) </BmapFileSHA1>
                <BlockMap>
            \(xml)    </BlockMap>
            </bmap>

            """
        }
        let fileSum = Insecure.SHA1.hash(data: Data(doc(String(repeating: "0", count: 40)).utf8)).map { String(format: "%02x", $0) }.joined()
        let path = scratch.file(name)
        try doc(fileSum).write(toFile: path, atomically: true, encoding: .utf8)
        return path
    }

    @Test("a bmap made by bmaptool create parses, with its ranges and checksums")
    func parsesBmaptoolOutput() throws {
        let (_, bmapPath, _) = try sparseImage()
        let bmap = try Bmap.load(path: bmapPath)
        #expect(bmap.version.hasPrefix("2."))
        #expect(bmap.imageSize == 32 << 20 && bmap.blockSize == 4096)
        #expect(bmap.checksumType == .sha256)
        #expect(bmap.mappedBytes == UInt64(64 << 10) + UInt64(3 << 20) + 8192)
        #expect(bmap.ranges.allSatisfy { $0.checksum?.count == 64 })
    }

    @Test("with a bmap, the card equals what bmaptool copy produces, and unmapped blocks are not written")
    func matchesBmaptoolCopy() throws {
        let (image, bmapPath, pieces) = try sparseImage()
        let fill = scratch.file("fill.img")
        try write([UInt8](repeating: 0xAA, count: 48 << 20), to: fill)
        let ours = try LoopCard(label: "bmap-ours", size: 48 << 20, image: fill)
        defer { ours.close() }
        let theirs = try LoopCard(label: "bmap-theirs", size: 48 << 20, image: fill)
        defer { theirs.close() }

        var options = WriteOptions()
        options.bmap = try Bmap.load(path: bmapPath)
        let result = try ImageWriter.write(source: try ImageSource(path: image), to: try WriteTarget.open(path: ours.devicePath), options: options)
        #expect(result.bytesWritten == options.bmap!.mappedBytes)
        try run("bmaptool", "copy", "--bmap", bmapPath, image, theirs.devicePath)

        #expect(try ours.sha256() == theirs.sha256())
        // Provably not written: an unmapped block still holds the 0xAA fill, not the image's zeros.
        #expect(try readBytes(ours.devicePath, offset: 2 << 20, count: 4096) == [UInt8](repeating: 0xAA, count: 4096))
        for (offset, bytes) in pieces {
            #expect(try readBytes(ours.devicePath, offset: offset, count: bytes.count) == bytes)
        }
    }

    @Test("bmap is found next to the image like bmaptool: IMAGE.bmap, then with extensions stripped")
    func locatesLikeBmaptool() throws {
        let image = scratch.file("disk.img.xz")
        try write([1], to: image)
        #expect(Bmap.locate(forImage: image) == nil)
        try write([1], to: scratch.file("disk.bmap"))
        #expect(Bmap.locate(forImage: image) == scratch.file("disk.bmap"))
        try write([1], to: scratch.file("disk.img.bmap"))
        #expect(Bmap.locate(forImage: image) == scratch.file("disk.img.bmap"))
        try write([1], to: scratch.file("disk.img.xz.bmap"))
        #expect(Bmap.locate(forImage: image) == scratch.file("disk.img.xz.bmap"))
    }

    @Test("a compressed image with its bmap writes only mapped ranges and checks them as they stream by")
    func compressedWithBmap() throws {
        let (image, bmapPath, _) = try sparseImage()
        try run("zstd", "-q", "-f", image, "-o", image + ".zst")
        let card = try LoopCard(label: "bmap-zst", size: 48 << 20)
        defer { card.close() }
        var options = WriteOptions()
        options.bmap = try Bmap.load(path: bmapPath)
        let result = try ImageWriter.write(source: try ImageSource(path: image + ".zst"), to: try WriteTarget.open(path: card.devicePath), options: options)
        #expect(result.verified && result.bytesWritten == options.bmap!.mappedBytes)
        #expect(try card.sha256(bytes: 32 << 20) == sha256(file: image))
    }

    @Test("a bmap of a different size is 'belongs to a different image'")
    func bmapSizeMismatch() throws {
        let (_, bmapPath, _) = try sparseImage()
        let other = scratch.file("other.img")
        try run("truncate", "-s", "16M", other)
        let card = try LoopCard(label: "bmap-mismatch", size: 48 << 20)
        defer { card.close() }
        var options = WriteOptions()
        options.bmap = try Bmap.load(path: bmapPath)
        do {
            _ = try ImageWriter.write(source: try ImageSource(path: other), to: try WriteTarget.open(path: card.devicePath), options: options)
            Issue.record("wrong bmap accepted")
        } catch {
            #expect(error.code == .bmapMismatch && error.message.contains("different image"))
        }
    }

    @Test("a damaged mapped range is 'image corrupt: blocks A–B', not a card error")
    func damagedImageRange() throws {
        let (image, bmapPath, _) = try sparseImage()
        let h = FileHandle(forUpdatingAtPath: image)!
        try h.seek(toOffset: 6 << 20)
        h.write(Data([0x42]))
        try h.close()
        let card = try LoopCard(label: "bmap-corrupt", size: 48 << 20)
        defer { card.close() }
        var options = WriteOptions()
        options.bmap = try Bmap.load(path: bmapPath)
        do {
            _ = try ImageWriter.write(source: try ImageSource(path: image), to: try WriteTarget.open(path: card.devicePath), options: options)
            Issue.record("corrupt image accepted")
        } catch {
            #expect(error.code == .imageCorrupt)
            #expect(error.message.contains("image corrupt: blocks 1280–2047"), "\(error)")
        }
    }

    @Test("with a bmap the container's checksum is skipped, and damage inside a mapped range is still caught by the bmap check", arguments: ["zst", "xz"])
    func compressedDamageCaughtByBmap(format: String) throws {
        let (image, bmapPath, _) = try sparseImage()
        if format == "zst" { try run("zstd", "-q", "-f", image, "-o", image + ".zst") } else { try run("xz", "-0", "-k", "-f", image) }
        // The 3 MiB of random bytes at 5 MiB make up most of the compressed file, stored as it
        // is (random data does not compress): a byte flipped in the middle changes what the
        // stream decodes to without breaking the stream's structure.
        var bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: image + "." + format)))
        bytes[bytes.count / 2] ^= 0xFF
        let damaged = scratch.file("damaged.img." + format)
        try write(bytes, to: damaged)
        let card = try LoopCard(label: "bmap-damaged-\(format)", size: 48 << 20)
        defer { card.close() }

        // Without a bmap the container's own checksum is what catches it.
        let withoutBmap = try #require(attemptWrite(try ImageSource(path: damaged), on: card))
        #expect(withoutBmap.code == .compressedStreamCorrupt, "\(withoutBmap)")
        // With the bmap, the container's checksum is not computed; the bmap check names the range.
        var options = WriteOptions()
        options.bmap = try Bmap.load(path: bmapPath)
        let source = try ImageSource(path: damaged)
        #expect(source.checksStreamChecksum)
        let withBmap = try #require(attemptWrite(source, on: card, options: options))
        #expect(!source.checksStreamChecksum)
        #expect(withBmap.code == .imageCorrupt, "\(withBmap)")
        #expect(withBmap.message.contains("image corrupt: blocks 1280–2047"), "\(withBmap)")
    }

    @Test("with a bmap, zstd's frame checksum is really not computed: damage in an unmapped range, which is never written, passes; without the bmap the checksum fails it")
    func zstdChecksumSkippedWithBmap() throws {
        let (image, bmapPath, _) = try sparseImage()
        try run("zstd", "-q", "-f", image, "-o", image + ".zst")
        var bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: image + ".zst")))
        // The frame's third block, [256 KiB, 384 KiB) of the image: all zeros and unmapped, so
        // zstd stores it as an RLE block (one byte, repeated). Make it 0x5A.
        let blocks = zstdBlocks(bytes)
        try #require(blocks.count > 2 && blocks[2].type == 1 && blocks[2].size == 128 << 10, "the third block is not a 128 KiB RLE block: \(blocks.prefix(3))")
        bytes[blocks[2].offset + 3] = 0x5A
        let damaged = try scratch.write("unmapped-damage.img.zst", bytes)
        let card = try LoopCard(label: "bmap-zstd-unmapped", size: 48 << 20)
        defer { card.close() }

        let withoutBmap = try #require(attemptWrite(try ImageSource(path: damaged), on: card))
        #expect(withoutBmap.code == .compressedStreamCorrupt && withoutBmap.message.contains("checksum"), "\(withoutBmap)")
        var options = WriteOptions()
        options.bmap = try Bmap.load(path: bmapPath)
        #expect(attemptWrite(try ImageSource(path: damaged), on: card, options: options) == nil)
        #expect(try card.sha256(bytes: 32 << 20) == sha256(file: image), "the mapped ranges are the intact image's")
    }

    @Test("a hand-edited bmap fails its own checksum")
    func editedBmapRejected() throws {
        let (_, bmapPath, _) = try sparseImage()
        var text = try String(contentsOfFile: bmapPath, encoding: .utf8)
        text = text.replacingOccurrences(of: "<MappedBlocksCount>", with: "<!-- edited --><MappedBlocksCount>")
        try text.write(toFile: bmapPath, atomically: true, encoding: .utf8)
        #expect(throws: ImageIOError.self) { try Bmap.load(path: bmapPath) }
    }

    @Test("a bmap whose sizes no file or card can have is invalid, named, not an arithmetic trap", arguments: [
        ("ImageSize", "18446744073709551615", "larger than any file or card"),
        ("ImageSize", "9223372036854775808", "larger than any file or card"),
        ("BlockSize", "18446744073709551104", "invalid block size"),
    ])
    func impossibleSizesRejected(field: String, value: String, why: String) throws {
        let (_, bmapPath, _) = try sparseImage()
        let text = try String(contentsOfFile: bmapPath, encoding: .utf8)
        let edited = try #require(text.replacingOccurrences(of: "<\(field)>[^<]*</\(field)>", with: "<\(field)> \(value) </\(field)>", options: .regularExpression))
        #expect(edited != text)
        let error = try #require(throws: ImageIOError.self) { try Bmap.parse(Data(edited.utf8), path: bmapPath) }
        #expect(error.code == .bmapInvalid && error.message.contains(why), "\(error)")
    }

    @Test("a bmap loaded again is the one parsed before, until its file changes: edited in place after a load, it is checked again and refused")
    func reloadedBmapFollowsItsFile() throws {
        let (_, bmapPath, _) = try sparseImage()
        let original = try String(contentsOfFile: bmapPath, encoding: .utf8)
        let first = try Bmap.load(path: bmapPath)
        #expect(try Bmap.load(path: bmapPath) == first)
        let edited = original.replacingOccurrences(of: "<MappedBlocksCount>", with: "<!-- edited --><MappedBlocksCount>")
        try edited.write(toFile: bmapPath, atomically: false, encoding: .utf8)
        #expect(throws: ImageIOError.self) { try Bmap.load(path: bmapPath) }
        try original.write(toFile: bmapPath, atomically: false, encoding: .utf8)
        #expect(try Bmap.load(path: bmapPath) == first)
    }

    /// `image` written as a station's card (a 16 MiB budget: spliced from the page cache) onto a
    /// loop card of `size` bytes full of 0xAA, and by `bmaptool copy` onto another such card:
    /// the two cards must be the same, and no chunk buffer may come from the budget (the
    /// buffered path takes one; the splice only the verifier's read-back piece). `writing` runs
    /// the engine's write it is given (on this thread unless it says otherwise); `check` looks
    /// at our card before the cards go.
    func splicedAgainstBmaptool(_ label: String, image: String, bmap bmapPath: String, size: Int, chunkSize: Int? = nil,
                                writing: (@escaping @Sendable () throws -> WriteResult) throws -> WriteResult = { try $0() },
                                check: (LoopCard, WriteResult) throws -> Void) throws {
        let fill = scratch.file("fill-\(label).img")
        try write([UInt8](repeating: 0xAA, count: size), to: fill)
        let ours = try LoopCard(label: "\(label)-ours", size: Int64(size), image: fill)
        defer { ours.close() }
        let theirs = try LoopCard(label: "\(label)-theirs", size: Int64(size), image: fill)
        defer { theirs.close() }
        let budget = BufferBudget(limit: 16 << 20)
        var options = WriteOptions()
        options.bmap = try Bmap.load(path: bmapPath)
        options.budget = budget
        if let chunkSize { options.chunkSize = chunkSize }
        let result = try writing { [options] in
            try ImageWriter.write(source: try ImageSource(path: image), to: try WriteTarget.open(path: ours.devicePath), options: options)
        }
        #expect(budget.usage.peakHandedOut <= ImageWriter.readBackPiece, "spliced, not buffered: \(budget.usage)")
        #expect(budget.usage.handedOut == 0)
        try run("bmaptool", "copy", "--bmap", bmapPath, image, theirs.devicePath)
        #expect(try ours.sha256() == theirs.sha256())
        try check(ours, result)
    }

    @Test("a station's card is spliced from the page cache: the same card as bmaptool copy's, unmapped blocks untouched, no chunk buffer taken from the budget")
    func stationCardSplicedFromThePageCache() throws {
        let (image, bmapPath, pieces) = try sparseImage()
        try splicedAgainstBmaptool("splice", image: image, bmap: bmapPath, size: 48 << 20, chunkSize: 4 << 20) { ours, result throws in
            #expect(result.bytesWritten == (try Bmap.load(path: bmapPath)).mappedBytes)
            #expect(try readBytes(ours.devicePath, offset: 2 << 20, count: 4096) == [UInt8](repeating: 0xAA, count: 4096))
            for (offset, bytes) in pieces {
                #expect(try readBytes(ours.devicePath, offset: offset, count: bytes.count) == bytes)
            }
        }
    }

    @Test("without CAP_SYS_RESOURCE, as the packaged unit runs, a card is spliced through a pipe of pipe-max-size (1 MiB by default) and is the same card as bmaptool copy's")
    func splicedWithoutCapSysResource() throws {
        let maxText = try String(contentsOfFile: "/proc/sys/fs/pipe-max-size", encoding: .utf8)
        let maxSize = try #require(Int(maxText.trimmingCharacters(in: .whitespacesAndNewlines)))
        let unprivileged = try #require(SplicePipe.sizes.first { $0 <= maxSize },
                                        "pipe-max-size is \(maxSize): below 1 MiB a card takes the buffered path")
        // The test process's own pipe: the largest with CAP_SYS_RESOURCE, else the same as the
        // unit's (root in some containers lacks it — this machine's does — and then every
        // spliced card here, the batch benchmarks' included, uses the unprivileged size).
        let status = try String(contentsOfFile: "/proc/self/status", encoding: .utf8)
        let effective = try #require(status.split(separator: "\n").first { $0.hasPrefix("CapEff:") }
            .flatMap { UInt64($0.dropFirst("CapEff:".count).trimmingCharacters(in: .whitespaces), radix: 16) })
        let ownCapacity = SplicePipe()?.capacity
        #expect(ownCapacity == (effective & (1 << UInt64(capSysResource)) != 0 ? SplicePipe.sizes[0] : unprivileged))

        let (image, bmapPath, _) = try sparseImage()
        nonisolated(unsafe) var capacity: Int?
        try splicedAgainstBmaptool("splice-nocap", image: image, bmap: bmapPath, size: 48 << 20, chunkSize: 4 << 20, writing: { write in
            try withoutCapability(capSysResource) {
                capacity = SplicePipe()?.capacity
                return try write()
            }
        }) { _, result throws in
            #expect(result.bytesWritten == (try Bmap.load(path: bmapPath)).mappedBytes)
        }
        #expect(capacity == unprivileged)
    }

    @Test("spliced with a bmap of 512-byte blocks: ranges that start off a page (a 4 MiB chunk then spans 1,025 pages, more than the pipe holds) land as bmaptool copy puts them")
    func splicedRangesOffAPage() throws {
        let data = patternBytes(16 << 20, seed: 7)
        let image = scratch.file("off-page.img")
        try write(data, to: image)
        // 512-byte blocks: one range inside the held-back first MiB, one starting 1,536 bytes
        // past it and 4.4 MiB long, one single block near the end.
        let ranges: [(first: UInt64, last: UInt64)] = [(3, 1000), (2051, 11050), (30001, 30001)]
        let mapped = ranges.reduce(UInt64(0)) { $0 + $1.last - $1.first + 1 }
        let bmapPath = try writeV13Bmap("off-page.bmap", data: Data(data), blockSize: 512, ranges: ranges)
        try splicedAgainstBmaptool("offpage", image: image, bmap: bmapPath, size: 24 << 20) { ours, result throws in
            #expect(result.bytesWritten == mapped * 512)
            for (first, last) in ranges {
                #expect(try readBytes(ours.devicePath, offset: first * 512, count: Int((last - first + 1) * 512)) == Array(data[Int(first * 512)..<Int((last + 1) * 512)]))
            }
            #expect(try readBytes(ours.devicePath, offset: 1001 * 512, count: 512) == [UInt8](repeating: 0xAA, count: 512))
        }
    }

    @Test("a version 1.3 bmap with SHA-1 checksums works, and bmaptool itself accepts it")
    func version1Bmap() throws {
        let (image, bmap2Path, _) = try sparseImage()
        let v2 = try Bmap.load(path: bmap2Path)
        let data = try Data(contentsOf: URL(fileURLWithPath: image))
        let v1Path = try writeV13Bmap("v1.bmap", data: data, blockSize: 4096, ranges: v2.ranges.map { ($0.first, $0.last) })
        let v1 = try Bmap.load(path: v1Path)
        #expect(v1.checksumType == .sha1 && v1.ranges.count == v2.ranges.count)

        let card = try LoopCard(label: "bmap-v1", size: 48 << 20)
        defer { card.close() }
        var options = WriteOptions()
        options.bmap = v1
        #expect(try ImageWriter.write(source: try ImageSource(path: image), to: try WriteTarget.open(path: card.devicePath), options: options).verified)
        // The peer agrees this is a valid 1.4 bmap for the image.
        let out = scratch.file("copy-v1.img")
        try run("bmaptool", "copy", "--bmap", v1Path, image, out)
        #expect(try sha256(file: out) == sha256(file: image))
    }

    @Test("a compressed image with a bmap: a card altered between write and verify is caught to the byte",
          arguments: [UInt64(5 << 20) + 1_234_567, UInt64(40_000)])
    func compressedWithBmapCatchesAlteredCard(badOffset: UInt64) throws {
        // 5 MiB + …: inside the 3 MiB range; 40 000: inside the range at byte 0, whose chunk
        // is written (and read back) last.
        let (image, bmapPath, pieces) = try sparseImage()
        try run("zstd", "-q", "-f", image, "-o", image + ".zst")
        var options = WriteOptions()
        options.bmap = try Bmap.load(path: bmapPath)
        let source = try ImageSource(path: image + ".zst")
        let card = try LoopCard(label: "bmap-zst", size: 48 << 20)
        defer { card.close() }

        let target = try WriteTarget.open(path: card.devicePath)
        let clean = try ImageWriter.write(source: source, to: target, options: options)
        target.close()
        #expect(clean.verified && clean.bytesWritten == options.bmap!.mappedBytes)
        for (offset, bytes) in pieces {
            #expect(try readBytes(card.devicePath, offset: offset, count: bytes.count) == bytes)
        }

        let expectedByte = pieces.first { badOffset >= $0.0 && badOffset < $0.0 + UInt64($0.1.count) }!
        let original = expectedByte.1[Int(badOffset - expectedByte.0)]
        // Nothing is read back before the hook: verification waits for the final sync.
        options.syncInterval = nil
        // The mismatch itself, without the repair attempt (RepairTests cover that).
        options.repair = false
        options.testHookBeforeVerify = { target in
            let h = FileHandle(forUpdatingAtPath: target.path)!
            try? h.seek(toOffset: badOffset)
            h.write(Data([original ^ 0x10]))
            try? h.synchronize()
            try? h.close()
        }
        do {
            _ = try ImageWriter.write(source: try ImageSource(path: image + ".zst"), to: try WriteTarget.open(path: card.devicePath), options: options)
            Issue.record("altered card passed verification")
        } catch {
            #expect(error.code == .verifyMismatch)
            #expect(error.offset == badOffset, "\(error)")
        }
    }

    func sha256(file: String) throws -> String {
        SHA256.hash(data: try Data(contentsOf: URL(fileURLWithPath: file))).map { String(format: "%02x", $0) }.joined()
    }
}
